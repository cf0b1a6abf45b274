"""The preprocessed-case cache: one folder per case of memory-mappable arrays plus ``meta.json``.

Layout of ``<root>/<case>/``:

- ``image.npy``  float32 ``(4, D, H, W)``: z-scored modalities in canonical order; a modality the case
  lacks is all zeros (``meta.available`` says which).
- ``label.npy``  uint8 ``(D, H, W)``: internal classes 0..3 (absent for unlabeled cases).
- ``prior.npy``  float16 ``(4, C, D, H, W)``: SAM semantic priors, per modality and class (optional,
  written later by the prior export).
- ``meta.json``  written last: its presence marks the case complete.

Every file is written atomically (:mod:`smml_lightning.io`), so a crash never leaves a half-written
file under a final name. Spatial axes are the NIfTI voxel axes (i, j, k).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smml_lightning.io import atomic_save_npy, atomic_write_text

CACHE_VERSION = 1
META = "meta.json"


@dataclass
class CaseMeta:
    """What is needed to read a cached case and put predictions back into its original grid.

    ``crop_box`` holds ``[start, stop)`` per spatial axis in original voxel indices; a box may reach
    outside the original volume (negative start or stop past the end) when the volume was padded to
    reach the minimum size; :func:`uncrop` handles both. ``source_stat`` holds ``[size, mtime_ns]`` of
    each source file when the case was made, so that an edited source is noticed.

    ``spacing`` is the voxel size of the cached arrays. A case prepared with a target spacing
    (:mod:`smml_lightning.data.resample`) records its scan's own spacing in ``native_spacing`` and the
    cached grid's shape in ``grid_shape``; both are None for a case cached on its native grid.
    """

    name: str
    layout: str
    convention: str
    available: tuple[bool, ...]
    original_shape: tuple[int, int, int]
    affine: list[list[float]]
    spacing: tuple[float, float, float]
    crop_box: tuple[tuple[int, int], ...]
    source: dict[str, str] = field(default_factory=dict)
    source_stat: dict[str, list[int]] = field(default_factory=dict)
    has_label: bool = True
    native_spacing: tuple[float, float, float] | None = None
    grid_shape: tuple[int, int, int] | None = None
    version: int = CACHE_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseMeta:
        data = dict(data)
        data["available"] = tuple(bool(v) for v in data["available"])
        data["original_shape"] = tuple(int(v) for v in data["original_shape"])
        data["spacing"] = tuple(float(v) for v in data["spacing"])
        data["crop_box"] = tuple((int(a), int(b)) for a, b in data["crop_box"])
        if data.get("native_spacing") is not None:
            data["native_spacing"] = tuple(float(v) for v in data["native_spacing"])
        if data.get("grid_shape") is not None:
            data["grid_shape"] = tuple(int(v) for v in data["grid_shape"])
        return cls(**data)

    @property
    def box_shape(self) -> tuple[int, ...]:
        """Size of the crop box in native voxels."""
        return tuple(b - a for a, b in self.crop_box)

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        """Shape of the cached arrays: the crop box's, or the resampled grid's."""
        return tuple(self.grid_shape) if self.grid_shape is not None else self.box_shape


def case_dir(root: Path | str, name: str) -> Path:
    return Path(root) / name


def is_complete(root: Path | str, name: str) -> bool:
    return (case_dir(root, name) / META).is_file()


def write_case(root: Path | str, meta: CaseMeta, image: np.ndarray, label: np.ndarray | None) -> Path:
    """Write one case; ``meta.json`` goes last so a partial case is never taken for a finished one."""
    d = case_dir(root, meta.name)
    (d / META).unlink(missing_ok=True)  # a rewrite first un-marks the case
    if image.ndim != 4 or image.shape[1:] != meta.cropped_shape:
        raise ValueError(f"{meta.name}: image shape {image.shape} does not match crop box {meta.crop_box}")
    atomic_save_npy(d / "image.npy", image.astype(np.float32, copy=False))
    if label is not None:
        if label.shape != image.shape[1:]:
            raise ValueError(f"{meta.name}: label shape {label.shape} != image shape {image.shape[1:]}")
        atomic_save_npy(d / "label.npy", label.astype(np.uint8, copy=False))
    atomic_write_text(d / META, json.dumps(asdict(meta), indent=1))
    return d


def list_cases(root: Path | str) -> list[str]:
    """Names of the complete cases under ``root``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cache folder {root} does not exist: run `smml prepare` first")
    return sorted(p.parent.name for p in root.glob(f"*/{META}"))


def load_meta(root: Path | str, name: str) -> CaseMeta:
    path = case_dir(root, name) / META
    try:
        return CaseMeta.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: case {name!r} is not in the cache (or was never finished)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable case metadata ({err}); re-run `smml prepare`") from err


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"case {path.parent.name}: {path} is truncated or unreadable ({err}); re-run "
            "`smml prepare` on this cache to redo the case"
        ) from err


def _array_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
        return shape, dtype, f.tell()


def check_case(root: Path | str, name: str) -> None:
    """Raise ``ValueError`` naming the case and file (and saying to re-run ``smml prepare``) when a cached
    case's metadata or arrays are unreadable, cut short or of the wrong shape. Reads headers only, so a
    whole cache is checked in moments before training or testing starts."""
    meta = load_meta(root, name)
    arrays = {"image.npy": (4, *meta.cropped_shape), "label.npy": meta.cropped_shape}
    for file, shape in arrays.items():
        path = case_dir(root, name) / file
        if file == "label.npy" and not meta.has_label and not path.exists():
            continue
        try:
            found, dtype, offset = _array_header(path)
            size = path.stat().st_size
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(
                f"case {name}: {path} is unreadable ({err}); re-run `smml prepare` on this "
                "cache to redo the case"
            ) from err
        expected = offset + int(np.prod(found)) * dtype.itemsize
        if tuple(found) != tuple(shape) or size < expected:
            problem = (
                f"holds shape {tuple(found)}, expected {tuple(shape)}"
                if tuple(found) != tuple(shape)
                else f"is truncated ({size} of {expected} bytes)"
            )
            raise ValueError(
                f"case {name}: {path} {problem}; re-run `smml prepare` on this cache to redo the case"
            )


def load_image(root: Path | str, name: str, mmap: bool = True) -> np.ndarray:
    return _load(case_dir(root, name) / "image.npy", mmap)


def load_label(root: Path | str, name: str, mmap: bool = True) -> np.ndarray | None:
    path = case_dir(root, name) / "label.npy"
    return _load(path, mmap) if path.is_file() else None


def has_prior(root: Path | str, name: str) -> bool:
    return (case_dir(root, name) / "prior.npy").is_file()


def load_prior(root: Path | str, name: str, mmap: bool = True) -> np.ndarray | None:
    path = case_dir(root, name) / "prior.npy"
    return _load(path, mmap) if path.is_file() else None


def write_prior(root: Path | str, name: str, prior: np.ndarray) -> None:
    """Store a case's priors ``(4, C, D, H, W)`` (as float16), aligned with its cached image."""
    meta = load_meta(root, name)
    if prior.ndim != 5 or prior.shape[2:] != meta.cropped_shape:
        raise ValueError(
            f"{name}: prior shape {prior.shape} does not match cached shape {meta.cropped_shape}"
        )
    atomic_save_npy(case_dir(root, name) / "prior.npy", prior.astype(np.float16))


def uncrop(array: np.ndarray, meta: CaseMeta, fill: float = 0) -> np.ndarray:
    """Put an array over the crop box (``(..., D, H, W)``, native voxels) back into the original grid.

    An array over a resampled case's cached grid goes through
    :func:`smml_lightning.data.resample.logits_to_native` (or ``labels_to_native``) instead.
    """
    if tuple(array.shape[-3:]) != tuple(meta.box_shape):
        raise ValueError(
            f"{meta.name}: array of shape {array.shape} does not cover the crop box "
            f"{meta.crop_box} (native shape {meta.box_shape})"
            + ("; resample it to the native grid first" if meta.grid_shape is not None else "")
        )
    lead = array.shape[:-3]
    out = np.full(lead + tuple(meta.original_shape), fill, dtype=array.dtype)
    src, dst = [], []
    for (start, stop), size in zip(meta.crop_box, meta.original_shape):
        lo, hi = max(start, 0), min(stop, size)
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    to: tuple[Any, ...] = (Ellipsis, *dst)
    source: tuple[Any, ...] = (Ellipsis, *src)
    out[to] = array[source]
    return out


def mark_done(folder: Path | str, info: dict[str, Any]) -> None:
    """Mark a pipeline step's output folder finished (an atomic ``.done`` JSON with what was made)."""
    atomic_write_text(Path(folder) / ".done", json.dumps(info, indent=1))


def is_done(folder: Path | str) -> bool:
    return (Path(folder) / ".done").is_file()
