"""Exact resumption and preemption: random states in checkpoints, a last checkpoint on SIGTERM.

Lightning 2.6 restores weights, optimiser, schedulers, loop counters and callback states from
``--ckpt_path``, but not the global random generators (torch, numpy, Python). Two things make a resumed
run train exactly like the uninterrupted one, at an epoch boundary or in the middle of an epoch:

- The training data does not draw from the global generators. Each epoch's batches are a pure function
  of (seed, epoch, rank) (:class:`~smml_lightning.data.stream.EpochStream`), and the datamodule's
  ``state_dict`` (epoch, batches used) is in every checkpoint; on a mid-epoch resume the training loader
  rebuilds that epoch's stream and discards the batches already trained on (data time only).
- The model-side randomness (dropout, anything a module or loss draws) does, so :class:`ResumeState`
  stores the global states of every rank and restores each rank's own. They are set in
  ``load_state_dict``, which the trainer calls before the first training step; nothing between then and
  that step draws from them (the sanity check runs with its own isolated states, and the training
  loader has a generator of its own, so making its iterator draws nothing either).

Under DDP the trainer builds the checkpoint on every rank and rank 0 writes it, so :class:`ResumeState`
gathers all ranks' states in ``on_save_checkpoint``, a hook every rank runs. If the world size changed,
the saved states do not map onto the new ranks: a warning says so and the seeded states stay (the data
stream does not depend on them; only model-side randomness differs from the interrupted run).

A checkpoint given as ``--ckpt_path`` is checked before Lightning restores it (:func:`check_checkpoint`),
so a wrong file ends with one line naming it and what it is, not a page of missing weight names.

On SIGTERM (a scheduler's preemption, ``kill``, ``scancel``) Lightning stops after the current batch by
raising ``SIGTERMException``; this callback then writes ``last.ckpt`` so at most one step is lost. Ctrl-C
(``KeyboardInterrupt``, which Lightning turns into ``sys.exit(1)``; ``smml`` makes that status 130) does
the same, from wherever the step was interrupted: the weights are those of the last finished step.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


def rng_states() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python random states as tensors, ints and strings only,
    so that checkpoints still load with ``torch.load(weights_only=True)`` (as LightningCLI loads them)."""
    kind, keys, pos, has_gauss, gauss = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
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


def _class_name(checkpoint: dict[str, Any]) -> str | None:
    """The model class a checkpoint's hyperparameters name (``_class_path``, as the CLI stores it)."""
    name = checkpoint.get("hyper_parameters", {}).get("_class_path")
    return name.rsplit(".", 1)[-1] if isinstance(name, str) else None


def check_checkpoint(path: str | Path, module: torch.nn.Module) -> None:
    """Raise ``ValueError`` (``FileNotFoundError``) with one line naming ``path`` when it is missing, not a
    PyTorch checkpoint (another file, cut short, corrupt) or holds weights ``module`` cannot take: another
    method's, or the same method at other sizes."""
    if str(path) in ("last", "best", "hpc") or str(path).startswith("registry"):
        return  # Lightning's own names for checkpoints it finds itself
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a checkpoint (not a PyTorch file, or one cut short by an interrupted "
            "copy or a full disk)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # whatever torch says, the file is unusable
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err
    weights = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint: it holds no state_dict of model weights")
    expected = module.state_dict()
    builds = type(module).__name__
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        held = _class_name(checkpoint)
        if held is not None and held != builds:
            raise ValueError(
                f"checkpoint {path} holds a {held} model; the config builds {builds}: use a "
                f"{builds} checkpoint, or the config of the {held} run"
            )
        raise ValueError(
            f"checkpoint {path} does not fit the {builds} model the config builds: "
            f"{len(missing)} weight(s) missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:1]}); give the model options it was trained with"
        )
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ValueError(
                f"checkpoint {path} holds {key} of shape {tuple(weights[key].shape)}, the {builds} "
                f"model the config builds has {tuple(value.shape)}: give the network options "
                "(sizes) it was trained with"
            )


def last_checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The trainer's first :class:`ModelCheckpoint` with a folder (``None``: no such callback)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            return callback
    return None


class ResumeState(Callback):
    """Every rank's random states in every checkpoint, each rank's restored on resume; ``last.ckpt``
    written on SIGTERM.

    Args:
        save_on_sigterm: write the trainer's last checkpoint when Lightning stops on SIGTERM.
    """

    def __init__(self, save_on_sigterm: bool = True) -> None:
        self.save_on_sigterm = save_on_sigterm
        self.sigterm_checkpoint: Path | None = None
        self.world_size = 1
        self.rank = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the checkpoint is restored: load_state_dict needs to know which rank it runs on.
        self.world_size, self.rank = trainer.world_size, trainer.global_rank

    def state_dict(self) -> dict[str, Any]:
        # Called while the checkpoint is being built, so these are the states at that moment.
        return {"rng": rng_states(), "world_size": self.world_size}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every rank builds the checkpoint (only rank 0 writes it), so every rank takes part here.
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            per_rank: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(per_rank, checkpoint["callbacks"][self.state_key]["rng"])
            checkpoint["callbacks"][self.state_key]["rng_per_rank"] = per_rank

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = int(state_dict.get("world_size", 1))
        if saved != self.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random states of {saved} rank(s) but this run has "
                f"{self.world_size}: keeping the seeded states, so model-side randomness (not the "
                "data) differs from the interrupted run"
            )
            return
        set_rng_states(state_dict["rng_per_rank"][self.rank] if saved > 1 else state_dict["rng"])

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        interrupted = isinstance(exception, (SIGTERMException, KeyboardInterrupt))
        if (
            not (self.save_on_sigterm and interrupted)
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        callback = last_checkpoint_callback(trainer)
        if callback is None or callback.dirpath is None:
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        if path.is_symlink():  # ModelCheckpoint(save_last="link"): replace the link, not its target
            path.unlink()
        # Recorded in the checkpoint, so the resumed run's ModelCheckpoint keeps writing last.ckpt (it would
        # otherwise take the file for someone else's and write last-v1.ckpt).
        callback.last_model_path = str(path)
        trainer.save_checkpoint(path)
        self.sigterm_checkpoint = path
        cause = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        rank_zero_info(
            f"{cause} at epoch {trainer.current_epoch}, step {trainer.global_step}: wrote {path}; "
            f"resume with --ckpt_path={path}"
        )
