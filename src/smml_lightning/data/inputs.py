"""Raw cases to predict on: the content key of an input folder, and bad modalities treated as missing.

A prediction cache is named by :func:`input_key`, a hash of the input's absolute path and of every
source file's resolved path, size and modification time: two folders with the same name, or one folder
before and after a case was added, removed or rewritten, never share a cache, so a cache never holds a
case that is not in the input as it is now.

:func:`drop_bad_modalities` is the ``--missing_ok`` switch of ``smml predict``: a modality file that
is unreadable, all zero, non-finite or on another grid than the case's other modalities is dropped
from the case (the model then segments from the remaining ones), with a warning naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from smml_lightning.data.layouts import Case
from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.validate import READ_ERRORS, CaseError, validate_case


def input_key(root: Path | str, cases: Sequence[Case]) -> str:
    """A 16-hex-digit key of ``root``'s absolute path and of its cases' files (path, size, mtime)."""
    entries: list[list[object]] = [[str(Path(root).resolve())]]
    for case in sorted(cases, key=lambda c: c.name):
        for key, path in sorted(case.sources.items()):
            stat = Path(path).stat()
            entries.append([case.name, key, path, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def cache_name(root: Path | str, cases: Sequence[Case]) -> str:
    """Folder name of a prediction cache: the input folder's name (for people) and its key (for safety)."""
    return f"{Path(root).resolve().name}-{input_key(root, cases)}"


def _grid(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """Shape and (rounded) affine from a NIfTI header, or ``None`` when the header cannot be read."""
    try:
        img: Any = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape[:3])
        return shape, tuple(np.round(np.asarray(img.affine, dtype=np.float64), 3).ravel().tolist())
    except READ_ERRORS:
        return None


def drop_bad_modalities(case: Case) -> tuple[Case, dict[str, str]]:
    """``case`` without its unusable modality files, and why each was dropped (``{file: reason}``).

    Files whose header cannot be read go first; then those off the grid (shape and affine) that most
    of the case's modalities share (on a tie, the grid of the first modality in canonical order);
    then, one at a time, each file :func:`validate_case` rejects (truncated data, all zeros, NaN).
    Labels are not read. Raises :class:`CaseError` when no modality is left.
    """
    images = {m: case.images.get(m) for m in MODALITIES}
    dropped: dict[str, str] = {}
    grids = {m: _grid(Path(p)) for m, p in images.items() if p is not None}
    for m, grid in grids.items():
        if grid is None:
            dropped[str(images[m])] = "unreadable or not a NIfTI file"
            images[m] = None
    counts = Counter(g for g in grids.values() if g is not None)
    if counts:
        best = max(counts.values())
        majority = next(g for g in grids.values() if g is not None and counts[g] == best)
        for m, grid in grids.items():
            if grid is not None and grid != majority:
                dropped[str(images[m])] = (
                    f"on another grid (shape {grid[0]}) than the case's other "
                    f"modalities (shape {majority[0]}, or a different affine)"
                )
                images[m] = None
    current = dataclasses.replace(case, images=images, label=None)
    while True:
        if not any(p is not None for p in current.images.values()):
            raise CaseError(
                case.name,
                None,
                "no usable modality file: " + "; ".join(f"{Path(f).name}: {r}" for f, r in dropped.items())
                if dropped
                else "no modality file found",
            )
        try:
            validate_case(current, require_all=False, require_label=False)
            return current, dropped
        except CaseError as err:
            bad = next((m for m, p in current.images.items() if p is not None and str(p) == err.file), None)
            if bad is None:
                raise
            dropped[str(current.images[bad])] = err.problem
            current = dataclasses.replace(current, images={**current.images, bad: None})
