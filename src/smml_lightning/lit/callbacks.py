"""Callbacks and loggers: predictions written as NIfTI, W&B that is offline unless logged in, and
checkpoints that are atomic and keep ``last.ckpt`` current."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from smml_lightning.io import atomic_path


class PredictionWriter(BasePredictionWriter):
    """Write each predicted case as ``<output_dir>/<case>_seg.nii.gz`` (``<case>.nii.gz`` with
    ``brats_names``, as the BraTS challenges expect) in its original grid, header and release label
    convention (plus an overlay PNG), atomically. Existing files are kept unless ``overwrite``: a re-run
    after an interruption only writes the cases still missing."""

    def __init__(
        self,
        output_dir: str = "predictions",
        overwrite: bool = False,
        overlay: bool = True,
        brats_names: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.overlay = overlay
        self.brats_names = brats_names
        self.written: list[Path] = []
        self.kept: list[Path] = []

    def output_path(self, name: str) -> Path:
        from ..evaluation.predict import prediction_name

        return self.output_dir / prediction_name(name, self.brats_names)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        from ..data.resample import resample_labels
        from ..evaluation.predict import write_overlay, write_prediction

        name = prediction["name"]
        path = self.output_path(name)
        if path.exists() and not self.overwrite:
            self.kept.append(path)
            return
        meta = cast(Any, trainer).datamodule.case_meta(name, stage="predict")  # set by trainer.predict
        labels = prediction["labels"].numpy()
        write_prediction(labels, meta, path, overwrite=self.overwrite)
        self.written.append(path)
        if self.overlay:
            image = batch["image"][0].float().cpu().numpy()
            if labels.shape != image.shape[1:]:  # a resampled case's labels lie on its native crop box
                labels = resample_labels(labels, image.shape[1:])
            write_overlay(
                image,
                labels,
                meta.available,
                self.output_dir / f"{name}_overlay.png",
                overwrite=self.overwrite,
            )

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        msg = f"predictions: {len(self.written)} written to {self.output_dir}"
        if self.kept:
            msg += f", {len(self.kept)} already there and kept (set overwrite=true to redo them)"
        pl_module.print(msg)


def wandb_logged_in() -> bool:
    """True when W&B credentials are present (env var or ~/.netrc), without prompting or network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class AutoWandbLogger(WandbLogger):
    """Lightning's W&B logger, offline unless the user is logged in (or ``WANDB_MODE`` says otherwise).

    Offline runs are kept under ``save_dir`` (``smml`` sets it to the run folder when the config leaves it
    out) and can be uploaded later with ``wandb sync <save_dir>/wandb/offline-run-*``.
    """

    def __init__(
        self,
        offline: bool | None = None,
        project: str = "smml-lightning",
        save_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        if offline is None:
            mode = os.environ.get("WANDB_MODE")
            offline = mode in ("offline", "disabled") if mode else not wandb_logged_in()
        save_dir = save_dir or "."
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(offline=offline, project=project, save_dir=save_dir, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # else W&B warns that the setting has no effect
            self._wandb_init.pop("anonymous", None)


class EpochSummary(pl.Callback):
    """One plain line per epoch (loss, validation Dice, throughput) for logs and non-interactive shells,
    where progress bars do not render. Validation figures appear only on epochs that validated (the
    trainer's metrics keep the last validation's values on the epochs between)."""

    _validated = False

    def _reset(self, trainer: pl.Trainer) -> None:
        self._started = time.time()
        self._step0 = trainer.global_step
        self._validated = False

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(trainer)  # a mid-epoch resume skips on_train_epoch_start for the resumed epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        seconds = time.time() - self._started
        steps = trainer.global_step - self._step0
        parts = [
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
            f"step {trainer.global_step}",
            f"{seconds / max(steps, 1):.2f} s/step",
        ]
        keys = ["train/loss_epoch"]
        if self._validated:
            keys += ["val/dice_mean", "val/dice_WT", "val/dice_TC", "val/dice_ET"]
        for key in keys:
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        rank_zero_info(" | ".join(parts))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target and renamed into place, so a kill
    during a save never leaves a truncated ``last.ckpt`` that a resume would trust."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class BestAndLastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is refreshed at every epoch end (or validation), as the
    name promises and resuming needs.

    Lightning 2.6 rewrites ``last.ckpt`` only when a top-k checkpoint is saved in the same step, so once
    the monitored score stops improving ``last.ckpt`` stays at the best epoch and a resume from it would
    silently lose every epoch since.
    """

    _last_step: int = -1

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        stale = self._last_step != trainer.global_step
        if self.save_last and stale and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch's validation, if any, has ended by now; epochs without one (``check_val_every_n_epoch``
        # > 1, or no validation data) save nothing in Lightning's callback, so refresh here too.
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)
