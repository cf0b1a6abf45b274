"""``last.ckpt`` must hold the latest weights even when the monitored score stops improving."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from smml_lightning.lit.callbacks import BestAndLastCheckpoint


class PeakingScore(BoringModel):
    """A validation score that improves once, then only gets worse."""

    def validation_step(self, batch, batch_idx):
        self.log("val/dice_mean", 1.0 if self.current_epoch == 0 else -float(self.current_epoch))


def fit(callback: ModelCheckpoint, root: Path, **trainer_args) -> None:
    args = dict(
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer = pl.Trainer(callbacks=[callback], **{**args, **trainer_args})
    trainer.fit(PeakingScore())


@pytest.mark.parametrize("cls,last_step", [(ModelCheckpoint, 2), (BestAndLastCheckpoint, 6)])
def test_last_checkpoint_follows_the_last_epoch(tmp_path, cls, last_step):
    """Lightning's own callback leaves ``last.ckpt`` at the best epoch (step 2): this is why ours exists."""
    fit(cls(dirpath=tmp_path, monitor="val/dice_mean", mode="max", save_last=True, filename="best"), tmp_path)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    best = torch.load(tmp_path / "best.ckpt", weights_only=False)
    assert (last["global_step"], best["global_step"]) == (last_step, 2)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]


@pytest.mark.parametrize(
    "trainer_args", [{"check_val_every_n_epoch": 2}, {"limit_val_batches": 0, "check_val_every_n_epoch": 4}]
)
def test_last_checkpoint_is_refreshed_in_epochs_without_validation(tmp_path, trainer_args):
    """Validation every other epoch (the configs validate every 4th) or never: Lightning's callback then
    saves nothing until training ends; ours refreshes ``last.ckpt`` at every epoch end."""
    steps = []

    class Spy(BestAndLastCheckpoint):
        def _save_last_checkpoint(self, trainer, monitor_candidates):
            super()._save_last_checkpoint(trainer, monitor_candidates)
            steps.append(trainer.global_step)

    fit(Spy(dirpath=tmp_path, monitor=None, save_last=True), tmp_path, **trainer_args)
    assert steps == [2, 4, 6]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6
