"""ResumeState under DDP: every rank's random states are saved and each rank gets its own back.

A 2-process CPU (gloo) run of a tiny module whose only randomness is model-side (dropout on constant
data) and whose ranks' random states differ. Resuming from the checkpoint written after its first step
must give every rank the draws and the final weights of the uninterrupted run; restoring rank 0's
states on every rank (the old behaviour) would change rank 1's dropout and so the averaged gradients.
Run as a script, this file is the training program Lightning's DDP launcher starts once per rank.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from smml_lightning.lit.resume import ResumeState, rng_states


class Noisy(pl.LightningModule):
    """A linear layer behind dropout on constant inputs: the weights depend on the dropout draws only."""

    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.out = out
        self.layer = nn.Linear(8, 1)
        self.drop = nn.Dropout(0.5)
        self.draws: dict[int, float] = {}

    def setup(self, stage: str) -> None:
        torch.rand(self.global_rank + 1)  # from here on the ranks' states differ (restored on resume)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.draws[self.global_step] = torch.rand(()).item()
        return self.layer(self.drop(batch[0])).pow(2).mean()

    def on_train_end(self) -> None:
        if self.out is not None:
            (self.out / f"draws-{self.global_rank}.json").write_text(json.dumps(self.draws))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        # 2 steps per epoch on 2 ranks. A generator of its own, like the package's training loader: the
        # iterator a resumed run makes mid-epoch then draws nothing from the global generator.
        return DataLoader(TensorDataset(torch.ones(8, 8)), batch_size=2, generator=torch.Generator())


def fit(out: Path, devices: int, ckpt_path: str | None = None) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[
            ResumeState(),
            ModelCheckpoint(
                dirpath=out / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=True
            ),
        ],
    )
    trainer.fit(Noisy(out), ckpt_path=ckpt_path)
    return trainer


def _ddp(out: Path, ckpt: Path | None = None) -> None:
    from conftest import run_script  # here, not at the top: this file also runs as a script

    done = run_script(__file__, out, *([ckpt] if ckpt else []), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _draws(out: Path, rank: int) -> dict[str, float]:
    return json.loads((out / f"draws-{rank}.json").read_text())


@pytest.mark.slow  # two 2-process launches, ~30 s on a shared 2-core machine
def test_each_rank_resumes_its_own_random_states(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _ddp(full)
    ckpt = full / "ckpt" / "step=1.ckpt"  # written after the first of 4 steps, mid-epoch
    state = torch.load(ckpt, weights_only=True)["callbacks"]["ResumeState"]
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])
    assert torch.equal(state["rng_per_rank"][0]["torch"], state["rng"]["torch"])  # rank 0 wrote the file

    _ddp(resumed, ckpt)
    for rank in (0, 1):
        want = _draws(full, rank)
        assert _draws(resumed, rank) == {k: v for k, v in want.items() if int(k) >= 1}, f"rank {rank}"
    got = torch.load(resumed / "ckpt" / "last.ckpt", weights_only=True)
    want = torch.load(full / "ckpt" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 4
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6)

    # one process cannot take two ranks' states: it says so and keeps its seeded states
    with pytest.warns(UserWarning, match=r"random states of 2 rank\(s\) but this run has 1"):
        fit(tmp_path / "single", devices=1, ckpt_path=str(ckpt))


def test_world_size_change_keeps_the_seeded_states():
    callback = ResumeState()
    torch.manual_seed(1)
    saved = rng_states()
    torch.manual_seed(2)
    seeded = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"2 rank\(s\) but this run has 1.*keeping the seeded states"):
        callback.load_state_dict({"rng": saved, "world_size": 2, "rng_per_rank": [saved, saved]})
    assert torch.equal(torch.get_rng_state(), seeded)
    callback.load_state_dict({"rng": saved, "world_size": 1})
    assert torch.equal(torch.get_rng_state(), saved["torch"])


if __name__ == "__main__":
    fit(Path(sys.argv[1]), devices=2, ckpt_path=sys.argv[2] if len(sys.argv) > 2 else None)
