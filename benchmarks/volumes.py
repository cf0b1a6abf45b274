"""Over- or under-segmentation of quality-benchmark runs: predicted / true volume, precision and recall.

    python benchmarks/volumes.py runs/quality runs/quality/smml-seed0-steps1200 runs/quality-oracle/smml-seed0-steps1200

Dice alone cannot say whether a run loses by segmenting too much or too little; a loss that acts like a
class-balanced cross-entropy, for example, trades precision for recall on the small regions. Each run's
last checkpoint predicts the benchmark split's test cases (of the first argument's cache) from every
one-modality subset and from all four; voxels are pooled over cases, then the table is averaged over the
runs of a method (folder ``<method>-seed<k>-...``; runs of other work folders are kept apart).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loss_terms import build
from quality import benchmark_split
from smml_lightning.data import cache
from smml_lightning.data.labels import REGION_CLASSES, REGIONS
from smml_lightning.data.modalities import SUBSETS, subset_name
from smml_lightning.io import atomic_write_text
from smml_lightning.lit.base import MissingModalityModule

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # as Lightning's test step runs


def region_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, tuple[int, int, int]]:
    """Per region: predicted voxels, true voxels and voxels in both, from internal label maps."""
    out = {}
    for region in REGIONS:
        p, t = np.isin(pred, REGION_CLASSES[region]), np.isin(truth, REGION_CLASSES[region])
        out[region] = (int(p.sum()), int(t.sum()), int((p & t).sum()))
    return out


def load_run(run_dir: Path) -> tuple[MissingModalityModule, torch.dtype | None]:
    """The run's model with its last weights, and the autocast dtype its test ran in (``None``: float32)."""
    model, _, trainer = build(run_dir, [], stage="test")
    return model.eval(), AUTOCAST.get(str(trainer.precision))


def measure(cache_dir: Path, names: list[str], run_dir: Path, subset_ids: list[int]) -> pd.DataFrame:
    """One row per case, subset and region: ``pred``, ``true`` and ``both`` voxel counts."""
    (model, dtype), rows = load_run(run_dir), []
    for name in names:
        image = torch.from_numpy(np.array(cache.load_image(cache_dir, name), dtype=np.float32))[None]
        truth = np.asarray(cache.load_label(cache_dir, name))
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            preds = model.predict_case(image, subset_ids)
        for sid, pred in preds.items():
            for region, (p, t, both) in region_counts(pred.cpu().numpy(), truth).items():
                rows.append({"case": name, "subset": subset_name(SUBSETS[sid]), "modalities": sum(SUBSETS[sid]),
                             "region": region, "pred": p, "true": t, "both": both})
    return pd.DataFrame(rows)


def summarise(counts: pd.DataFrame) -> pd.DataFrame:
    """Volume ratio, precision and recall (%) per method, number of modalities and region: voxels pooled
    over a run's cases and subsets, then averaged over the method's runs (NaN where no run has a true voxel)."""
    pooled = counts.groupby(["method", "run", "modalities", "region"])[["pred", "true", "both"]].sum()
    true = pooled["true"].where(pooled["true"] > 0)  # no true voxel at all: volume and recall undefined
    ratios = pd.DataFrame({"volume": 100 * pooled["pred"] / true,
                           "precision": 100 * pooled["both"] / pooled["pred"].clip(lower=1),
                           "recall": 100 * pooled["both"] / true})
    return ratios.groupby(["method", "modalities", "region"]).mean()


def parse_work_and_runs(description: str, argv: list[str] | None, work_help: str, runs_help: str) -> argparse.Namespace:
    """The command line of the run-scoring benchmarks: a quality.py work folder, run folders, and a
    ``--csv`` for the per-case rows that must not exist yet (nothing already written is overwritten)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("work", type=Path, help=work_help)
    parser.add_argument("runs", type=Path, nargs="+", help=runs_help)
    parser.add_argument("--csv", type=Path, help="also write the per-case rows here (must not exist)")
    args = parser.parse_args(argv)
    if args.csv is not None and args.csv.exists():
        parser.error(f"--csv {args.csv}: already exists")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_work_and_runs(__doc__.split("\n\n")[0], argv,
                               "a quality.py --work folder: its cache and split give the cases",
                               "run folders (with config.yaml and checkpoints/last.ckpt)")
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
    if args.csv is not None:
        atomic_write_text(args.csv, counts.to_csv(index=False))
    print(f"{len(names)} test cases; volume = predicted / true (%), voxels pooled over cases and subsets")
    print(summarise(counts).round(1).to_string())


if __name__ == "__main__":
    main()
