"""Ctrl-C, as a terminal sends it (SIGINT to the whole process group), stops `smml prepare --workers N`
and `smml fit` promptly with status 130 and one line, and leaves nothing half-written that a later run
would trust: prepare's unfinished cases are redone, fit writes last.ckpt to resume from."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import alive, ctrl_c_when, quiet_cpu_trainer, start_cli, tiny_network
from smml_lightning.data import cache
from smml_lightning.data.prepare import prepare
from smml_lightning.data.synthetic import synthesize

SHAPE = (48, 48, 48)


def test_ctrl_c_stops_parallel_prepare_at_once_and_the_rerun_redoes_unfinished_cases(tmp_path):
    synthesize(tmp_path / "raw", 12, shape=SHAPE, seed=3)
    out = tmp_path / "cache"
    proc = start_cli(
        ["prepare", str(tmp_path / "raw"), str(out), "--workers=2", f"--min_size={list(SHAPE)}"],
        tmp_path / "prepare.log",
    )
    code, took, err, workers = ctrl_c_when(
        proc,
        lambda: bool(list(out.glob("*/meta.json"))),  # the first case is finished: the pool is busy
        timeout=120,
        too_late="no case prepared in 120 s",
        poll=0.02,
        wait=30,
    )
    assert workers, "prepare --workers=2 runs no worker process"
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("smml: interrupted")
    assert took < 10, f"prepare took {took:.1f} s to stop"
    time.sleep(0.5)
    assert not [pid for pid in workers if alive(pid)], "worker processes outlived the interrupted run"
    done = cache.list_cases(out)
    assert len(done) < 12, "the pending cases were not cancelled"
    summary = prepare(tmp_path / "raw", out, min_size=SHAPE, progress=False)
    assert sorted(summary.skipped + summary.prepared) == sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert set(summary.skipped) <= set(done) and not summary.failed
    assert not list(out.glob("*/.*.tmp"))
    serial = prepare(tmp_path / "raw", tmp_path / "serial", min_size=SHAPE, progress=False)
    for name in serial.prepared:  # what the interrupted run kept is what an uninterrupted one writes
        np.testing.assert_array_equal(
            cache.load_image(out, name), cache.load_image(tmp_path / "serial", name)
        )


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupts")
    synthesize(root / "raw", 4, shape=(32, 32, 32), seed=5)
    prepare(root / "raw", root / "cache", min_size=(32, 32, 32), progress=False)
    return root / "cache"


def test_ctrl_c_during_fit_writes_last_checkpoint_and_exits_130(small_cache, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": quiet_cpu_trainer(tmp_path, max_epochs=1000, limit_val_batches=0),
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "monitor": None},
        "model": {
            "class_path": "smml_lightning.lit.baselines.SingleBranch",
            "init_args": {"network": tiny_network(32)},
        },
        "data": {
            "cache_dir": str(small_cache),
            "patch_size": 32,
            "batch_size": 1,
            "samples_per_volume": 1,
            "queue_length": 4,
            "num_workers": 0,
            "use_prior": False,
            "val_fraction": 0.25,
            "test_fraction": 0.0,
        },
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "fit.log"
    proc = start_cli(["fit", f"--config={path}", "--checkpoint.every_n_train_steps=2"], log)
    last = tmp_path / "ckpt" / "last.ckpt"
    code, _, err, _ = ctrl_c_when(
        proc, last.exists, timeout=120, too_late="no checkpoint in 120 s", poll=0.1, settle=1.0
    )
    output = log.read_text() + err
    assert code == 130, output[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("smml: interrupted")
    assert "Ctrl-C at epoch" in output and f"--ckpt_path={last}" in output
    saved = torch.load(last, map_location="cpu", weights_only=False)
    stopped = next(line for line in output.splitlines() if "Ctrl-C at epoch" in line)
    assert f"step {saved['global_step']}:" in stopped  # the checkpoint is the interrupt's, not a periodic one
