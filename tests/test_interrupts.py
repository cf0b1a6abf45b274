"""Ctrl-C, as a terminal sends it (SIGINT to the whole process group), stops `smml prepare --workers N`
and `smml fit` promptly with status 130 and one line, and leaves nothing half-written that a later run
would trust: prepare's unfinished cases are redone, fit writes last.ckpt to resume from."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from smml_lightning.data import cache
from smml_lightning.data.prepare import prepare
from smml_lightning.data.synthetic import synthesize

SHAPE = (48, 48, 48)


def _default_sigint() -> None:
    """Give the child the default SIGINT disposition: a parent that ignores SIGINT (some test workers do, after
    other tests) would pass SIG_IGN on, and the child would never see the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # its own process group, so that the test can send Ctrl-C to it as a terminal does
    return subprocess.Popen(
        [sys.executable, "-m", "smml_lightning.cli", *args],
        stdout=log.open("w"),
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_default_sigint,  # a terminal's Ctrl-C, whatever the test process ignores
    )


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_ctrl_c_stops_parallel_prepare_at_once_and_the_rerun_redoes_unfinished_cases(tmp_path):
    synthesize(tmp_path / "raw", 12, shape=SHAPE, seed=3)
    out = tmp_path / "cache"
    proc = _start(
        ["prepare", str(tmp_path / "raw"), str(out), "--workers=2", f"--min_size={list(SHAPE)}"],
        tmp_path / "prepare.log",
    )
    try:
        end = time.time() + 120
        while not list(out.glob("*/meta.json")):  # the first case is finished: the pool is busy
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < end, "no case prepared in 120 s"
            time.sleep(0.02)
        workers = _children(proc.pid)
        assert workers, "prepare --workers=2 runs no worker process"
        os.killpg(proc.pid, signal.SIGINT)
        start = time.time()
        code = proc.wait(timeout=30)
        took = time.time() - start
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("smml: interrupted")
    assert took < 10, f"prepare took {took:.1f} s to stop"
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "worker processes outlived the interrupted run"
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
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "logger": False,
            "max_epochs": 1000,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "default_root_dir": str(tmp_path),
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "monitor": None},
        "model": {
            "class_path": "smml_lightning.lit.baselines.SingleBranch",
            "init_args": {
                "network": {
                    "class_path": "smml_lightning.models.backbone.MMFormer",
                    "init_args": {
                        "base_width": 4,
                        "transformer_dim": 16,
                        "num_heads": 2,
                        "dropout": 0.0,
                        "patch_size": 32,
                    },
                }
            },
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
    proc = _start(["fit", f"--config={path}", "--checkpoint.every_n_train_steps=2"], log)
    last = tmp_path / "ckpt" / "last.ckpt"
    try:
        end = time.time() + 120
        while not last.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < end, "no checkpoint in 120 s"
            time.sleep(0.1)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text() + err
    assert code == 130, output[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("smml: interrupted")
    assert "Ctrl-C at epoch" in output and f"--ckpt_path={last}" in output
    saved = torch.load(last, map_location="cpu", weights_only=False)
    stopped = next(line for line in output.splitlines() if "Ctrl-C at epoch" in line)
    assert f"step {saved['global_step']}:" in stopped  # the checkpoint is the interrupt's, not a periodic one
