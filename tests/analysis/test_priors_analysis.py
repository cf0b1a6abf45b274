"""smml_lightning.analysis.priors: prior Dice against sums over the label written out here, and the label-prior
work folder (made through `smml analyze priors oracle`) leaving its source untouched."""

from pathlib import Path

import numpy as np
import pytest

from conftest import prepared_cache
from smml_lightning.analysis import priors as prior_benchmark
from smml_lightning.analysis import runs
from smml_lightning.cli import main as smml
from smml_lightning.data import cache


def hand_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * (pred & truth).sum() / total


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A quality.py-like work folder: 6 prepared cases with priors, a SAM file, a held-out set, a run."""
    root = tmp_path_factory.mktemp("work")
    cache_dir = prepared_cache(root, 6, seed=3)
    for name in cache.list_cases(cache_dir):
        label = np.asarray(cache.load_label(cache_dir, name))
        prior = np.zeros((4, 4, *label.shape), dtype=np.float32)
        prior[0] = np.arange(4)[:, None, None, None] == label  # exact
        prior[1, 0] = 1.0  # background everywhere
        prior[2] = np.arange(4)[:, None, None, None] == np.where(label == 3, 1, label)  # ET called NCR
        prior[3] = np.arange(4)[:, None, None, None] == np.where(label == 2, 0, label)  # edema missed
        cache.write_prior(cache_dir, name, prior)
    (root / "sam_tiny_random.pth").write_bytes(b"sam")
    (root / "heldout-6-2").mkdir()
    (root / "single_branch-seed0-steps3").mkdir()
    (root / "smml-seed0-steps3").mkdir()
    return root


def test_score_matches_sums_over_the_label(work):
    cache_dir = work / "cache"
    names = cache.list_cases(cache_dir)
    table = prior_benchmark.score(cache_dir, names)
    labels = [np.asarray(cache.load_label(cache_dir, n)) for n in names]
    assert any((lab == 3).any() for lab in labels) and any((lab == 2).any() for lab in labels)

    def mean(pred_of, region):
        classes = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}[region]
        return 100 * np.mean(
            [hand_dice(np.isin(pred_of(lab), classes), np.isin(lab, classes)) for lab in labels]
        )

    for region in ("WT", "TC", "ET"):
        assert table.loc["FLAIR", region] == pytest.approx(100.0)
        assert table.loc["T1ce", region] == pytest.approx(mean(np.zeros_like, region))
        assert table.loc["T1", region] == pytest.approx(mean(lambda lab: np.where(lab == 3, 1, lab), region))
        assert table.loc["T2", region] == pytest.approx(mean(lambda lab: np.where(lab == 2, 0, lab), region))
    assert table.loc["T1", "ET"] < 100.0 and table.loc["T2", "WT"] < 100.0


def test_benchmark_split_is_the_quality_split(work):
    split = runs.benchmark_split(work / "cache")
    assert sorted(split["train"] + split["test"]) == cache.list_cases(work / "cache") and not split["val"]
    assert len(split["test"]) == 2  # round(0.17 * 6) validation + round(0.17 * 6) test cases


def test_oracle_makes_label_priors_in_a_new_folder(work, tmp_path, capsys):
    source_priors = {
        n: (work / "cache" / n / "prior.npy").read_bytes() for n in cache.list_cases(work / "cache")
    }
    target = tmp_path / "oracle"
    smml(["analyze", "priors", "oracle", str(work), str(target), "--link", "single_branch"])

    assert (work / "cache").resolve() != (target / "cache").resolve()
    assert {n: (work / "cache" / n / "prior.npy").read_bytes() for n in source_priors} == source_priors
    for name in ("raw", "sam_tiny_random.pth", "heldout-6-2", "single_branch-seed0-steps3"):
        assert (target / name).is_symlink() and (target / name).resolve() == (work / name).resolve()
    assert not (target / "smml-seed0-steps3").exists()
    for name in source_priors:
        label = np.asarray(cache.load_label(target / "cache", name))
        prior = np.asarray(cache.load_prior(target / "cache", name))
        assert prior.shape == (4, 4, *label.shape)
        assert (prior.argmax(1) == label).all() and (prior.sum(1) == 1).all()
    printed = capsys.readouterr().out
    assert printed.count("100.0") == 2 * 4 * 3  # train and test, 4 modalities, 3 regions

    with pytest.raises(FileExistsError, match="oracle"):
        prior_benchmark.oracle(work, target, [])
