"""Reliability of training runs on a tiny synthetic cache: exact resumption, SIGTERM and SIGKILL,
non-finite losses, determinism, and prediction inputs without any modality."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from smml_lightning.cli import lightning_main
from smml_lightning.data.prepare import prepare
from smml_lightning.data.synthetic import synthesize
from smml_lightning.lit.base import NonFiniteLossError
from smml_lightning.lit.smml import SMML

SHAPE = (32, 32, 32)
PATCH = 32
STEPS_PER_EPOCH = 3  # 5 training cases x 1 patch in batches of 2


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability")
    synthesize(root / "raw", 6, shape=SHAPE, seed=5)
    prepare(root / "raw", root / "cache", min_size=SHAPE, progress=False)
    return root / "cache"


def write_config(path: Path, cache: Path, out: Path, max_epochs: int = 2, **trainer: object) -> Path:
    """A tiny SMML fit (no priors, fp32, no logger) whose checkpoints go to ``out/ckpt``."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "logger": False,
                    "max_epochs": max_epochs, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1, "default_root_dir": str(out),
                    **trainer},
        "checkpoint": {"dirpath": str(out / "ckpt"), "save_last": True},
        "model": {"class_path": "smml_lightning.lit.smml.SMML", "init_args": {
            "network": {"class_path": "smml_lightning.models.backbone.MMFormer", "init_args": {
                "base_width": 4, "transformer_dim": 16, "num_heads": 2, "patch_size": PATCH}},
            "use_prior": False, "warmup_epochs": 1, "lr": 1e-3, "val_subsets": ["all"],
            "compare_published": False}},
        "data": {"cache_dir": str(cache), "patch_size": PATCH, "batch_size": 2, "samples_per_volume": 1,
                 "queue_length": 8, "num_workers": 0, "val_fraction": 0.17, "test_fraction": 0.0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"parameter {key} differs")


def test_resume_from_epoch_end_gives_the_uninterrupted_weights(cache_dir, tmp_path):
    from lightning.pytorch.callbacks import Callback

    class Stop(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    full = write_config(tmp_path / "full.yaml", cache_dir, tmp_path / "full")
    lightning_main(["fit", f"--config={full}"])
    reference = checkpoint(tmp_path / "full" / "ckpt" / "last.ckpt")
    assert reference["global_step"] == 2 * STEPS_PER_EPOCH

    part = write_config(tmp_path / "part.yaml", cache_dir, tmp_path / "part")
    cli = lightning_main([f"--config={part}"], run=False)
    cli.trainer.callbacks.append(Stop())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    stopped = checkpoint(tmp_path / "part" / "ckpt" / "last.ckpt")
    assert stopped["global_step"] == STEPS_PER_EPOCH

    lightning_main(["fit", f"--config={part}", f"--ckpt_path={tmp_path / 'part' / 'ckpt' / 'last.ckpt'}"])
    resumed = checkpoint(tmp_path / "part" / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"]
    assert_same_weights(resumed["state_dict"], reference["state_dict"], atol=1e-6)
