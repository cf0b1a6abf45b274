"""The Lightning CLI behind ``smml fit|validate|test|predict``: checkpoints, prediction writer, resume
state and per-epoch summaries as top-level config groups, and checks that fail before training starts."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..data.datamodule import BratsDataModule
from .base import MissingModalityModule
from .callbacks import AtomicCheckpointIO, BestAndLastCheckpoint, EpochSummary, PredictionWriter
from .hparams import checkpoint_cli_args
from .resume import ResumeState


class SMMLCLI(LightningCLI):
    """LightningCLI with the data's patch size linked to the model's sliding-window size, and a clear
    error before ``fit`` when the data folder is missing."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.patch_size", "model.init_args.roi_size")
        # Best (by validation Dice over the subsets) and last checkpoints, top-level as `checkpoint.*`.
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/dice_mean", "checkpoint.mode": "max",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{epoch:03d}"})
        # Where `predict` writes NIfTI files, as `prediction.*`.
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.add_lightning_class_args(EpochSummary, "epoch_summary")
        # Random states in checkpoints (exact resumption) and last.ckpt on SIGTERM, as `resume.*`.
        parser.add_lightning_class_args(ResumeState, "resume")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # `validate|test|predict --ckpt_path X` need neither the model's config nor the fit's data options.
        if args is None or isinstance(args, (list, tuple)):
            args = checkpoint_cli_args(sys.argv[1:] if args is None else args, __name__.split(".")[0])
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Nothing: :func:`checkpoint_cli_args` has put the checkpoint's options first, where the command
        line overrides them (Lightning's own merge would override the command line)."""

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        self.datamodule.check_ready()
        needed = 1 if getattr(self.model, "share_mask", False) else getattr(self.model, "n_masks", 1)
        if self.datamodule.hparams.n_masks < needed:
            raise SystemExit(f"data.n_masks={self.datamodule.hparams.n_masks}, but {type(self.model).__name__} "
                             f"needs data.n_masks >= {needed} (one mask per branch; SMML's ablation "
                             "model.init_args.share_mask=true needs 1)")


def lightning_main(args: Sequence[str] | None = None, run: bool = True) -> SMMLCLI:
    """Run the Lightning CLI (``fit``/``validate``/``test``/``predict``) with ``args`` (default: argv)."""
    return SMMLCLI(
        MissingModalityModule,
        BratsDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=list(args) if args is not None else None,
        run=run,
    )
