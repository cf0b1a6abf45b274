"""Predictions back into the original grid as NIfTI, and quick-look overlays.

A prediction over the cropped cache grid is un-cropped into the original 240x240x155 (or whatever the
case had) grid, mapped to the release's label values (ET = 4 up to 2021, 3 for 2023) and saved with the
case's original header (affine, qform and sform with their codes), so it opens aligned with the raw images in any viewer and can be submitted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from smml_lightning.data.cache import CaseMeta, uncrop
from smml_lightning.data.labels import CLASS_NAMES, NUM_CLASSES, to_release
from smml_lightning.data.modalities import MODALITIES, MODALITY_LABELS, NUM_MODALITIES
from smml_lightning.data.resample import labels_to_native
from smml_lightning.data.validate import READ_ERRORS
from smml_lightning.io import atomic_path, atomic_write_bytes

# Header donors in order of preference: the label file shares the prediction's meaning and dtype.
_HEADER_KEYS: tuple[str, ...] = ("seg", *MODALITIES)
# Overlay colours per internal class (background transparent): NCR red, ED green, ET yellow.
_CLASS_COLOURS = [(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.55), (0.1, 0.8, 0.2, 0.45), (1.0, 0.9, 0.0, 0.6)]
_LEGEND = ", ".join(f"{name} {colour}" for name, colour in zip(CLASS_NAMES[1:], ("red", "green", "yellow")))


def _source_header(meta: CaseMeta) -> nib.Nifti1Header | None:
    """Header of the case's label file (else a modality file) when it is readable and on the case's grid."""
    for key in _HEADER_KEYS:
        path = meta.source.get(key)
        if path and Path(path).is_file():
            try:
                img: Any = nib.load(path)
            except READ_ERRORS:  # an unreadable donor is skipped; the next one may do
                continue
            same_grid = tuple(img.shape[:3]) == tuple(meta.original_shape) and np.allclose(
                img.affine, np.asarray(meta.affine), rtol=0.0, atol=1e-3
            )
            if same_grid:
                return nib.Nifti1Header.from_header(img.header)
    return None


def prediction_name(case: str, brats_names: bool = False) -> str:
    """File name of a case's segmentation: ``<case>_seg.nii.gz``, or ``<case>.nii.gz`` as the BraTS
    challenges expect their submissions."""
    return f"{case}.nii.gz" if brats_names else f"{case}_seg.nii.gz"


def _check_out(out_path: Path, overwrite: bool, suffixes: tuple[str, ...]) -> None:
    if not out_path.name.endswith(suffixes):
        raise ValueError(f"{out_path}: output name must end with one of {suffixes}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass overwrite=True to replace it")


def write_prediction(
    labels_cropped: np.ndarray, meta: CaseMeta, out_path: Path | str, overwrite: bool = False
) -> Path:
    """Save internal labels over the cached grid (or, for a resampled case, over the crop box in native
    voxels, as :func:`~smml_lightning.data.resample.logits_to_box` gives them) as a release-convention
    NIfTI in the original grid; labels on a resampled grid are put back by nearest neighbour."""
    out_path = Path(out_path)
    _check_out(out_path, overwrite, (".nii.gz", ".nii"))
    labels = np.asarray(labels_cropped)
    if labels.shape not in (meta.cropped_shape, meta.box_shape):
        raise ValueError(
            f"{meta.name}: prediction shape {labels.shape} does not match the crop box "
            f"{meta.crop_box} (cropped shape {meta.cropped_shape})"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"{meta.name}: prediction has values outside the internal classes 0..{NUM_CLASSES - 1}"
        )
    labels = labels.astype(np.uint8)
    native = uncrop(labels, meta) if labels.shape == meta.box_shape else labels_to_native(labels, meta)
    release = to_release(native, meta.convention)

    header = _source_header(meta)
    if header is not None:
        # The input's own header: its qform and sform, with their codes (scanner, aligned, MNI...).
        img = nib.Nifti1Image(release, None, header=header)
    else:  # no readable input file left: the cached affine, as both forms, "scanner" coded
        img = nib.Nifti1Image(release, np.asarray(meta.affine, dtype=np.float64))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0

    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(out_path, suffix=suffix) as tmp:  # nibabel picks compression by extension
        nib.save(img, tmp)
    return out_path


def _tumour_slices(labels: np.ndarray, n_slices: int) -> list[int]:
    """Axial (last-axis) indices spread evenly over the tumour's extent, or the middle when there is none."""
    depth = labels.shape[-1]
    present = np.flatnonzero((labels > 0).any(axis=(0, 1)))
    lo, hi = (present[0], present[-1]) if present.size else (depth // 2, depth // 2)
    # Interior points of an even split of [lo, hi], so slices avoid the tumour's thin ends.
    picks = np.linspace(lo, hi, n_slices + 2)[1:-1] if hi > lo else np.full(n_slices, lo)
    return sorted({int(round(v)) for v in picks})


def write_overlay(
    image_cropped: np.ndarray,
    labels_cropped: np.ndarray,
    available: Sequence[bool],
    out_png: Path | str,
    n_slices: int = 3,
    overwrite: bool = False,
) -> Path:
    """PNG grid: axial slices through the tumour (rows) by available modality (columns), labels overlaid."""
    out_png = Path(out_png)
    _check_out(out_png, overwrite, (".png",))
    image, labels = np.asarray(image_cropped), np.asarray(labels_cropped)
    if image.ndim != 4 or image.shape[0] != NUM_MODALITIES or image.shape[1:] != labels.shape:
        raise ValueError(
            f"{out_png.name}: image {image.shape} must be ({NUM_MODALITIES}, *labels.shape) "
            f"with labels {labels.shape}"
        )
    columns = [i for i, on in enumerate(available) if on]
    if len(available) != NUM_MODALITIES or not columns:
        raise ValueError(f"{out_png.name}: available must flag {NUM_MODALITIES} modalities, at least one on")
    if n_slices < 1:
        raise ValueError(f"{out_png.name}: n_slices must be at least 1, got {n_slices}")
    slices = _tumour_slices(labels, n_slices)

    fig = Figure(figsize=(2.6 * len(columns), 2.6 * len(slices) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(slices), len(columns), squeeze=False)
    cmap = ListedColormap(_CLASS_COLOURS)
    for r, k in enumerate(slices):
        for c, m in enumerate(columns):
            ax = axes[r, c]
            # Transpose so the first voxel axis runs left-right, origin at the bottom: radiological-ish view.
            ax.imshow(image[m, :, :, k].T, cmap="gray", origin="lower")
            ax.imshow(
                labels[:, :, k].T,
                cmap=cmap,
                vmin=0,
                vmax=NUM_CLASSES - 1,
                origin="lower",
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(MODALITY_LABELS[MODALITIES[m]])
            if c == 0:
                ax.set_ylabel(f"slice {k}")
    fig.suptitle(_LEGEND, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(out_png, lambda f: f.write(buf.getvalue()))
    return out_png
