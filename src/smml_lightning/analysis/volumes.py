"""Over- or under-segmentation of quality-benchmark runs: predicted / true volume, precision and recall.

    smml analyze volumes runs/quality runs/quality/smml-seed0-steps1200 runs/quality-oracle/smml-seed0-steps1200

Dice alone cannot say whether a run loses by segmenting too much or too little; a loss that acts like a
class-balanced cross-entropy, for example, trades precision for recall on the small regions. Each run's
last checkpoint predicts the benchmark split's test cases (of the work folder's cache) from every
one-modality subset and from all four; voxels are pooled over cases, then the table is averaged over the
runs of a method (folder ``<method>-seed<k>-...``; runs of other work folders are kept apart).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..data.modalities import SUBSETS, subset_name
from .runs import (
    add_work_and_runs,
    benchmark_split,
    check_csv,
    load_run,
    predict,
    region_counts,
    write_csv,
)


def measure(cache_dir: Path, names: list[str], run_dir: Path, subset_ids: list[int]) -> pd.DataFrame:
    """One row per case, subset and region: ``pred``, ``true`` and ``both`` voxel counts."""
    (model, dtype), rows = load_run(run_dir), []
    for name in names:
        preds, truth = predict(model, dtype, cache_dir, name, subset_ids)
        for sid, pred in preds.items():
            for region, (p, t, both) in region_counts(pred, truth).items():
                rows.append(
                    {
                        "case": name,
                        "subset": subset_name(SUBSETS[sid]),
                        "modalities": sum(SUBSETS[sid]),
                        "region": region,
                        "pred": p,
                        "true": t,
                        "both": both,
                    }
                )
    return pd.DataFrame(rows)


def summarise(counts: pd.DataFrame) -> pd.DataFrame:
    """Volume ratio, precision and recall (%) per method, number of modalities and region: voxels pooled
    over a run's cases and subsets, then averaged over the method's runs (NaN where no run has a true voxel)."""
    pooled = counts.groupby(["method", "run", "modalities", "region"])[["pred", "true", "both"]].sum()
    true = pooled["true"].where(pooled["true"] > 0)  # no true voxel at all: volume and recall undefined
    ratios = pd.DataFrame(
        {
            "volume": 100 * pooled["pred"] / true,
            "precision": 100 * pooled["both"] / pooled["pred"].clip(lower=1),
            "recall": 100 * pooled["both"] / true,
        }
    )
    return ratios.groupby(["method", "modalities", "region"]).mean()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_work_and_runs(
        parser,
        "a quality.py --work folder: its cache and split give the cases",
        "run folders (with config.yaml and checkpoints/last.ckpt)",
    )


def run(args: argparse.Namespace) -> None:
    check_csv(args.csv)
    cache_dir = args.work / "cache"
    names = benchmark_split(cache_dir)["test"]
    subset_ids = [i for i, s in enumerate(SUBSETS) if sum(s) in (1, len(s))]
    frames = []
    for run_dir in args.runs:
        frame = measure(cache_dir, names, run_dir, subset_ids)
        frame.insert(0, "run", str(run_dir))
        frame.insert(0, "method", f"{run_dir.resolve().parent.name}/{run_dir.name.split('-seed')[0]}")
        frames.append(frame)
    counts = pd.concat(frames, ignore_index=True)
    write_csv(args.csv, counts)
    print(f"{len(names)} test cases; volume = predicted / true (%), voxels pooled over cases and subsets")
    print(summarise(counts).round(1).to_string())
