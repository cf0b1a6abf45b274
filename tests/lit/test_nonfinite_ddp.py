"""The non-finite-loss guard under DDP: a NaN on one rank makes every rank skip (or stop) together.

A 2-process CPU (gloo) fit of a tiny :class:`MissingModalityModule` whose loss is NaN on rank 1 only, at
step 1. With ``skip`` both ranks must skip that step and stay in step (same weights at the end, no
hang); with ``raise`` both must stop. Run as a script, this file is the training program Lightning's
DDP launcher starts once per rank.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from smml_lightning.lit.base import MissingModalityModule, NonFiniteLossError


class NanOnRankOne(MissingModalityModule):
    """A 1x1x1 convolution trained to output zero; rank 1's loss is NaN at step 1."""

    def __init__(self, out: Path, on_nonfinite: str) -> None:
        super().__init__(on_nonfinite=on_nonfinite, lr=0.1)
        self.out = out
        self.conv = nn.Conv3d(4, 1, 1)
        self.trained: list[int] = []

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        loss = self.conv(batch["image"]).pow(2).mean()
        if self.global_rank == 1 and self.global_step == 1:
            loss = loss * float("nan")
        return {"seg_fused": loss}

    def inference_models(self) -> list[nn.Module]:
        return [self.conv]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.before = [p.detach().clone() for p in self.parameters()]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if any(not torch.equal(a, p) for a, p in zip(self.before, self.parameters())):
            self.trained.append(batch_idx)

    def on_train_end(self) -> None:
        weights = [p.detach().flatten().tolist() for p in self.parameters()]
        (self.out / f"rank{self.global_rank}.json").write_text(
            json.dumps({"trained": self.trained, "weights": weights})
        )


def _run(out: Path, on_nonfinite: str) -> None:
    pl.seed_everything(0)
    images = [{"image": torch.randn(4, 2, 2, 2)} for _ in range(8)]  # 2 ranks x 4 steps of 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
    )
    try:
        trainer.fit(NanOnRankOne(out, on_nonfinite), DataLoader(images, batch_size=1))
    except NonFiniteLossError as err:
        (out / f"raised{trainer.global_rank}.txt").write_text(str(err))
        raise


@pytest.mark.slow  # two 2-process launches
def test_all_ranks_skip_or_stop_together(tmp_path):
    from conftest import run_script  # here, not at the top: this file also runs as a script

    skip = run_script(__file__, tmp_path / "skip", "skip")
    assert skip.returncode == 0, skip.stderr[-3000:]
    ranks = [json.loads((tmp_path / "skip" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["trained"] for r in ranks] == [[0, 2, 3], [0, 2, 3]]  # step 1 skipped on both ranks
    assert ranks[0]["weights"] == ranks[1]["weights"]  # and the replicas stayed in step
    assert "skipping step: non-finite loss term(s) ['seg_fused']" in skip.stderr

    stop = run_script(__file__, tmp_path / "raise", "raise")
    assert stop.returncode != 0
    said = {r: (tmp_path / "raise" / f"raised{r}.txt").read_text() for r in range(2)}
    assert "['seg_fused']" in said[1] and "step 1" in said[1]
    assert "on another rank" in said[0] and "step 1" in said[0]


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    _run(folder, sys.argv[2])
