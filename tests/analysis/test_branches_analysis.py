"""`smml analyze branches`: per-class counts and statistics against hand computations, CMC's averaged
prediction against its branches, unlabeled samples skipped, and the subcommand on a tiny CMC run folder."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import prepared_cache
from smml_lightning.analysis.branches import branch_counts, class_counts, outputs, statistics, table
from smml_lightning.cli import lightning_main
from smml_lightning.cli import main as smml
from smml_lightning.models.cmc import CMCNet

REPO = Path(__file__).resolve().parents[2]


def test_counts_and_statistics_by_hand():
    # Four voxels: labels NCR, NCR, ED, background; the logits (2 at the predicted class, 0 elsewhere)
    # predict NCR, ED, ED, ET.
    label = torch.tensor([1, 1, 2, 0]).view(1, 1, 1, 1, 4)
    pred = torch.tensor([1, 2, 2, 3])
    logits = 2.0 * torch.nn.functional.one_hot(pred, 4).T.reshape(1, 4, 1, 1, 4).float()
    hi, lo = math.exp(2) / (math.exp(2) + 3), 1 / (math.exp(2) + 3)  # softmax at / off the predicted class
    counts = class_counts(logits.softmax(1), label)
    # per class: true voxels, of them predicted as the class, summed p(class) there, predicted voxels
    expected = [[2, 1, hi + lo, 1], [1, 1, hi, 2], [0, 0, 0, 1]]
    assert torch.allclose(counts, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    ncr, ed, et = statistics(counts)
    assert ncr == pytest.approx((0.5, (hi + lo) / 2, 0.5)) and ed == pytest.approx((1.0, hi, 2.0))
    assert all(math.isnan(v) for v in et)
    lines = table({"net": counts}).splitlines()
    assert lines[0] == (
        "| output | NCR recall | NCR mean p | NCR pred/true | ED recall | ED mean p | ED pred/true "
        "| ET recall | ET mean p | ET pred/true |"
    )
    assert lines[2] == f"| net | 0.50 | {(hi + lo) / 2:.2f} | 0.50 | 1.00 | {hi:.2f} | 2.00 | - | - | - |"


def test_counts_match_a_voxel_by_voxel_count():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, 3, generator=gen)
    label = torch.randint(0, 4, (2, 3, 3, 3), generator=gen)
    probs = logits.softmax(1)
    expected = [[0.0] * 4 for _ in range(3)]
    for b, z, y, x in torch.cartesian_prod(*(torch.arange(n) for n in (2, 3, 3, 3))).tolist():
        truth, guess = int(label[b, z, y, x]), int(logits[b, :, z, y, x].argmax())
        if truth:
            expected[truth - 1][0] += 1
            expected[truth - 1][1] += guess == truth
            expected[truth - 1][2] += float(probs[b, truth, z, y, x])
        if guess:
            expected[guess - 1][3] += 1
    assert torch.allclose(class_counts(probs, label), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    assert class_counts(probs, label[:, None]).equal(class_counts(probs, label))  # (B, 1, ...) labels too


def _tiny_cmc() -> SimpleNamespace:
    torch.manual_seed(0)
    net = CMCNet(base_width=2, num_stages=2).eval()
    return SimpleNamespace(inference_models=lambda: [net], _layout=lambda x: x)


def test_cmc_rows_are_the_branches_and_their_averaged_probabilities():
    image = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        probs = outputs(_tiny_cmc(), image)
    assert list(probs) == ["FLAIR", "T1ce", "T1", "T2", "mean of branches"]
    branches = torch.stack([probs[m] for m in ("FLAIR", "T1ce", "T1", "T2")])
    assert torch.allclose(probs["mean of branches"], branches.mean(0), atol=1e-6)
    assert not torch.allclose(branches[0], branches[1])  # the branches are each their own prediction


def test_unlabeled_samples_are_skipped():
    model, image = _tiny_cmc(), torch.randn(2, 4, 8, 8, 8)
    label = torch.randint(0, 4, (2, 1, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    unlabeled = label.clone()
    unlabeled[1] = -1  # as the semi-supervised stream marks an unlabeled sample's label
    mixed = {"image": image, "label": unlabeled, "labeled": torch.tensor([True, False])}
    alone = {"image": image[:1], "label": label[:1]}
    only_unlabeled = {"image": image[1:], "label": unlabeled[1:], "labeled": torch.tensor([False])}
    got = branch_counts(model, [mixed, only_unlabeled], torch.no_grad)
    want = branch_counts(model, [alone], torch.no_grad)
    assert list(got) == list(want) and all(torch.allclose(got[k], want[k]) for k in want)
    assert branch_counts(model, [only_unlabeled], torch.no_grad) == {}


def test_subcommand_on_a_tiny_semi_supervised_cmc_run(tmp_path, monkeypatch, capsys):
    prepared_cache(tmp_path, 8, seed=6)
    monkeypatch.chdir(REPO)
    cli = lightning_main(
        [
            "fit",
            "--config",
            "synthetic_cmc",
            "--config",
            "labeled/labeled_20",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.output_dir={tmp_path / 'out'}",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--checkpoint.dirpath={tmp_path / 'run' / 'checkpoints'}",
            "--model.init_args.network.init_args.base_width=2",
            "--data.patch_size=32",
            "--data.batch_size=2",
            "--data.samples_per_volume=1",
            "--data.queue_length=4",
            "--data.num_workers=0",
            "--data.val_fraction=0.25",
            "--data.test_fraction=0.25",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.precision=32-true",
        ]
    )
    run = Path(cli.trainer.default_root_dir)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    smml(["analyze", "branches", str(run), "--batches", "2"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{run} (CMC, 2 batches, 32-true, all modalities)"
    rows = [line.strip("|").split("|") for line in printed[3:]]
    assert [r[0].strip() for r in rows] == ["FLAIR", "T1ce", "T1", "T2", "mean of branches"]
    for row in rows:
        cells = [(k % 3, float(v)) for k, v in enumerate(row[1:]) if v.strip() != "-"]
        assert cells and all(v >= 0 for _, v in cells)
        assert all(v <= 1 for k, v in cells if k != 2)  # recall and mean p; pred/true may exceed 1
    with pytest.raises(SystemExit) as stop:
        smml(["analyze", "branches", str(run), "--batches", "0"])
    assert stop.value.code == 2
