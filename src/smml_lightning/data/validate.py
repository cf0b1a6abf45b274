"""Checks on a raw case before it is preprocessed, with errors that name the case, the file and the problem.

Everything is read once here (nibabel), and the arrays are handed on to ``prepare`` so no file is
decoded twice. A broken download (truncated gzip), a stray non-NIfTI file, misregistered modalities
or a label from the wrong release all stop here with a message a user can act on.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from smml_lightning.data.labels import CONVENTIONS
from smml_lightning.data.layouts import Case
from smml_lightning.data.modalities import MODALITIES

# What nibabel, gzip and zlib raise on files that are not NIfTI or end early.
READ_ERRORS = (ImageFileError, OSError, EOFError, zlib.error, ValueError)


class CaseError(ValueError):
    """A raw case that cannot be used; the message names the case, the file and the problem."""

    def __init__(self, case: str, file: Path | str | None, problem: str) -> None:
        self.case, self.file, self.problem = case, None if file is None else str(file), problem
        where = f", file {self.file}" if self.file is not None else ""
        super().__init__(f"case {case}{where}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str | None, str]]:
        # Keeps the three fields when the error crosses a process boundary (parallel prepare).
        return (CaseError, (self.case, self.file, self.problem))


@dataclass
class ValidatedCase:
    """A case's arrays as read from disk, checked for consistency.

    ``images`` holds float32 volumes keyed by canonical modality (``None`` where absent); ``label`` is
    the release's uint8 label map (release values, not internal ones) or ``None``.
    """

    case: Case
    images: dict[str, np.ndarray | None]
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        first = next(v for v in self.images.values() if v is not None)
        return tuple(int(s) for s in first.shape)  # type: ignore[return-value]

    @property
    def available(self) -> tuple[bool, ...]:
        return tuple(self.images[m] is not None for m in MODALITIES)


def _load(case: str, path: Path, as_label: bool) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read one NIfTI file fully: data, affine, voxel size; any read failure becomes a CaseError."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CaseError(case, path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
        data = (
            np.asanyarray(img.dataobj) if as_label else img.get_fdata(dtype=np.float32, caching="unchanged")
        )
    except CaseError:
        raise
    except FileNotFoundError:
        raise CaseError(case, path, "file does not exist") from None
    except READ_ERRORS as err:
        raise CaseError(
            case, path, f"unreadable, truncated or not a NIfTI file ({type(err).__name__}: {err})"
        ) from err
    # Some exports add a trailing singleton time axis; it carries nothing.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(case, path, f"expected a 3-D volume, got shape {tuple(data.shape)}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, np.asarray(img.affine, dtype=np.float64), zooms


def _reorient(data: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` with its voxel axes permuted and flipped to the orientation of ``ref_affine``, and the
    affine that goes with the result (nibabel's orientation tools; the voxels keep their positions)."""
    orientations = nib.orientations
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.io_orientation(ref_affine)
    )
    moved = orientations.apply_orientation(data, transform)
    return np.ascontiguousarray(moved), affine @ orientations.inv_ornt_aff(transform, data.shape)


def _check_label(case: Case, path: Path, data: np.ndarray) -> np.ndarray:
    values = CONVENTIONS[case.convention]
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise CaseError(case.name, path, "label has NaN or infinite voxels")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise CaseError(case.name, path, "label has non-integer values")
        data = rounded
    present = np.unique(data)
    bad = sorted(set(present.tolist()) - set(values))
    if bad:
        shown = [int(v) if float(v).is_integer() else v for v in bad[:10]]
        raise CaseError(
            case.name,
            path,
            f"label values {shown} are not in the {case.layout} "
            f"set {list(values)} (convention {case.convention})",
        )
    return data.astype(np.uint8)


def validate_case(
    case: Case, require_all: bool = True, require_label: bool = True, affine_atol: float = 1e-3
) -> ValidatedCase:
    """Load and check a case; raise :class:`CaseError` on the first problem found.

    ``require_all`` (training) demands all four modalities; otherwise at least one (prediction).
    Shapes and affines (within ``affine_atol`` mm) must agree across modalities and the label; a file
    whose voxel axes are ordered or directed differently (RAS+ against LPS+) is reoriented to the first
    modality's grid when it then coincides with it.
    """
    folder = next((p.parent for p in [*case.images.values(), case.label] if p is not None), None)
    missing = [m for m in MODALITIES if case.images.get(m) is None]
    if len(missing) == len(MODALITIES):
        raise CaseError(case.name, folder, "no modality file found")
    if require_all and missing:
        raise CaseError(case.name, folder, f"missing modality file(s) {missing}")
    if require_label and case.label is None:
        raise CaseError(case.name, folder, "missing label (seg) file")

    images: dict[str, np.ndarray | None] = {}
    ref: tuple[Path, tuple[int, ...], np.ndarray, tuple[float, ...]] | None = None

    def check_geometry(path: Path, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """``data`` on the reference grid: as it is, or reoriented when only the voxel axes' order or
        direction differ (the same grid stored RAS+ rather than LPS+, say)."""
        assert ref is not None
        ref_path, ref_shape, ref_affine, _ = ref
        codes, ref_codes = "".join(nib.aff2axcodes(affine)), "".join(nib.aff2axcodes(ref_affine))
        if codes != ref_codes:
            data, affine = _reorient(data, affine, ref_affine)
            if data.shape != ref_shape or not np.allclose(affine, ref_affine, rtol=0.0, atol=affine_atol):
                raise CaseError(
                    case.name,
                    path,
                    f"orientation {codes} differs from {ref_codes} of {ref_path.name}, "
                    "and the volumes do not coincide after reorienting: modalities are not "
                    "co-registered",
                )
            return data
        if data.shape != ref_shape:
            raise CaseError(
                case.name, path, f"shape {data.shape} differs from {ref_shape} of {ref_path.name}"
            )
        if not np.allclose(affine, ref_affine, rtol=0.0, atol=affine_atol):
            worst = float(np.abs(affine - ref_affine).max())
            raise CaseError(
                case.name,
                path,
                f"affine differs from that of {ref_path.name} by up to {worst:.4g} "
                f"(tolerance {affine_atol:g} mm): modalities are not co-registered",
            )
        return data

    for m in MODALITIES:
        path = case.images.get(m)
        if path is None:
            images[m] = None
            continue
        data, affine, zooms = _load(case.name, Path(path), as_label=False)
        if ref is None:
            ref = (Path(path), tuple(int(n) for n in data.shape), affine, zooms)
        else:
            data = check_geometry(Path(path), data, affine)
        if not np.isfinite(data).all():
            raise CaseError(case.name, path, f"{int((~np.isfinite(data)).sum())} NaN or infinite voxels")
        if not data.any():
            raise CaseError(case.name, path, f"modality {m} is all zeros")
        images[m] = data
    assert ref is not None

    label = None
    if case.label is not None:
        data, affine, _ = _load(case.name, Path(case.label), as_label=True)
        data = check_geometry(Path(case.label), data, affine)
        label = _check_label(case, Path(case.label), data)
    spacing = tuple(float(z) for z in ref[3])
    return ValidatedCase(case=case, images=images, label=label, affine=ref[2], spacing=spacing)  # type: ignore[arg-type]
