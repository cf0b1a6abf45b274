"""The SAM-prior path's inputs in a quality benchmark: how good the cached priors are, and label priors.

    smml analyze priors score runs/quality
    smml analyze priors oracle runs/quality runs/quality-oracle --link single_branch
    python benchmarks/quality.py --methods SMML --work runs/quality-oracle ...

``score`` prints, per modality, the Dice of each cached prior's argmax against the label on WT, TC and
ET, over the benchmark split's training cases (the only priors training reads) and its test cases.

``oracle`` makes a new work folder from a benchmark's: raw and held-out data and the tiny SAM linked, the
cache copied, and every case's priors replaced by its one-hot label, for all four modalities. Priors are
read at training time only, so this is an upper bound no SAM could pass: if SMML trained on it does not
gain over the single branch, better SAM priors are not what would make it gain. Methods that do not read
priors are unaffected; ``--link`` reuses their finished runs (folders ``<method>-seed*``) instead of
training them again. The source folder is never written.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import cache
from ..data.labels import NUM_CLASSES, REGION_CLASSES, REGIONS
from ..data.modalities import MODALITIES, MODALITY_LABELS
from ..evaluation.metrics import dice
from .runs import benchmark_split


def score(cache_dir: Path, names: list[str]) -> pd.DataFrame:
    """Mean Dice (%) over ``names`` of each modality's prior argmax, rows modalities, columns regions."""
    totals = np.zeros((len(MODALITIES), len(REGIONS)))
    for name in names:
        label, prior = cache.load_label(cache_dir, name), cache.load_prior(cache_dir, name)
        if label is None or prior is None:
            raise ValueError(f"{cache.case_dir(cache_dir, name)}: needs label.npy and prior.npy to be scored")
        for m in range(len(MODALITIES)):
            guess = np.asarray(prior[m], dtype=np.float32).argmax(0)
            for r, region in enumerate(REGIONS):
                classes = list(REGION_CLASSES[region])
                totals[m, r] += dice(np.isin(guess, classes), np.isin(label, classes))
    return pd.DataFrame(
        100 * totals / max(len(names), 1),
        columns=list(REGIONS),
        index=[MODALITY_LABELS[m] for m in MODALITIES],
    )


def oracle(source: Path, target: Path, link: list[str]) -> Path:
    """A copy of the benchmark folder ``source`` at ``target`` whose priors are the labels; returns its cache."""
    if target.exists():
        raise FileExistsError(
            f"{target}: already exists; oracle makes a new work folder and overwrites nothing"
        )
    if not (source / "cache").is_dir():
        raise FileNotFoundError(f"{source}: no cache/ here; give the --work folder of a quality.py run")
    target.mkdir(parents=True)
    for entry in [source / "raw", source / "sam_tiny_random.pth", *sorted(source.glob("heldout-*"))]:
        (target / entry.name).symlink_to(entry.resolve())
    for method in link:
        for run_dir in sorted(source.glob(f"{method}-seed*")):
            (target / run_dir.name).symlink_to(run_dir.resolve())
    cache_dir = Path(shutil.copytree(source / "cache", target / "cache", symlinks=True))
    for name in cache.list_cases(cache_dir):
        label = cache.load_label(cache_dir, name, mmap=False)
        if label is None:
            continue
        onehot = np.arange(NUM_CLASSES)[:, None, None, None] == label
        cache.write_prior(cache_dir, name, np.repeat(onehot[None], len(MODALITIES), axis=0))
    return cache_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    scoring = sub.add_parser("score", help="Dice of the cached priors per modality and region")
    scoring.add_argument("work", type=Path, help="a quality.py --work folder")
    making = sub.add_parser("oracle", help="a new work folder whose priors are the labels, then scored")
    making.add_argument("work", type=Path, help="a quality.py --work folder (read only)")
    making.add_argument("target", type=Path, help="the new work folder (must not exist)")
    making.add_argument(
        "--link",
        nargs="*",
        default=[],
        metavar="METHOD",
        help="run-folder prefixes to reuse, e.g. single_branch",
    )


def run(args: argparse.Namespace) -> None:
    cache_dir = args.work / "cache" if args.command == "score" else oracle(args.work, args.target, args.link)
    split = benchmark_split(cache_dir)
    for part in ("train", "test"):
        print(f"{part} ({len(split[part])} cases): Dice (%) of each modality's prior")
        print(score(cache_dir, split[part]).round(1).to_string(), end="\n\n")
