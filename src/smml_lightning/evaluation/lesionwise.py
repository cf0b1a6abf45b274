"""BraTS 2023 challenge scoring: lesion-wise Dice and HD95 per region, beside the legacy whole-case figures.

The rules are those of the organisers' BraTS 2023 lesion-wise metrics code (``get_LesionWiseResults``),
applied per region (WT, TC, ET) to binary masks:

1. Ground-truth lesions are the 26-connected components of the truth, merged when they fall into one
   26-connected component of the truth dilated ``dilation`` times with the 18-connected structuring
   element (so satellites close to a lesion count with it).
2. A predicted component (26-connected) is matched to a lesion when it touches that lesion dilated the
   same way; the lesion's Dice and HD95 are computed against the union of its matched components. A
   lesion with no match scores Dice 0 and HD95 :data:`MAX_HD95` (false negative).
3. Lesions of at most ``min_volume`` mm³ are left out of the scores and the counts, and their matched
   components are not false positives. Every predicted component that touches no dilated lesion is a
   false positive, whatever its size, and adds a Dice 0 / HD95 :data:`MAX_HD95` entry.
4. The case score is the mean over the kept lesions and the false positives; with neither (empty truth,
   empty prediction) it is Dice 1 and HD95 0.

HD95 follows the challenge's distance code (DeepMind's ``surface-distance``): surface elements are the
faces of the marching-cubes surface through the 2x2x2 neighbourhoods (areas from MONAI's table of that
surface), the exact Euclidean distance from each to the other surface (a k-d tree over the surface
points, faster than the distance transform the challenge code runs over the whole box, same values),
the percentile of each directed distance set weighted by surface area, and the larger of the two
directions; one empty side gives :data:`MAX_HD95`. This is not MONAI's voxel-surface
HD95 of :mod:`~smml_lightning.evaluation.metrics`, so the legacy HD95 here is the challenge's.

The legacy figures are whole-case Dice (1 for empty/empty), HD95 (0 for empty/empty), voxel-wise
sensitivity (1 for empty/empty) and specificity; ``grid_voxels`` lets a cropped case count the
background voxels outside its crop, so specificity is that of the original grid.

Components and dilations run on bounding boxes (the union of the masks, widened by the dilation), which
gives the same numbers as the whole volume and keeps a 240x240x155 case fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from monai.metrics.utils import ENCODING_KERNEL, _get_neighbour_code_to_normals_table
from scipy import ndimage
from scipy.spatial import cKDTree

from smml_lightning.data.labels import REGION_CLASSES, REGIONS
from smml_lightning.evaluation.metrics import bounding_box, widen

MAX_HD95 = 374.0
"""HD95 (mm) the challenge gives a missed or spurious lesion, and an HD95 with one side empty."""

STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
STRUCTURE_18 = ndimage.generate_binary_structure(3, 2)


@dataclass(frozen=True)
class ChallengeRules:
    """Per-challenge settings: dilation iterations of the truth, and the lesion volume (mm³) at or below
    which a ground-truth lesion is ignored."""

    name: str
    dilation: int
    min_volume: float


CHALLENGES: dict[str, ChallengeRules] = {
    "gli": ChallengeRules("BraTS-GLI", dilation=3, min_volume=50.0),
    "ssa": ChallengeRules("BraTS-SSA", dilation=3, min_volume=50.0),
    "ped": ChallengeRules("BraTS-PED", dilation=3, min_volume=50.0),
    "men": ChallengeRules("BraTS-MEN", dilation=1, min_volume=50.0),
    "met": ChallengeRules("BraTS-MET", dilation=1, min_volume=2.0),
}
"""Settings of the BraTS 2023 challenges, as in the organisers' lesion-wise metrics code."""

METRICS: tuple[str, ...] = (
    "lesion_dice",
    "lesion_hd95",
    "legacy_dice",
    "legacy_hd95",
    "sensitivity",
    "specificity",
    "n_tp",
    "n_fp",
    "n_fn",
    "gt_volume",
)
"""Fields of a :class:`RegionScores` row, in report order."""


@dataclass(frozen=True)
class RegionScores:
    """One region of one case: the challenge's lesion-wise and legacy figures."""

    lesion_dice: float
    lesion_hd95: float
    legacy_dice: float
    legacy_hd95: float
    sensitivity: float
    specificity: float
    n_tp: int
    n_fp: int
    n_fn: int
    gt_volume: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def challenge_rules(challenge: str | ChallengeRules) -> ChallengeRules:
    """Rules from a name (``gli``, ``BraTS-GLI``, any case) or rules passed through."""
    if isinstance(challenge, ChallengeRules):
        return challenge
    key = challenge.lower().removeprefix("brats-")
    if key not in CHALLENGES:
        raise ValueError(f"unknown challenge {challenge!r}; expected one of {sorted(CHALLENGES)}")
    return CHALLENGES[key]


@lru_cache(maxsize=16)
def _surface_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Area (mm²) of the surface inside each of the 256 2x2x2 neighbourhood codes, in float64."""
    normals = _get_neighbour_code_to_normals_table().cpu().numpy().astype(np.float64)
    scale = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    return np.linalg.norm(normals * scale, axis=-1).sum(axis=-1)


_CODE_WEIGHTS = np.asarray(ENCODING_KERNEL[3], dtype=np.uint8)


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every voxel corner (one more per axis than voxels): bit per voxel of its 2x2x2 block."""
    padded = np.pad(mask.astype(np.uint8), 1)
    n = [s + 1 for s in mask.shape]
    codes = np.zeros(n, dtype=np.uint8)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                codes += _CODE_WEIGHTS[dx, dy, dz] * padded[dx : dx + n[0], dy : dy + n[1], dz : dz + n[2]]
    return codes


def _percentile_distance(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Area-weighted percentile: the first distance (ascending) whose cumulative area share reaches it."""
    if len(distances) == 0:
        return math.inf
    order = np.lexsort((areas, distances))
    distances, areas = distances[order], areas[order]
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[min(index, len(distances) - 1)])


def surface_hd95(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], percent: float = 95.0
) -> float:
    """Challenge HD95 (mm) of two boolean masks; ``inf`` when exactly one is empty, and when both are."""
    both = pred | truth
    if not both.any():
        return math.inf
    box = bounding_box(both)
    spacing = tuple(float(s) for s in spacing)
    table = _surface_area_table(spacing)
    codes = [_neighbour_codes(m[box]) for m in (truth, pred)]
    borders = [(c != 0) & (c != 255) for c in codes]
    if not (borders[0].any() and borders[1].any()):
        return math.inf
    points = [np.argwhere(b) * np.asarray(spacing) for b in borders]
    areas = [table[c[b]] for c, b in zip(codes, borders)]
    trees = [cKDTree(p) for p in points]
    to_other = [trees[1 - i].query(points[i])[0] for i in (0, 1)]
    return max(_percentile_distance(to_other[i], areas[i], percent) for i in (0, 1))


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total if total else math.nan


def _finite(value: float) -> float:
    return MAX_HD95 if math.isinf(value) else value


def _union_slices(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))


def region_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    challenge: str | ChallengeRules = "gli",
    grid_voxels: int | None = None,
) -> RegionScores:
    """Lesion-wise and legacy scores of one region from boolean masks (see the module docstring).

    ``grid_voxels``: voxels of the original grid when ``pred``/``truth`` are a crop of it whose outside
    is background in both (only specificity depends on it); default ``pred.size``.
    """
    rules = challenge_rules(challenge)
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(
            f"region_scores: need two 3-D masks of one shape, got {pred.shape} and {truth.shape}"
        )
    voxel_volume = float(np.prod([float(s) for s in spacing]))
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    n_both = int(np.logical_and(pred, truth).sum())
    extra = (grid_voxels - pred.size) if grid_voxels is not None else 0
    tn = pred.size - n_pred - n_truth + n_both + extra
    fp_vox = n_pred - n_both
    sensitivity = 1.0 if n_pred == 0 and n_truth == 0 else n_both / (n_truth + np.finfo(float).tiny)
    specificity = tn / (tn + fp_vox + np.finfo(float).tiny)
    if n_pred == 0 and n_truth == 0:
        return RegionScores(1.0, 0.0, 1.0, 0.0, sensitivity, float(specificity), 0, 0, 0, 0.0)
    legacy_dice = 2.0 * n_both / (n_pred + n_truth)
    legacy_hd95 = _finite(surface_hd95(pred, truth, spacing))

    # Work on the union's bounding box widened by the dilation: same components, much smaller arrays.
    box = widen(bounding_box(pred | truth), rules.dilation + 1, pred.shape)
    p, t = pred[box], truth[box]
    pred_cc, _ = ndimage.label(p, structure=STRUCTURE_26)
    pred_boxes = ndimage.find_objects(pred_cc)
    if t.any():
        grown = ndimage.binary_dilation(t, structure=STRUCTURE_18, iterations=rules.dilation)
        grown_cc, _ = ndimage.label(grown, structure=STRUCTURE_26)
        lesions = np.where(t, grown_cc, 0)
    else:
        lesions = np.zeros_like(pred_cc)
    matched: set[int] = set()
    kept_dice: list[float] = []
    kept_hd95: list[float] = []
    n_tp = n_fn = 0
    for lesion_id, lesion_box in enumerate(ndimage.find_objects(lesions), start=1):
        if lesion_box is None:
            continue
        near = widen(lesion_box, rules.dilation, lesions.shape)
        lesion_near = lesions[near] == lesion_id
        reach = ndimage.binary_dilation(lesion_near, structure=STRUCTURE_18, iterations=rules.dilation)
        hits = [int(h) for h in np.unique(pred_cc[near][reach]) if h != 0]
        matched.update(hits)
        volume = int(lesion_near.sum()) * voxel_volume
        if volume <= rules.min_volume:
            continue
        if not hits:
            n_fn += 1
            kept_dice.append(0.0)
            kept_hd95.append(MAX_HD95)
            continue
        n_tp += 1
        sub = _union_slices([near] + [pred_boxes[h - 1] for h in hits])
        lesion_mask = lesions[sub] == lesion_id
        pred_mask = np.isin(pred_cc[sub], hits)
        kept_dice.append(_dice(pred_mask, lesion_mask))
        kept_hd95.append(_finite(surface_hd95(pred_mask, lesion_mask, spacing)))
    n_fp = sum(1 for i in range(1, len(pred_boxes) + 1) if i not in matched)
    entries = len(kept_dice) + n_fp
    lesion_dice = sum(kept_dice) / entries if entries else 1.0
    lesion_hd95 = (sum(kept_hd95) + n_fp * MAX_HD95) / entries if entries else 0.0
    return RegionScores(
        lesion_dice,
        lesion_hd95,
        legacy_dice,
        legacy_hd95,
        float(sensitivity),
        float(specificity),
        n_tp,
        n_fp,
        n_fn,
        n_truth * voxel_volume,
    )


def worst_scores(
    truth: np.ndarray, spacing: Sequence[float], challenge: str | ChallengeRules = "gli"
) -> RegionScores:
    """Scores of a missing prediction: Dice 0, HD95 :data:`MAX_HD95`, sensitivity and specificity 0, every
    kept ground-truth lesion a false negative (the challenge counts a missing case as its worst)."""
    rules = challenge_rules(challenge)
    truth = np.asarray(truth, dtype=bool)
    voxel_volume = float(np.prod([float(s) for s in spacing]))
    n_fn = 0
    if truth.any():
        grown = ndimage.binary_dilation(truth, structure=STRUCTURE_18, iterations=rules.dilation)
        grown_cc, _ = ndimage.label(grown, structure=STRUCTURE_26)
        sizes = np.bincount(np.where(truth, grown_cc, 0).ravel())[1:]
        n_fn = int(np.sum(sizes * voxel_volume > rules.min_volume))
    return RegionScores(0.0, MAX_HD95, 0.0, MAX_HD95, 0.0, 0.0, 0, 0, n_fn, float(truth.sum()) * voxel_volume)


def _labels(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def challenge_metrics(
    pred_labels: np.ndarray | torch.Tensor | None,
    truth_labels: np.ndarray | torch.Tensor,
    spacing: Sequence[float],
    challenge: str | ChallengeRules = "gli",
    grid_voxels: int | None = None,
) -> dict[str, dict[str, float]]:
    """:class:`RegionScores` as dicts for WT, TC and ET from internal label maps (1 NCR, 2 ED, 3 ET).

    ``pred_labels=None`` is a missing prediction, scored by :func:`worst_scores`.
    """
    truth = _labels(truth_labels)
    pred = None if pred_labels is None else _labels(pred_labels)
    if pred is not None and pred.shape != truth.shape:
        raise ValueError(f"challenge_metrics: prediction shape {pred.shape} != truth shape {truth.shape}")
    out = {}
    for region in REGIONS:
        classes = list(REGION_CLASSES[region])
        t = np.isin(truth, classes)
        if pred is None:
            out[region] = worst_scores(t, spacing, challenge).as_dict()
        else:
            out[region] = region_scores(np.isin(pred, classes), t, spacing, challenge, grid_voxels).as_dict()
    return out
