"""Train/val/test splits: split files checked against the cases at hand, and seeded k-fold splits.

The community reports BraTS 2018 over three random 199/29/57 splits and BraTS 2020 over 219/50/100;
reproducing a paper means using its split files, and a name that matches no case must stop the run
rather than silently shrink a split.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from smml_lightning.io import atomic_write_text

PARTS: tuple[str, ...] = ("train", "val", "test")

SplitSource = Path | str | Sequence[str] | None


def read_split_file(path: Path | str) -> list[str]:
    """Case names from a text file, one per line; blank lines and ``#`` comments are ignored.

    A line may be a path (``HGG/Brats18_2013_2_1``): its last component is the name.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} does not exist") from None
    names = []
    for line in lines:
        entry = line.split("#", 1)[0].strip().rstrip("/")
        if entry:
            names.append(entry.replace("\\", "/").rsplit("/", 1)[-1])
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"split file {path}: names listed twice: {dupes[:5]}")
    return names


def _few(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _names_of(source: SplitSource) -> tuple[list[str], str] | None:
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        return read_split_file(source), f"split file {source}"
    return list(source), "the given list"


def resolve_split(
    names_available: Iterable[str],
    train: SplitSource = None,
    val: SplitSource = None,
    test: SplitSource = None,
) -> dict[str, list[str]]:
    """Check split files (or name lists) against the available cases.

    Each part is a split-file path, a list of names or ``None``; a ``None`` train gets every
    available case not in val or test, other ``None`` parts are empty. Unknown names and cases in
    two parts raise ``ValueError`` naming the file and the names.
    """
    available = set(names_available)
    split: dict[str, list[str]] = {}
    origin: dict[str, str] = {}
    for part, source in zip(PARTS, (train, val, test)):
        got = _names_of(source)
        if got is None:
            continue
        names, where = got
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(
                f"{part} split ({where}) names {len(unknown)} case(s) not found among the "
                f"{len(available)} available: {_few(unknown)}"
            )
        split[part], origin[part] = names, where
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1 :]:
            shared = sorted(set(split.get(a, [])) & set(split.get(b, [])))
            if shared:
                raise ValueError(f"{a} ({origin[a]}) and {b} ({origin[b]}) share case(s): {_few(shared)}")
    if "train" not in split:
        taken = set(split.get("val", [])) | set(split.get("test", []))
        split["train"] = sorted(available - taken)
    return {part: list(split.get(part, [])) for part in PARTS}


def kfold_split(
    names: Iterable[str], n_folds: int = 5, fold: int = 0, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[str]]:
    """Fold ``fold`` of a seeded k-fold: that fold is test, ``val_fraction`` of the rest is val.

    Deterministic in ``(set of names, n_folds, seed)`` whatever the input order; parts are sorted.
    """
    pool = sorted(set(names))
    if n_folds < 2 or not 0 <= fold < n_folds:
        raise ValueError(f"need n_folds >= 2 and 0 <= fold < n_folds, got n_folds={n_folds}, fold={fold}")
    if len(pool) < n_folds:
        raise ValueError(f"cannot make {n_folds} folds from {len(pool)} case(s)")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(pool))
    folds = np.array_split(order, n_folds)
    rest = np.concatenate([f for i, f in enumerate(folds) if i != fold])
    n_val = int(round(val_fraction * len(rest)))
    return {
        "train": sorted(pool[i] for i in rest[n_val:]),
        "val": sorted(pool[i] for i in rest[:n_val]),
        "test": sorted(pool[i] for i in folds[fold]),
    }


def write_split(split: dict[str, list[str]], path: Path | str) -> Path:
    """Write a split atomically: a ``.json`` path gets one JSON file, any other path a folder of
    ``<part>.txt`` files that :func:`read_split_file` reads back."""
    path = Path(path)
    unknown = sorted(set(split) - set(PARTS))
    if unknown:
        raise ValueError(f"split parts must be among {list(PARTS)}, got {unknown}")
    if path.suffix == ".json":
        atomic_write_text(path, json.dumps({p: list(split.get(p, [])) for p in PARTS}, indent=1))
    else:
        for part in PARTS:
            atomic_write_text(path / f"{part}.txt", "".join(f"{n}\n" for n in split.get(part, [])))
    return path


def read_split(path: Path | str) -> dict[str, list[str]]:
    """Read what :func:`write_split` wrote (a JSON file or a folder of ``<part>.txt``)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {p: list(data.get(p, [])) for p in PARTS}
    return {p: read_split_file(path / f"{p}.txt") if (path / f"{p}.txt").is_file() else [] for p in PARTS}


def seeded_split(
    names: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """A random train/val/test split of ``names``, reproducible from ``seed``; each part sorted."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"data.val_fraction ({val_fraction}) and data.test_fraction ({test_fraction}) must be >= 0 and "
            "sum to less than 1"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    n_test = int(round(test_fraction * len(names)))
    n_val = int(round(val_fraction * len(names)))
    return {
        "test": sorted(shuffled[:n_test]),
        "val": sorted(shuffled[n_test : n_test + n_val]),
        "train": sorted(shuffled[n_test + n_val :]),
    }


def choose_split(
    names: Sequence[str],
    split: Path | str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """The train/val/test split of ``names`` as ``data.split``/``val_fraction``/``test_fraction``/``seed``
    define it: the split file (JSON or folder, see :func:`read_split`) checked against ``names``, else
    :func:`seeded_split`. The datamodule and ``smml priors`` both call it, so they cannot disagree."""
    if split is None:
        return seeded_split(names, val_fraction, test_fraction, seed)
    path = Path(split)
    if not path.exists():
        raise FileNotFoundError(f"split file {path} does not exist")
    try:
        return resolve_split(names, **read_split(path))
    except ValueError as err:  # also malformed JSON
        raise ValueError(f"split {path}: {err}") from err


def check_labeled_options(labeled_fraction: float, labeled_cases: Path | str | None) -> None:
    """Reject a labeled fraction outside ``(0, 1]`` or one given together with a labeled-cases file."""
    if not 0.0 < float(labeled_fraction) <= 1.0:
        raise ValueError(f"data.labeled_fraction must be in (0, 1], got {labeled_fraction}")
    if labeled_cases is not None and float(labeled_fraction) != 1.0:
        raise ValueError("give data.labeled_cases or data.labeled_fraction, not both")


def labeled_subset(
    train: Sequence[str],
    labeled_fraction: float = 1.0,
    labeled_cases: Path | str | None = None,
    seed: int = 0,
) -> list[str]:
    """The labeled cases of the training split ``train`` (semi-supervised training, ``data.labeled_*``).

    From ``labeled_cases`` (a text file, one name per line, every name a training case), else a
    ``labeled_fraction`` of ``train`` (at least one case) drawn with ``seed`` (``data.seed``); a fraction of
    1 keeps all of ``train``. Deterministic in (set of ``train``, fraction, seed). The datamodule and
    ``smml priors`` both call it, so the prior decoder is fitted on exactly the labels training may read.
    """
    check_labeled_options(labeled_fraction, labeled_cases)
    if labeled_cases is not None:
        path = Path(labeled_cases)
        if not path.is_file():
            raise FileNotFoundError(f"labeled-cases file {path} does not exist")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        unknown = sorted(set(names) - set(train))
        if unknown or not names:
            raise ValueError(
                f"labeled-cases file {path}: "
                + (
                    f"{len(unknown)} name(s) not in the training split, e.g. {unknown[:3]}"
                    if unknown
                    else "names no case"
                )
            )
        return sorted(set(names))
    if labeled_fraction >= 1.0:
        return list(train)
    count = max(1, round(labeled_fraction * len(train)))
    order = np.random.default_rng(seed).permutation(len(train))
    return sorted(sorted(train)[i] for i in order[:count])
