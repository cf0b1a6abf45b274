"""Writing synthetic cases in a real release's folder and file naming, never over existing files.

Both generators end here: the release-style case name, the BraTS-like affine, the per-layout file names
and label convention, and the check that refuses to touch any file already in the output folder unless
``overwrite`` is asked for. Each file is written to a temporary name beside its target and renamed into
place, so an interrupted run never leaves a truncated NIfTI under a release name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from smml_lightning.data.labels import to_release
from smml_lightning.data.layouts import LABEL_KEY, LAYOUT_CONVENTION, LAYOUTS, SUFFIXES
from smml_lightning.data.modalities import MODALITIES


def case_name(layout: str, index: int) -> str:
    """The release-style name of synthetic case ``index`` (0-based)."""
    names = {
        "brats2018": f"Brats18_SYN_{index + 1:03d}_1",
        "brats2020": f"BraTS20_Training_{index + 1:03d}",
        "brats2021": f"BraTS2021_{index:05d}",
        "brats2023": f"BraTS-GLI-{index:05d}-000",
    }
    return names[layout]


def file_name(layout: str, name: str, key: str) -> str:
    """File name of modality (or ``"seg"``) ``key`` of case ``name`` in ``layout``."""
    sep = "-" if layout == "brats2023" else "_"
    return f"{name}{sep}{SUFFIXES[layout][key]}.nii.gz"


def case_folder(out: Path, layout: str, index: int, grade: str | None) -> Path:
    """Folder of case ``index``: 2018 sorts cases into HGG/LGG, later releases keep one flat folder."""
    name = case_name(layout, index)
    return out / (grade or "HGG") / name if layout == "brats2018" else out / name


def case_files(out: Path, layout: str, index: int, grade: str | None) -> list[Path]:
    """Every file case ``index`` is written to (images and label)."""
    folder = case_folder(out, layout, index, grade)
    name = case_name(layout, index)
    return [folder / file_name(layout, name, key) for key in (*MODALITIES, LABEL_KEY)]


def check_layout(layout: str, n_cases: int, first: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    if n_cases < 1 or first < 0:
        raise ValueError(f"n_cases must be >= 1 and first >= 0, got n_cases={n_cases}, first={first}")


def refuse_existing(out: Path, layout: str, indices: Sequence[int]) -> None:
    """Raise ``FileExistsError`` naming the first file a run would replace.

    The grade of a 2018 case (its HGG/LGG folder) is known only once it is generated, so for 2018 both
    folders are checked. Any other existing file (not one of ours) in the output folder is left alone.
    """
    grades: tuple[str | None, ...] = ("HGG", "LGG") if layout == "brats2018" else (None,)
    for i in indices:
        for grade in grades:
            folder = case_folder(out, layout, i, grade)
            if folder.is_file():
                raise FileExistsError(f"{folder} exists and is a file; pass --overwrite true to replace it")
            for path in case_files(out, layout, i, grade):
                if path.exists() or path.is_symlink():
                    raise FileExistsError(
                        f"{path} already exists; pass --overwrite true to replace it "
                        f"(or write to another folder)"
                    )


def brats_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A BraTS-like affine: axes flipped in x and y (LPS voxel order), origin at the grid's corner."""
    affine = np.diag([-float(spacing[0]), -float(spacing[1]), float(spacing[2]), 1.0])
    affine[1, 3] = (shape[1] - 1) * spacing[1]
    return affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Save ``data`` as NIfTI (mm units) through a temporary file renamed into place."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_case(
    out: Path,
    layout: str,
    index: int,
    images: dict[str, np.ndarray],
    label: np.ndarray,
    grade: str,
    affine: np.ndarray,
) -> Path:
    """Write one case's images and internal labels (mapped to the layout's convention); return its folder."""
    paths = case_files(out, layout, index, grade if layout == "brats2018" else None)
    for m, path in zip(MODALITIES, paths):
        save_nifti(path, images[m], affine)
    save_nifti(paths[-1], to_release(label, LAYOUT_CONVENTION[layout]), affine)
    return paths[0].parent
