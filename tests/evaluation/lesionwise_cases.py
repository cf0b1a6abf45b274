"""Multi-lesion label maps for the lesion-wise cross-check, shared by the test and the reference script.

Each case is a pure function of its name: a truth and a prediction in the BraTS 2023 label values
(1 NCR, 2 ED, 3 ET) on a small grid, and a voxel spacing. Named cases build one situation each
(matched, split, merged, missed, spurious and below-threshold lesions, empty sides); ``random_<k>``
cases draw several lesions with perturbed predictions. Only numpy and scipy are used, so the script
can run this in the reference interpreter as well.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SHAPE = (48, 44, 36)


def _ball(
    shape: tuple[int, ...],
    centre: tuple[float, ...],
    radius: float,
    scale: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    grid = np.indices(shape, sparse=True)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, scale)) <= radius**2


def _tumour(label: np.ndarray, centre: tuple[float, ...], radius: float, core: bool = True) -> None:
    """Paint a lesion: edema ball, with an NCR core and an ET rim inside it when ``core``."""
    label[_ball(label.shape, centre, radius)] = 2
    if core and radius >= 3:
        label[_ball(label.shape, centre, radius * 0.65)] = 3
        label[_ball(label.shape, centre, radius * 0.35)] = 1


def _named(name: str) -> tuple[np.ndarray, np.ndarray]:
    t = np.zeros(SHAPE, np.uint8)
    p = np.zeros(SHAPE, np.uint8)
    if name == "matched":
        _tumour(t, (20, 20, 18), 8)
        _tumour(p, (21, 19, 18), 7.5)
    elif name == "split":  # one lesion, predicted as two pieces
        _tumour(t, (24, 22, 18), 9)
        _tumour(p, (19, 22, 18), 5)
        _tumour(p, (30, 22, 18), 4)
    elif name == "merged":  # two lesions far apart, predicted as one elongated piece
        _tumour(t, (12, 22, 18), 5)
        _tumour(t, (36, 22, 18), 5)
        for x in range(12, 37):
            _tumour(p, (x, 22, 18), 4.5, core=x in (12, 36))
    elif name == "missed":
        _tumour(t, (14, 14, 12), 6)
        _tumour(t, (34, 30, 24), 6)
        _tumour(p, (14, 15, 12), 6)
    elif name == "spurious":
        _tumour(t, (14, 14, 12), 6)
        _tumour(p, (14, 14, 12), 6)
        _tumour(p, (36, 32, 26), 4)
        p[2:4, 40:42, 2:4] = 3  # a tiny spurious ET blob: counted whatever its size
    elif name == "satellite":  # a small lesion within the dilation of a big one: merged into it
        _tumour(t, (20, 20, 18), 7)
        _tumour(t, (30, 20, 18), 1.5, core=False)
        _tumour(p, (20, 20, 18), 7)
    elif name == "below_threshold":  # a lesion of <= 50 voxels, missed: ignored for GLI, counted for MET
        _tumour(t, (14, 14, 12), 7)
        t[36:39, 34:37, 26:29] = 3
        _tumour(p, (14, 14, 12), 7)
    elif name == "at_threshold":  # a missed lesion of exactly 50 voxels: ignored (the rule is "<= 50")
        _tumour(t, (14, 14, 12), 7)
        t[34:39, 30:35, 26:28] = 3
        _tumour(p, (14, 14, 12), 7)
    elif name == "empty_empty":
        pass
    elif name == "truth_empty":
        _tumour(p, (20, 20, 18), 5)
    elif name == "pred_empty":
        _tumour(t, (20, 20, 18), 5)
    else:
        raise KeyError(name)
    return t, p


def _random(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.zeros(SHAPE, np.uint8)
    p = np.zeros(SHAPE, np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        centre = tuple(float(rng.uniform(6, n - 6)) for n in SHAPE)
        radius = float(rng.uniform(1.5, 8))
        _tumour(t, centre, radius)
        if rng.random() < 0.8:  # detected, shifted and resized
            shifted = tuple(c + float(rng.normal(0, 1.5)) for c in centre)
            _tumour(p, shifted, radius * float(rng.uniform(0.6, 1.3)))
    for _ in range(int(rng.integers(0, 3))):  # spurious pieces
        _tumour(p, tuple(float(rng.uniform(4, n - 4)) for n in SHAPE), float(rng.uniform(1, 4)))
    noise = ndimage.gaussian_filter(rng.random(SHAPE), 1.5) > 0.62  # ragged edges on the prediction
    p[(p > 0) & noise] = 0
    return t, p


NAMES: tuple[str, ...] = (
    "matched",
    "split",
    "merged",
    "missed",
    "spurious",
    "satellite",
    "below_threshold",
    "at_threshold",
    "empty_empty",
    "truth_empty",
    "pred_empty",
    *(f"random_{k}" for k in range(6)),
)


def case(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(truth, pred, spacing)`` of a named case; ``random_4`` and ``random_5`` use anisotropic voxels."""
    truth, pred = _random(int(name.split("_")[1])) if name.startswith("random_") else _named(name)
    spacing = (1.0, 1.5, 2.0) if name in ("random_4", "random_5") else (1.0, 1.0, 1.0)
    return truth, pred, spacing
