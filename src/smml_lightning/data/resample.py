"""Resampling a cropped case to a target voxel spacing, and back to its native grid.

``smml prepare --spacing S`` trains at a coarser grid than the scans' (as nnU-Net's target spacing):
after cropping, each case is resampled so that its voxels are ``S`` mm, images linearly (after z-scoring,
as nnU-Net normalises before resampling) and labels by nearest neighbour. The crop box stays in native
voxels and the cached grid covers exactly the same physical extent: voxel centres follow the
cell-centre convention (``align_corners=False``), so cached voxel ``u`` sits at native continuous index
``start + (u + 0.5) * box / grid - 0.5`` along each axis.

Back to the native grid: logits (or probabilities) are resampled linearly to the crop box before the
argmax (:func:`logits_to_native`), so class borders fall between native voxels rather than on the coarse
grid's blocks; a label map that exists only as labels is resampled by nearest neighbour
(:func:`labels_to_native`). Both then un-crop into the original shape, where the case's original affine
applies. torch's ``interpolate`` does the work: it is the same operation on CPU and GPU and fast on one
core for whole cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from smml_lightning.data.cache import CaseMeta, uncrop
from smml_lightning.data.labels import to_internal
from smml_lightning.data.layouts import LABEL_KEY


def grid_shape(
    box_shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, int, int]:
    """Shape of a box of ``box_shape`` voxels of ``spacing`` mm resampled to ``target`` mm voxels:
    the nearest whole number of target voxels per axis (at least one), as nnU-Net rounds it."""
    if len(box_shape) != 3 or len(spacing) != 3 or len(target) != 3:
        raise ValueError(f"grid_shape needs three sizes and spacings, got {box_shape}, {spacing}, {target}")
    if min(target) <= 0 or min(spacing) <= 0:
        raise ValueError(f"spacings must be positive, got native {tuple(spacing)} and target {tuple(target)}")
    out = [max(1, round(n * s / t)) for n, s, t in zip(box_shape, spacing, target)]
    return out[0], out[1], out[2]


def native_min_size(
    min_size: Sequence[int], spacing: Sequence[float], target: Sequence[float]
) -> tuple[int, ...]:
    """Native voxels a crop box needs per axis so that its resampled grid has at least ``min_size``."""
    return tuple(math.ceil(m * t / s - 1e-6) for m, s, t in zip(min_size, spacing, target))


def _interpolate(array: torch.Tensor, shape: Sequence[int], mode: str) -> torch.Tensor:
    """``(C, D, H, W)`` -> ``(C, *shape)``; float arrays only."""
    if tuple(array.shape[-3:]) == tuple(shape):
        return array
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(array[None], size=tuple(int(s) for s in shape), mode=mode, **kwargs)[0]


def resample_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Channels ``(C, D, H, W)`` resampled linearly to ``(C, *shape)`` (float32)."""
    return _interpolate(
        torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), shape, "trilinear"
    ).numpy()


def resample_labels(labels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """An integer label map ``(D, H, W)`` resampled by nearest neighbour (cell centres) to ``shape``."""
    source = torch.from_numpy(np.ascontiguousarray(labels).astype(np.float32))[None]
    return _interpolate(source, shape, "nearest-exact")[0].numpy().astype(labels.dtype)


def is_resampled(meta: CaseMeta) -> bool:
    """Whether the cached arrays of ``meta``'s case lie on a resampled grid."""
    return meta.native_spacing is not None


def resampled_spacing(meta: CaseMeta) -> tuple[float, float, float] | None:
    """The spacing (mm) of the case's cached arrays when ``prepare --spacing`` resampled them, else None."""
    if not is_resampled(meta):
        return None
    x, y, z = (float(v) for v in meta.spacing)
    return x, y, z


def logits_to_box(logits: torch.Tensor | np.ndarray, meta: CaseMeta) -> np.ndarray:
    """Internal labels (uint8) over the crop box in native voxels from per-class scores ``(C, *grid)``
    over the cached grid (logits or probabilities): resampled linearly, then the largest score wins.

    Metrics need no more than this: every labelled voxel lies inside the crop box, and outside it the
    prediction is background on the native grid too.
    """
    scores = torch.as_tensor(logits).float()
    if scores.dim() != 4 or tuple(scores.shape[1:]) != tuple(meta.cropped_shape):
        raise ValueError(
            f"{meta.name}: scores of shape {tuple(scores.shape)} do not match the cached grid "
            f"(C, {', '.join(map(str, meta.cropped_shape))})"
        )
    box = _interpolate(scores, meta.box_shape, "trilinear")
    return box.max(0).indices.to(torch.uint8).cpu().numpy()  # argmax; max().indices is faster on CPU


def logits_to_native(logits: torch.Tensor | np.ndarray, meta: CaseMeta) -> np.ndarray:
    """Native-grid internal labels (uint8, ``meta.original_shape``) from per-class scores ``(C, *grid)``
    over the cached grid: :func:`logits_to_box`, un-cropped (background outside the box)."""
    return uncrop(logits_to_box(logits, meta), meta)


def labels_to_native(labels: np.ndarray, meta: CaseMeta) -> np.ndarray:
    """A label map over the cached grid put on the native grid (nearest neighbour, then un-cropped)."""
    labels = np.asarray(labels)
    if labels.shape != tuple(meta.cropped_shape):
        raise ValueError(
            f"{meta.name}: labels of shape {labels.shape} do not match the cached grid "
            f"{tuple(meta.cropped_shape)}"
        )
    return uncrop(resample_labels(labels, meta.box_shape), meta)


def grid_affine(meta: CaseMeta) -> np.ndarray:
    """The affine of the cached grid (voxel -> scanner mm), from the case's original affine: where a
    cached array would have to sit to overlay the original scan."""
    affine = np.asarray(meta.affine, dtype=np.float64)
    step = np.array([b / g for b, g in zip(meta.box_shape, meta.cropped_shape)])
    start = np.array([a for a, _ in meta.crop_box], dtype=np.float64)
    to_native = np.eye(4)
    to_native[:3, :3] = np.diag(step)
    to_native[:3, 3] = start + 0.5 * step - 0.5
    return affine @ to_native


def native_label(meta: CaseMeta, box: bool = True) -> np.ndarray | None:
    """The case's reference label on its native grid (internal classes), read again from its source
    file: over the crop box (``box``, as :func:`logits_to_box` predicts) or the whole original grid.
    None for a case without a label."""
    path = meta.source.get(LABEL_KEY)
    if not meta.has_label or not path:
        return None
    from smml_lightning.data.prepare import crop  # prepare imports this module

    data = np.asarray(nib.load(path).dataobj)  # type: ignore[attr-defined]
    while data.ndim > 3 and data.shape[-1] == 1:  # a trailing time axis, as validation allows
        data = data[..., 0]
    if data.shape != tuple(meta.original_shape):
        raise ValueError(
            f"{path}: label shape {data.shape} differs from the prepared case's "
            f"{tuple(meta.original_shape)}; re-run `smml prepare`"
        )
    label = to_internal(np.rint(data).astype(np.uint8), meta.convention)
    return crop(label, meta.crop_box) if box else label
