"""Where a quality run's ET Dice comes from: cases with and without enhancement, subsets with and without T1ce.

    smml analyze et-breakdown runs/quality-1200 smml-seed0-steps1200 single_branch-seed0-steps1200

ET is the region that decides the quality benchmark's spread. Its 15-subset average mixes two different
things: how well the enhancing rim is outlined where there is one, and whether any ET is predicted in
a tumor without enhancement (there Dice is 1 for an empty prediction and 0 otherwise). This prints, per
run, the mean ET Dice over (case, subset) pairs in each group, from the runs' ``report*/per_case.csv``
(the benchmark's test split and held-out set) and the true ET volumes in ``<work>/cache`` and
``<work>/heldout-*/cache``. A second table splits the same way what adding each modality last (all
four against the other three) changes: why all four modalities may rank below a three-modality subset.
With ``--train-fit`` the same on the runs' own training cases (``quality.py --train-fit``): a pattern
that shows there too is in what the model has learnt, not in how it generalises.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import cache
from ..data.labels import CLASS_NAMES

SMALL_ET = 300  # voxels: "small" enhancing regions, where a few voxels move Dice a lot


def true_et_volumes(work: Path) -> dict[str, int]:
    """True ET voxels of every labelled case of a work folder (its cache and held-out caches)."""
    volumes = {}
    for root in [work / "cache", *sorted(work.glob("heldout-*/cache"))]:
        for name in cache.list_cases(root):
            label = cache.load_label(root, name)
            if label is not None:
                volumes[name] = int((np.asarray(label) == CLASS_NAMES.index("ET")).sum())
    return volumes


def reports(run_dir: Path, peer: int | None = None, train_fit: bool = False) -> list[Path]:
    """The run's per-case CSVs: the method's own reports, or with ``peer`` only that peer's
    (``--peers`` writes ``report-peer<k>`` and ``report-heldout-*-peer<k>`` next to them), or with
    ``train_fit`` its scores on its own training cases (``quality.py --train-fit``)."""
    if train_fit:
        return sorted(run_dir.glob("train-fit/per_case.csv"))
    paths = sorted(run_dir.glob("report*/per_case.csv"))
    if peer is None:
        return [p for p in paths if not re.search(r"-peer\d+$", p.parent.name)]
    return [p for p in paths if p.parent.name.endswith(f"-peer{peer}")]


def region_rows(
    work: Path,
    run: str,
    volumes: dict[str, int],
    region: str = "ET",
    peer: int | None = None,
    train_fit: bool = False,
) -> pd.DataFrame:
    """The rows of ``region`` in a run's per-case CSVs (:func:`reports`); every case must have a prepared
    label in ``volumes``."""
    frames = [pd.read_csv(p) for p in reports(work / run, peer, train_fit)]
    if not frames:
        wanted = "train-fit/per_case.csv (quality.py --train-fit)" if train_fit else "report*/per_case.csv"
        raise FileNotFoundError(f"{work / run}: no {wanted} (run the quality benchmark first)")
    rows = pd.concat(frames)
    rows = rows[rows["region"] == region].copy()
    missing = sorted(set(rows["case"]) - set(volumes))
    if missing:
        raise ValueError(f"{run}: no prepared label for cases {missing[:5]} under {work}")
    return rows


def breakdown(rows: pd.DataFrame, volumes: dict[str, int], run: str) -> pd.Series:
    """Mean Dice (%) of a run's :func:`region_rows` per (case group, subset group), and the case counts."""
    rows = rows.copy()
    et = rows["case"].map(volumes)
    rows["cases"] = np.where(et == 0, "no ET", np.where(et < SMALL_ET, f"ET < {SMALL_ET} vox", "ET"))
    rows["subsets"] = np.where(rows["subset"].str.contains("T1ce"), "with T1ce", "without T1ce")
    table = 100 * rows.groupby(["cases", "subsets"])["dice"].mean()
    table["all", "all"] = 100 * rows["dice"].mean()
    table["cases", "n"] = rows["case"].nunique()
    table["cases", "no ET"] = rows.loc[rows["cases"] == "no ET", "case"].nunique()
    return table.rename(run)


def added_last(rows: pd.DataFrame, volumes: dict[str, int], region: str, run: str) -> pd.Series:
    """Dice points gained by adding each modality last (all four minus the other three), paired by
    case, on the tumours with and without enhancement: where all four modalities lose their rank.
    ``rows`` are a run's :func:`region_rows` of ``region``."""
    from ..evaluation.report import modality_gains

    table = {}
    for group, keep in (("no ET", rows["case"].map(volumes) == 0), ("ET", rows["case"].map(volumes) > 0)):
        if keep.any():
            gains = modality_gains(rows[keep].to_dict("records"), regions=(region,), n_resamples=200)
            for rec in gains[gains["added"] == "last"].itertuples():
                table[group, f"+{rec.modality}"] = 100 * rec.gain
    return pd.Series(table, name=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", type=Path, help="the quality benchmark's --work folder")
    parser.add_argument("runs", nargs="+", help="run folders under it, e.g. smml-seed0-steps1200")
    parser.add_argument("--region", default="ET", help="ET (default) or ET_post")
    parser.add_argument("--peer", type=int, choices=(0, 1), help="an SMML peer's reports (runs with --peers)")
    parser.add_argument(
        "--train-fit",
        action="store_true",
        help="the runs' scores on their own training cases "
        "(runs with quality.py --train-fit) instead of the test cases",
    )


def run(args: argparse.Namespace) -> None:
    volumes = true_et_volumes(args.work)
    scored = "training" if args.train_fit else "test"
    rows = {r: region_rows(args.work, r, volumes, args.region, args.peer, args.train_fit) for r in args.runs}
    table = pd.concat([breakdown(rows[r], volumes, r) for r in args.runs], axis=1)
    print(
        f"{args.region} Dice (%) on the {scored} cases, mean over (case, subset) pairs; cases by true ET volume "
        f"({scored} cases without any ET in brackets)\n"
    )
    columns = [c for c in table.index if c[0] != "cases"]
    print(f"| run | {scored} cases (no ET) | " + " | ".join(f"{a}, {b}" for a, b in columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name in table.columns:
        cells = " | ".join(f"{table.loc[c, name]:.1f}" for c in columns)
        print(
            f"| {name} | {table.loc[('cases', 'n'), name]:.0f} ({table.loc[('cases', 'no ET'), name]:.0f}) "
            f"| {cells} |"
        )
    last = pd.concat([added_last(rows[r], volumes, args.region, r) for r in args.runs], axis=1)
    print(
        f"\n{args.region} Dice points gained by adding each modality last (all four minus the other three, "
        f"paired by case), on the {scored} cases without and with enhancement\n"
    )
    print("| run | " + " | ".join(f"{a}: {b}" for a, b in last.index) + " |")
    print("|---" * (len(last.index) + 1) + "|")
    for name in last.columns:
        print(f"| {name} | " + " | ".join(f"{last.loc[c, name]:+.1f}" for c in last.index) + " |")
