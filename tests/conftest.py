"""Suite-wide settings: one torch thread per test worker (pytest-xdist runs two workers on two cores,
and oversubscribed threads slow everything several-fold), W&B offline; and the helpers several test files
share (tiny caches, configs and command lines, child processes that get a Ctrl-C)."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from smml_lightning.data.cache import CaseMeta

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def prepared_cache(root: Path, n_cases: int, seed: int, shape: tuple[int, int, int] = (32, 32, 32)) -> Path:
    """Synthetic cases written as NIfTI under ``root/raw`` and prepared into ``root/cache``."""
    from smml_lightning.data.prepare import prepare
    from smml_lightning.data.synthetic import synthesize

    synthesize(root / "raw", n_cases, shape=shape, seed=seed)
    prepare(root / "raw", root / "cache", min_size=shape, progress=False)
    return root / "cache"


def synthetic_meta(
    name: str,
    shape: tuple[int, int, int],
    available: tuple[bool, ...] = (True,) * 4,
    offset: int = 0,
    original_shape: tuple[int, int, int] | None = None,
    has_label: bool = True,
) -> CaseMeta:
    """The meta of a synthetic case cached as ``shape``, cut from ``offset`` voxels along each axis of an
    ``original_shape`` scan (default: ``shape``) with a unit affine and 1 mm voxels."""
    return CaseMeta(
        name=name,
        layout="synthetic",
        convention="brats2018",
        available=available,
        original_shape=original_shape or shape,
        affine=np.eye(4).tolist(),
        spacing=(1.0, 1.0, 1.0),
        crop_box=tuple((offset, offset + s) for s in shape),
        has_label=has_label,
    )


def cache_lock_refusals(folder: Path, *commands: str) -> list[str]:
    """The messages with which the cache lock on ``folder`` refuses a run of each of ``commands`` (none while
    nothing holds it); the lock is per open file, so this process is refused as another would be."""
    from smml_lightning.data.prepare import cache_lock

    refusals = []
    for command in commands:
        try:
            with cache_lock(folder, command):
                pass
        except ValueError as err:
            refusals.append(str(err))
    return refusals


def run_script(script: str, *args: object, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a test file as its own multi-process program (DDP or gloo workers), one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, script, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


# A CPU-second MMFormer: tests that go through the CLI or a config check the path, not what it learns.
TINY_NETWORK = {"base_width": 4, "transformer_dim": 16, "num_heads": 2}
TINY_NETWORK_ARGS = [f"--model.init_args.network.init_args.{k}={v}" for k, v in TINY_NETWORK.items()]
# One 32^3 patch a step from a prepared cache split 2:1:1, loaded in the main process.
TINY_DATA_ARGS = [
    "--data.patch_size=32",
    "--data.batch_size=1",
    "--data.samples_per_volume=1",
    "--data.queue_length=2",
    "--data.num_workers=0",
    "--data.val_fraction=0.25",
    "--data.test_fraction=0.25",
]


def tiny_network(patch_size: int) -> dict:
    """The tiny MMFormer as a config's ``network`` entry (no dropout)."""
    return {
        "class_path": "smml_lightning.models.backbone.MMFormer",
        "init_args": {**TINY_NETWORK, "dropout": 0.0, "patch_size": patch_size},
    }


def quiet_cpu_trainer(root_dir: Path, **options: object) -> dict:
    """A config's ``trainer`` entry for a test fit: one CPU process in fp32, no logger, no sanity check,
    progress bar or model summary; ``options`` add to it."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "logger": False,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root_dir),
        **options,
    }


def _default_sigint() -> None:
    """Give the child the default SIGINT disposition: a parent that ignores SIGINT (some test workers do, after
    other tests) would pass SIG_IGN on, and the child would never see the Ctrl-C a test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(args: list[str], stdout: Path | None = None) -> subprocess.Popen:
    """``python -m smml_lightning.cli ARGS`` in its own process group, so that a test can send it Ctrl-C as a
    terminal does (one thread, unbuffered; stdout to the file ``stdout`` or nowhere, stderr piped)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "smml_lightning.cli", *args],
        stdout=stdout.open("w") if stdout is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=_default_sigint,  # a terminal's Ctrl-C, whatever the test process ignores
    )


def child_pids(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


class Interrupted(NamedTuple):
    code: int  # the exit status
    took: float  # seconds from the Ctrl-C to the exit
    err: str  # everything the run wrote to stderr
    workers: list[int]  # the run's child processes when the Ctrl-C was sent


def ctrl_c_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    timeout: float,
    too_late: str,
    poll: float = 0.05,
    settle: float = 0.0,
    wait: float = 60,
) -> Interrupted:
    """Wait (at most ``timeout`` s, failing with ``too_late``) until ``ready()``, then ``settle`` s more, and
    send Ctrl-C to ``proc``'s process group as a terminal does; the run is killed if it outlives ``wait`` s
    after that (or the test fails first)."""
    try:
        end = time.time() + timeout
        while not ready():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < end, too_late
            time.sleep(poll)
        time.sleep(settle)
        workers = child_pids(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        start = time.time()
        code = proc.wait(timeout=wait)
        return Interrupted(code, time.time() - start, proc.stderr.read(), workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
