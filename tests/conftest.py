"""Suite-wide settings: one torch thread per test worker (pytest-xdist runs two workers on two cores,
and oversubscribed threads slow everything several-fold), W&B offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def run_script(script: str, *args: object, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a test file as its own multi-process program (DDP or gloo workers), one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, script, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )
