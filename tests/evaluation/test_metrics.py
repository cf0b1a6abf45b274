"""Dice, HD95, ET post-processing and per-case metrics against medpy, scipy and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from smml_lightning.evaluation.metrics import case_metrics, dice, et_postprocess, hd95, image_diagonal

SPACING = (1.0, 0.7, 2.5)


def _blob(rng: np.random.Generator, shape: tuple[int, ...] = (20, 18, 14)) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma=2.0)
    return smooth > np.quantile(smooth, 0.8)


def _pairs(n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [(_blob(rng), _blob(rng)) for _ in range(n)]


def _scipy_hd(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], q: float) -> float:
    """Independent HD: 6-connected surfaces, exact EDT in mm, max of the two directed percentiles."""

    def surface(m: np.ndarray) -> np.ndarray:
        return m ^ ndimage.binary_erosion(m)

    sp, st = surface(pred), surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return max(np.percentile(to_truth, q), np.percentile(to_pred, q))


def test_dice_matches_medpy_on_random_shapes() -> None:
    for pred, truth in _pairs():
        assert dice(pred, truth) == pytest.approx(medpy_binary.dc(pred, truth), rel=1e-12)


def test_dice_empty_conventions() -> None:
    empty, one = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    assert dice(empty, empty) == 1.0
    assert dice(empty, one) == 0.0 and dice(one, empty) == 0.0
    assert dice(torch.from_numpy(one), torch.from_numpy(one)) == 1.0


def test_hd95_matches_an_independent_scipy_computation_with_anisotropic_spacing() -> None:
    for pred, truth in _pairs():
        assert hd95(pred, truth, SPACING) == pytest.approx(_scipy_hd(pred, truth, SPACING, 95), rel=1e-4)


def test_hd95_on_a_small_mask_in_a_large_grid_equals_monai_on_the_whole_grid() -> None:
    """hd95 scores the masks' bounding box: the same value as MONAI on the full grid, also where a mask
    touches the grid's edge (there the crop ends with the grid)."""
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(3)
    for corner in (False, True):
        pred, truth = np.zeros((60, 50, 40), bool), np.zeros((60, 50, 40), bool)
        start = 0 if corner else 20
        pred[start : start + 20, 10:28, 5:19] = _blob(rng)
        truth[start : start + 20, 12:30, 5:19] = _blob(rng)
        whole = compute_hausdorff_distance(
            pred[None, None], truth[None, None], include_background=True, percentile=95, spacing=list(SPACING)
        )
        assert hd95(pred, truth, SPACING) == pytest.approx(float(whole.item()), rel=1e-12)
        assert hd95(pred, truth, SPACING) == pytest.approx(_scipy_hd(pred, truth, SPACING, 95), rel=1e-4)


def test_hd95_against_medpy() -> None:
    for pred, truth in _pairs():
        ours = hd95(pred, truth, SPACING)
        # The full Hausdorff distance has one definition: both libraries must agree exactly.
        assert hd95(pred, truth, SPACING, percentile=100) == pytest.approx(
            medpy_binary.hd(pred, truth, voxelspacing=SPACING), rel=1e-5
        )
        # medpy pools both directions before the percentile, which cannot exceed the larger directed one.
        assert medpy_binary.hd95(pred, truth, voxelspacing=SPACING) <= ours + 1e-4


def test_hd95_by_hand_for_shifted_voxels() -> None:
    pred, truth = np.zeros((4, 4, 6), bool), np.zeros((4, 4, 6), bool)
    pred[1, 1, 1] = True
    truth[1, 1, 4] = True
    assert hd95(pred, truth, SPACING) == pytest.approx(3 * 2.5, rel=1e-6)
    truth[1, 1, 4], truth[3, 1, 1] = False, True
    assert hd95(pred, truth, SPACING) == pytest.approx(2 * 1.0, rel=1e-6)


def test_hd95_empty_conventions_and_diagonal() -> None:
    empty, one = np.zeros((10, 12, 4), bool), np.zeros((10, 12, 4), bool)
    one[2, 3, 1] = True
    assert hd95(empty, empty, SPACING) == 0.0
    diagonal = math.sqrt(10.0**2 + (12 * 0.7) ** 2 + (4 * 2.5) ** 2)
    assert hd95(empty, one, SPACING) == pytest.approx(diagonal)
    assert hd95(one, empty, SPACING) == pytest.approx(diagonal)
    assert image_diagonal((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.01)
    full = image_diagonal((240, 240, 155), SPACING)  # a crop scored with its original grid's diagonal
    assert hd95(empty, one, SPACING, empty_distance=full) == pytest.approx(full)
    assert hd95(one, one, SPACING, empty_distance=full) == 0.0
    rows = case_metrics(one.astype(np.uint8) * 3, np.zeros_like(one, np.uint8), SPACING, empty_distance=full)
    assert rows["ET"]["hd95"] == pytest.approx(full) and rows["ET_post"]["hd95"] == 0.0


def test_hd95_rejects_a_wrong_spacing_length() -> None:
    with pytest.raises(ValueError, match="spacing"):
        hd95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1.0, 1.0))


def _labels_with_et(n_et: int) -> np.ndarray:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 1
    labels.reshape(-1)[500 : 500 + n_et] = 3
    return labels


@pytest.mark.parametrize("n_et, kept", [(499, False), (500, True)])
def test_et_postprocess_threshold_edge(n_et: int, kept: bool) -> None:
    labels = _labels_with_et(n_et)
    before = labels.copy()
    out = et_postprocess(labels, min_voxels=500)
    assert np.array_equal(labels, before), "the input was modified"
    assert int((out == 3).sum()) == (n_et if kept else 0)
    tc = np.isin(labels, (1, 3))
    assert np.array_equal(np.isin(out, (1, 3)), tc), "TC must not change"
    if not kept:
        assert np.array_equal(out[labels == 3], np.ones(n_et, np.uint8))


def test_et_postprocess_keeps_torch_type() -> None:
    labels = torch.from_numpy(_labels_with_et(10).astype(np.int64))
    out = et_postprocess(labels)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    assert int((out == 3).sum()) == 0 and int((labels == 3).sum()) == 10


def test_case_metrics_regions_and_post_processing() -> None:
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:8, 2:8, 2:8] = 2
    truth[3:6, 3:6, 3:6] = 1  # TC = NCR only; the case has no ET
    pred = truth.copy()
    pred[4, 4, 4] = 3  # one false-positive ET voxel inside the core
    spacing = (1.0, 1.0, 2.0)
    m = case_metrics(torch.from_numpy(pred), truth, spacing)
    assert set(m) == {"WT", "TC", "ET", "ET_post"}
    assert m["WT"] == {"dice": 1.0, "hd95": 0.0}
    assert m["TC"] == {"dice": 1.0, "hd95": 0.0}
    assert m["ET"]["dice"] == 0.0
    assert m["ET"]["hd95"] == pytest.approx(image_diagonal(truth.shape, spacing))
    assert m["ET_post"] == {"dice": 1.0, "hd95": 0.0}


def test_case_metrics_agree_with_medpy_per_region() -> None:
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, (16, 14, 12)) * _blob(rng, (16, 14, 12))
    pred = rng.integers(0, 4, (16, 14, 12)) * _blob(rng, (16, 14, 12))
    m = case_metrics(pred, truth, SPACING, et_min_voxels=0)
    for region, classes in {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}.items():
        p, t = np.isin(pred, classes), np.isin(truth, classes)
        assert m[region]["dice"] == pytest.approx(medpy_binary.dc(p, t))
        assert m[region]["hd95"] == pytest.approx(_scipy_hd(p, t, SPACING, 95), rel=1e-4)
    assert m["ET_post"] == m["ET"]


def test_case_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="case_metrics"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), (1.0, 1.0, 1.0))
