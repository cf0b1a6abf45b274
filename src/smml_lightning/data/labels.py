"""Label conventions of the BraTS releases and the tumor regions built from them.

Internally every label map uses ``0`` background, ``1`` NCR/NET, ``2`` ED, ``3`` ET, so that class
indices are contiguous for the losses. Releases differ only in the ET value (4 up to 2021, 3 for the
2023 GLI release); :func:`to_internal` and :func:`to_release` translate at the edges of the package.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 4
CLASS_NAMES: tuple[str, ...] = ("background", "NCR", "ED", "ET")
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
# Internal class indices that make up each region.
REGION_CLASSES: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}

# Release label value of each internal class (index = internal class).
CONVENTIONS: dict[str, tuple[int, int, int, int]] = {
    "brats2018": (0, 1, 2, 4),  # 2018, 2019, 2020, 2021
    "brats2023": (0, 1, 2, 3),  # 2023 GLI
}


def _check_convention(convention: str) -> tuple[int, int, int, int]:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[convention]


def to_internal(label: np.ndarray, convention: str) -> np.ndarray:
    """Map a release label map to internal classes (uint8); raise on values outside the release's set."""
    values = _check_convention(convention)
    present = np.unique(label)
    bad = sorted(set(present.tolist()) - set(values))
    if bad:
        raise ValueError(f"label values {bad} are not in the {convention} set {list(values)}")
    lut = np.zeros(max(values) + 1, dtype=np.uint8)
    for internal, release in enumerate(values):
        lut[release] = internal
    return lut[label.astype(np.int64)]


def to_release(label: np.ndarray, convention: str) -> np.ndarray:
    """Map internal classes back to a release's label values (uint8)."""
    values = np.asarray(_check_convention(convention), dtype=np.uint8)
    return values[np.asarray(label, dtype=np.int64)]


def regions_from_labels(label: torch.Tensor) -> torch.Tensor:
    """One-hot regions ``[WT, TC, ET]`` from an internal label map.

    ``label`` has shape ``(B, 1, *spatial)`` or ``(B, *spatial)``; the result is bool ``(B, 3, *spatial)``.
    """
    if label.dim() >= 2 and label.shape[1] == 1:
        label = label[:, 0]
    return torch.stack(
        [torch.isin(label, torch.tensor(REGION_CLASSES[r], device=label.device)) for r in REGIONS], dim=1
    )
