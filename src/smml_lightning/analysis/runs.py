"""The one loader of the analyses: trained runs, the quality benchmark's split and test cases.

A run folder is what ``smml fit`` leaves (``config.yaml``, ``checkpoints/last.ckpt``); a work folder is
the ``--work`` folder of ``benchmarks/quality.py`` (``cache/``, ``heldout-*/cache``, run folders).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np
import pandas as pd
import torch
import yaml

from ..data import cache
from ..data.labels import REGION_CLASSES, REGIONS
from ..data.splits import seeded_split
from ..experiments import load as load_experiment
from ..io import atomic_write_text

if TYPE_CHECKING:
    from ..lit.base import MissingModalityModule

DATA_SEED = 0  # the quality benchmark's synthetic cases and split: fixed for every method and training seed
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # as Lightning's test step runs


def build(run: Path, overrides: list[str], stage: str = "fit") -> tuple[Any, Any, Any]:
    """The run's LightningModule (last weights), data module and a CPU trainer, through the package's CLI.

    The module is set up for ``stage`` as the trainer would before loading weights: without that its
    small bottleneck convolutions run unguarded in bf16 (models/numerics.py), with other numbers than
    the run's own fit and test. ``overrides`` are CLI arguments applied after the run's config.
    """
    from lightning.pytorch import Trainer

    from ..lit.lightning_cli import lightning_main

    config_path, ckpt = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    for needed in (config_path, ckpt):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: missing; give a run folder of `smml fit`")
    config = yaml.safe_load(config_path.read_text())
    # The subcommand's own arguments (ckpt_path, ...) are unknown to a CLI built without subcommands.
    for method in (Trainer.fit, Trainer.validate, Trainer.test):
        for key in set(inspect.signature(method).parameters) - {"model"}:
            config.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="smml-analysis-") as tmp:
        plain = Path(tmp) / "config.yaml"
        plain.write_text(yaml.safe_dump(config))
        args = [
            "--config",
            str(plain),
            "--data.num_workers=0",
            "--trainer.logger=false",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.num_nodes=1",
            *overrides,
        ]
        # LightningCLI warns when it gets both ``args`` and command-line arguments (the caller's own).
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            cli = lightning_main(args, run=False)
    cli.model.setup(stage)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    cli.model.load_state_dict(checkpoint["state_dict"])
    return cli.model, cli.datamodule, cli.trainer


def training_batches(data: Any, count: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``count`` training batches of a run's data module (set up for ``fit``), drawn lazily."""
    data.setup("fit")
    loader = iter(data.train_dataloader())
    return (next(loader) for _ in range(count))


def load_run(run_dir: Path) -> tuple[MissingModalityModule, torch.dtype | None]:
    """The run's model with its last weights, and the autocast dtype its test ran in (``None``: float32)."""
    model, _, trainer = build(run_dir, [], stage="test")
    return model.eval(), AUTOCAST.get(str(trainer.precision))


def predict(
    model: MissingModalityModule, dtype: torch.dtype | None, cache_dir: Path, name: str, subset_ids: list[int]
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """A cached case's label maps under each subset, predicted as the run's test step does, and its label."""
    image = torch.from_numpy(np.array(cache.load_image(cache_dir, name), dtype=np.float32))[None]
    truth = cache.load_label(cache_dir, name)
    if truth is None:
        raise ValueError(f"{cache.case_dir(cache_dir, name)}: no label.npy; the analyses need labelled cases")
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        preds = model.predict_case(image, subset_ids)
    return {sid: p.cpu().numpy() for sid, p in preds.items()}, np.asarray(truth)


def held_out_fraction(cases: int, val_fraction: float, test_fraction: float) -> float:
    """The test fraction that scores the config's validation and test cases together.

    The benchmark's runs never validate (the last weights are scored), so the validation cases join the
    test set: twice the cases per score, half the noise a 5-case test set puts on small regions like ET.
    The fraction is exact, so the split's shuffled order gives the same training cases as the config's.
    """
    return (round(val_fraction * cases) + round(test_fraction * cases)) / cases


def benchmark_split(cache_dir: Path) -> dict[str, list[str]]:
    """The quality benchmark's train / test split of ``cache_dir`` (synthetic.yaml's validation cases tested):
    the one place for it, so analyses score exactly the cases a run trained and tested on."""
    names = cache.list_cases(cache_dir)
    if not names:
        raise FileNotFoundError(f"{cache_dir}: no prepared cases; give the --work folder of a quality.py run")
    data = load_experiment("synthetic")["data"]
    fraction = held_out_fraction(len(names), data["val_fraction"], data["test_fraction"])
    return seeded_split(names, 0.0, fraction, DATA_SEED)


def scored_cases(work: Path) -> list[tuple[Path, str]]:
    """(cache, case) of every test case of a quality work folder: the split's, then each held-out set's."""
    cases = [(work / "cache", name) for name in benchmark_split(work / "cache")["test"]]
    for heldout in sorted(work.glob("heldout-*/cache")):
        cases += [(heldout, name) for name in cache.list_cases(heldout)]
    return cases


def region_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """Per region: predicted voxels, true voxels and voxels in both, from internal label maps."""
    out = {}
    for region in REGIONS:
        p, t = np.isin(pred, REGION_CLASSES[region]), np.isin(truth, REGION_CLASSES[region])
        out[region] = (int(p.sum()), int(t.sum()), int((p & t).sum()))
    return out


def dice_from_counts(a: int, b: int, both: int) -> float:
    """Dice of two masks from their voxel counts and overlap; 1 when both are empty (as in the reports)."""
    return 1.0 if a + b == 0 else 2.0 * both / (a + b)


def add_work_and_runs(parser: argparse.ArgumentParser, work_help: str, runs_help: str) -> None:
    """The command line of the run-scoring analyses: a quality.py work folder, run folders, and a
    ``--csv`` for the per-case rows."""
    parser.add_argument("work", type=Path, help=work_help)
    parser.add_argument("runs", type=Path, nargs="+", help=runs_help)
    parser.add_argument("--csv", type=Path, help="also write the per-case rows here (must not exist)")


def check_csv(path: Path | None) -> None:
    """Refuse a ``--csv`` that exists before any run is loaded: nothing already written is overwritten."""
    if path is not None and path.exists():
        raise FileExistsError(f"--csv {path}: already exists")


def write_csv(path: Path | None, rows: pd.DataFrame) -> None:
    if path is not None:
        check_csv(path)
        atomic_write_text(path, rows.to_csv(index=False))
