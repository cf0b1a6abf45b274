"""Lesion-wise challenge scoring against the organisers' BraTS 2023 code and hand computations.

``data/lesionwise_reference.json`` holds the official code's figures for the cases of
``lesionwise_cases.py``; ``make_lesionwise_reference.py`` regenerates it (see its docstring). With
``SMML_BRATS23_PYTHON`` (an interpreter with the official code's dependencies) and
``SMML_BRATS23_METRICS`` (a checkout of the official code) set, the official code also runs live.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from lesionwise_cases import NAMES, case

from smml_lightning.evaluation.lesionwise import (
    MAX_HD95,
    METRICS,
    challenge_metrics,
    challenge_rules,
    region_scores,
    surface_hd95,
    worst_scores,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "lesionwise_reference.json").read_text())


def test_reference_has_provenance_and_every_case() -> None:
    provenance = REFERENCE["provenance"]
    assert provenance["commit"] and "BraTS-2023-Metrics" in provenance["source"]
    assert set(REFERENCE["cases"]) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_matches_official_code(name: str) -> None:
    truth, pred, spacing = case(name)
    for challenge, regions in REFERENCE["cases"][name].items():
        ours = challenge_metrics(pred, truth, spacing, challenge)
        for region, expected in regions.items():
            assert set(expected) == set(METRICS)
            for metric, value in expected.items():
                assert ours[region][metric] == pytest.approx(value, abs=1e-6), (challenge, region, metric)


@pytest.mark.skipif(
    not (os.environ.get("SMML_BRATS23_PYTHON") and os.environ.get("SMML_BRATS23_METRICS")),
    reason="set SMML_BRATS23_PYTHON and SMML_BRATS23_METRICS to run the official code live",
)
def test_official_code_live_reproduces_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    subprocess.run(
        [
            os.environ["SMML_BRATS23_PYTHON"],
            str(Path(__file__).parent / "make_lesionwise_reference.py"),
            "--metrics-dir",
            os.environ["SMML_BRATS23_METRICS"],
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    live = json.loads(out.read_text())["cases"]
    for name, challenges in REFERENCE["cases"].items():
        for challenge, regions in challenges.items():
            for region, values in regions.items():
                for metric, value in values.items():
                    assert live[name][challenge][region][metric] == pytest.approx(value, abs=1e-9)


def _cube(shape: tuple[int, int, int], lo: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return mask


def test_hand_counts_for_a_perfect_lesion_a_miss_and_a_spurious_piece() -> None:
    shape = (60, 40, 40)
    truth = _cube(shape, (5, 5, 5), 6) | _cube(shape, (40, 25, 25), 5)  # 216 and 125 voxels
    pred = _cube(shape, (5, 5, 5), 6) | _cube(shape, (40, 2, 2), 2)  # second lesion missed, one spurious
    got = region_scores(pred, truth, (1.0, 1.0, 1.0), "gli")
    assert (got.n_tp, got.n_fn, got.n_fp) == (1, 1, 1)
    assert got.lesion_dice == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert got.lesion_hd95 == pytest.approx((0.0 + MAX_HD95 + MAX_HD95) / 3)
    assert got.legacy_dice == pytest.approx(2 * 216 / (224 + 341))
    assert got.sensitivity == pytest.approx(216 / 341)
    assert got.gt_volume == 341


def test_empty_sides() -> None:
    shape = (20, 20, 20)
    empty, blob = np.zeros(shape, bool), _cube(shape, (5, 5, 5), 8)
    both = region_scores(empty, empty, (1, 1, 1))
    assert (both.lesion_dice, both.lesion_hd95, both.legacy_dice, both.legacy_hd95, both.sensitivity) == (
        1.0,
        0.0,
        1.0,
        0.0,
        1.0,
    )
    missed = region_scores(empty, blob, (1, 1, 1))
    assert (missed.lesion_dice, missed.lesion_hd95, missed.legacy_hd95, missed.n_fn) == (
        0.0,
        MAX_HD95,
        MAX_HD95,
        1,
    )
    spurious = region_scores(blob, empty, (1, 1, 1))
    assert (spurious.lesion_dice, spurious.lesion_hd95, spurious.n_fp, spurious.sensitivity) == (
        0.0,
        MAX_HD95,
        1,
        0.0,
    )
    assert math.isinf(surface_hd95(blob, empty, (1, 1, 1)))


def test_crop_with_grid_voxels_equals_whole_grid() -> None:
    truth, pred, spacing = case("random_1")
    whole = np.pad(truth, ((7, 3), (0, 5), (2, 2))), np.pad(pred, ((7, 3), (0, 5), (2, 2)))
    for region_classes in ((1, 2, 3), (3,)):
        t, p = np.isin(truth, region_classes), np.isin(pred, region_classes)
        wt, wp = np.isin(whole[0], region_classes), np.isin(whole[1], region_classes)
        cropped = region_scores(p, t, spacing, grid_voxels=wt.size)
        assert cropped == region_scores(wp, wt, spacing)
        assert region_scores(p, t, spacing).specificity < cropped.specificity


def test_surface_hd95_is_a_distance_in_mm() -> None:
    shape = (30, 30, 30)
    a, b = _cube(shape, (5, 5, 5), 10), _cube(shape, (8, 5, 5), 10)  # shifted 3 voxels along axis 0
    assert surface_hd95(a, a, (1, 1, 1)) == 0.0
    assert surface_hd95(a, b, (1, 1, 1)) == pytest.approx(3.0)
    assert surface_hd95(a, b, (2.0, 1, 1)) == pytest.approx(6.0)


def test_missing_prediction_is_worst_and_counts_kept_lesions() -> None:
    truth, _, spacing = case("below_threshold")
    for challenge, n_fn in (("gli", 1), ("met", 2)):  # the 27-voxel lesion counts only for MET
        worst = worst_scores(truth > 0, spacing, challenge)
        assert (worst.lesion_dice, worst.lesion_hd95, worst.legacy_dice, worst.n_fn) == (
            0.0,
            MAX_HD95,
            0.0,
            n_fn,
        )
        assert worst.n_fn == region_scores(np.zeros_like(truth, bool), truth > 0, spacing, challenge).n_fn
    assert challenge_metrics(None, truth, spacing)["WT"]["lesion_dice"] == 0.0


def test_challenge_names() -> None:
    assert challenge_rules("BraTS-MET").min_volume == 2.0
    assert challenge_rules("GLI").dilation == 3
    with pytest.raises(ValueError, match="unknown challenge 'xyz'"):
        challenge_rules("xyz")
