"""Exact resumption and preemption: random states in checkpoints, a last checkpoint on SIGTERM.

Lightning 2.6 restores weights, optimiser, schedulers, loop counters and callback states from
``--ckpt_path``, but not the global random generators (torch, numpy, Python). This package draws the
training patches, their augmentation and the modality masks from those generators, so without them
a resumed run trains on different data from the run it continues. :class:`ResumeState` stores them.

When they are restored matters. The trainer restores callback states (``load_state_dict``) before it
builds the training loader and its first iterator; an uninterrupted run creates the next epoch's
iterator after the checkpoint was written. So the generators are set in ``load_state_dict``: both runs
then make the same draws from the same state. Resumption is exact at epoch boundaries (the checkpoint
written after validation at the end of an epoch); a mid-epoch checkpoint resumes the counters but the
patch queue restarts, so the rest of that epoch sees other patches.

On SIGTERM (a scheduler's preemption, ``kill``, ``scancel``) Lightning stops after the current batch by
raising ``SIGTERMException``; this callback then writes ``last.ckpt`` so at most one step is lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import random

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


def rng_states() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python random states as tensors, ints and strings only,
    so that checkpoints still load with ``torch.load(weights_only=True)`` (as LightningCLI loads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), py_gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = states["python"]
    random.setstate((version, tuple(internal), py_gauss))


def last_checkpoint_path(trainer: pl.Trainer) -> Path | None:
    """Where the trainer's first :class:`ModelCheckpoint` keeps its last checkpoint (``None``: no such callback)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return None


class ResumeState(Callback):
    """Random states in every checkpoint, restored on resume; ``last.ckpt`` written on SIGTERM.

    Args:
        save_on_sigterm: write the trainer's last checkpoint when Lightning stops on SIGTERM.
    """

    def __init__(self, save_on_sigterm: bool = True) -> None:
        self.save_on_sigterm = save_on_sigterm
        self.sigterm_checkpoint: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called while the checkpoint is being written, so these are the states at that moment.
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_states(state_dict["rng"])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not (self.save_on_sigterm and isinstance(exception, SIGTERMException)) or trainer.sanity_checking:
            return
        path = last_checkpoint_path(trainer)
        if path is None:
            return
        if path.is_symlink():  # ModelCheckpoint(save_last="link"): replace the link, not its target
            path.unlink()
        trainer.save_checkpoint(path)
        self.sigterm_checkpoint = path
        rank_zero_info(f"SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}: wrote {path}; "
                       f"resume with --ckpt_path={path}")
