"""Discovery of raw BraTS releases on disk: which files make up which case.

Each release names its files differently (see ``/work/shared/methods.md``); discovery turns any of
them into :class:`Case` records keyed by the canonical modality names of
:data:`~smml_lightning.data.modalities.MODALITIES`, so nothing downstream cares about the release.
Discovery only looks at names; whether the files are readable and consistent is ``validate``'s job.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from smml_lightning.data.modalities import MODALITIES

LAYOUTS: tuple[str, ...] = ("brats2018", "brats2020", "brats2021", "brats2023")

LABEL_KEY = "seg"

# File-name suffix of each canonical modality (and the label) per layout.
SUFFIXES: dict[str, dict[str, str]] = {
    "brats2018": {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2", LABEL_KEY: "seg"},
    "brats2020": {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2", LABEL_KEY: "seg"},
    "brats2021": {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2", LABEL_KEY: "seg"},
    "brats2023": {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w", LABEL_KEY: "seg"},
}

# Label convention (a key of labels.CONVENTIONS) of each layout: only 2023 moved ET from 4 to 3.
LAYOUT_CONVENTION: dict[str, str] = {
    "brats2018": "brats2018",
    "brats2020": "brats2018",
    "brats2021": "brats2018",
    "brats2023": "brats2023",
}

# Case-name pattern and the separator before the suffix, per layout.
_CASE_PATTERNS: dict[str, tuple[str, str]] = {
    "brats2018": (r"Brats18_[A-Za-z0-9]+_[A-Za-z0-9]+_\d+", "_"),
    "brats2020": (r"BraTS20_(?:Training|Validation|Testing)_\d+", "_"),
    "brats2021": (r"BraTS2021_\d+", "_"),
    "brats2023": (r"BraTS-[A-Z]+-\d+-\d+", "-"),
}

_EXAMPLES: dict[str, str] = {
    "brats2018": "HGG/Brats18_2013_2_1/Brats18_2013_2_1_flair.nii.gz",
    "brats2020": "BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz",
    "brats2021": "BraTS2021_00000/BraTS2021_00000_flair.nii.gz",
    "brats2023": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
}


def _file_regex(layout: str) -> re.Pattern[str]:
    case, sep = _CASE_PATTERNS[layout]
    suffixes = "|".join(sorted(set(SUFFIXES[layout].values()), key=len, reverse=True))
    # Suffix and extension in any case (``_FLAIR.nii.gz``, ``.NII``): some exports upper-case them.
    return re.compile(rf"^({case}){re.escape(sep)}((?i:{suffixes}))(?i:\.nii(?:\.gz)?)$")


_REGEXES: dict[str, re.Pattern[str]] = {layout: _file_regex(layout) for layout in LAYOUTS}


@dataclass
class Case:
    """One raw case: its files by canonical modality (``None`` where the file is absent)."""

    name: str
    layout: str
    convention: str
    images: dict[str, Path | None] = field(default_factory=dict)
    label: Path | None = None

    @property
    def available(self) -> tuple[bool, ...]:
        """Which modalities have a file, in canonical order."""
        return tuple(self.images.get(m) is not None for m in MODALITIES)

    @property
    def sources(self) -> dict[str, str]:
        """Absolute paths of the present files, keyed by modality or ``seg``; recorded in the cache."""
        paths = {m: p for m, p in self.images.items() if p is not None}
        if self.label is not None:
            paths[LABEL_KEY] = self.label
        return {k: str(Path(p).resolve()) for k, p in paths.items()}


def _nifti_files(root: Path) -> list[Path]:
    """All NIfTI files under ``root`` (following symlinked folders), hidden files excluded.

    Hidden files are skipped because copies from macOS leave ``._<name>.nii.gz`` resource forks
    beside the real files, which would otherwise look like duplicates.
    """
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and f.lower().endswith((".nii", ".nii.gz")):
                found.append(Path(folder) / f)
    return found


def _match(path: Path, layouts: tuple[str, ...]) -> tuple[str, str, str] | None:
    """``(layout, case name, suffix)`` of a file name, or ``None`` if no layout names it."""
    for layout in layouts:
        m = _REGEXES[layout].match(path.name)
        if m:
            return layout, m.group(1), m.group(2).lower()
    return None


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def detect_layout(root: Path | str) -> str:
    """The single layout whose naming the NIfTI files under ``root`` follow."""
    return _scan(Path(root), LAYOUTS)[0]


def _scan(root: Path, layouts: tuple[str, ...]) -> tuple[str, list[tuple[Path, str, str]], list[Path]]:
    """Classify the files under ``root``: the layout, its matched files, the unmatched NIfTI files."""
    if not root.is_dir():
        raise ValueError(f"{root}: data root is not a folder (expected a BraTS release or one case folder)")
    files = _nifti_files(root)
    expected = "; ".join(_EXAMPLES[layout] for layout in layouts)
    if not files:
        entries = sorted(p.name for p in root.iterdir())
        raise ValueError(
            f"{root}: no .nii/.nii.gz files found (expected files like {expected}); "
            f"found: {_few(entries) if entries else 'an empty folder'}"
        )
    by_layout: dict[str, list[tuple[Path, str, str]]] = {}
    unmatched = []
    for path in files:
        hit = _match(path, layouts)
        if hit is None:
            unmatched.append(path)
        else:
            by_layout.setdefault(hit[0], []).append((path, hit[1], hit[2]))
    if not by_layout:
        raise ValueError(
            f"{root}: no file follows a known BraTS naming (expected files like {expected}); "
            f"found: {_few([str(p.relative_to(root)) for p in files])}"
        )
    if len(by_layout) > 1:
        mixed = "; ".join(
            f"{layout}: {_few([p.name for p, _, _ in hits], 2)}" for layout, hits in by_layout.items()
        )
        raise ValueError(
            f"{root}: files of several layouts are mixed ({mixed}); point at one release "
            "or pass layout= explicitly"
        )
    ((layout, hits),) = by_layout.items()
    return layout, hits, unmatched


def discover(root: Path | str, layout: str = "auto") -> list[Case]:
    """Find the cases of a raw BraTS release (or of one case folder) under ``root``, sorted by name.

    ``layout`` is one of :data:`LAYOUTS` or ``"auto"`` (detected from the file names). Modality files
    that are absent are recorded as ``None``. A label whose name follows no release but sits alone in
    a case folder with ``seg`` in its name is taken as that case's label (BraTS 2020 case 355 ships
    ``W39_1998.09.19_Segm.nii``).
    """
    root = Path(root)
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {list(LAYOUTS)}")
    layout, hits, unmatched = _scan(root, LAYOUTS if layout == "auto" else (layout,))
    key_of_suffix = {suffix: key for key, suffix in SUFFIXES[layout].items()}
    files: dict[str, dict[str, Path]] = {}
    folders: dict[str, Path] = {}
    for path, name, suffix in hits:
        if name in folders and folders[name] != path.parent:
            raise ValueError(f"duplicate case {name!r}: found in {folders[name]} and in {path.parent}")
        folders[name] = path.parent
        key = key_of_suffix[suffix]
        previous = files.setdefault(name, {}).get(key)
        if previous is not None:
            raise ValueError(f"case {name!r}: two files for {key}: {previous} and {path}")
        files[name][key] = path
    stray_labels: dict[Path, list[Path]] = {}
    for path in unmatched:
        if "seg" in path.name.lower():
            stray_labels.setdefault(path.parent, []).append(path)
    cases = []
    for name in sorted(files):
        found = files[name]
        label = found.get(LABEL_KEY)
        strays = stray_labels.get(folders[name], [])
        if label is None and len(strays) == 1:
            label = strays[0]
        cases.append(
            Case(
                name=name,
                layout=layout,
                convention=LAYOUT_CONVENTION[layout],
                images={m: found.get(m) for m in MODALITIES},
                label=label,
            )
        )
    return cases
