"""Does mutual learning change what the two peers predict? Dice between the peers' own label maps.

    smml analyze agreement runs/quality runs/quality/smml-seed0-steps1200 \
        runs/quality/smml_independent_peers-seed0-steps1200 --csv agreement.csv

Each peer of a two-peer run (SMML or one of its ablations) segments every test case of a
``quality.py --work`` folder (the split's test cases and any held-out set there) under all 15 subsets on
its own weights, in the precision its test ran in, and the two label maps are compared region by
region. Consistency terms that pull the peers together should raise this agreement above that of two
peers trained side by side without them (``experiments/ablations/independent_peers.yaml``); the same
agreement means the terms left the predictions where they were. Each peer's Dice against the labels is
printed beside it, so agreement bought with accuracy shows. The table averages the 15 subsets, then
the subsets with each number of available modalities.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ..data.labels import REGIONS
from ..data.modalities import SUBSETS, subset_name
from ..lit.smml import SMML
from .runs import (
    add_work_and_runs,
    check_csv,
    dice_from_counts,
    load_run,
    predict,
    region_counts,
    scored_cases,
    write_csv,
)


def measure(cases: list[tuple[Path, str]], run_dir: Path) -> pd.DataFrame:
    """One row per case, subset and region: Dice peer 0 vs peer 1, and each peer vs the labels."""
    model, dtype = load_run(run_dir)
    if not isinstance(model, SMML):
        raise ValueError(f"{run_dir}: {type(model).__name__} has no two peers to compare")
    subset_ids = list(range(len(SUBSETS)))
    rows = []
    for cache_dir, name in cases:
        preds = []
        for k in (0, 1):
            model.inference_branches = [k]
            pred, truth = predict(model, dtype, cache_dir, name, subset_ids)
            preds.append(pred)
        for sid in subset_ids:
            between = region_counts(preds[0][sid], preds[1][sid])
            truths = [region_counts(p[sid], truth) for p in preds]
            for region in REGIONS:
                rows.append(
                    {
                        "case": name,
                        "subset": subset_name(SUBSETS[sid]),
                        "region": region,
                        "agreement": dice_from_counts(*between[region]),
                        "peer0": dice_from_counts(*truths[0][region]),
                        "peer1": dice_from_counts(*truths[1][region]),
                    }
                )
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Dice % per run, number of available modalities ("all" 15 subsets, then 1-4) and region: mean over
    cases per subset, then over the subsets."""
    columns = ["agreement", "peer0", "peer1"]
    per_subset = rows.groupby(["run", "subset", "region"], sort=False)[columns].mean().reset_index()
    per_subset["modalities"] = per_subset["subset"].str.count(r"\+") + 1
    every = per_subset.groupby(["run", "region"], sort=False)[columns].mean().assign(modalities="all")
    by_count = per_subset.groupby(["run", "modalities", "region"], sort=False)[columns].mean().reset_index()
    table = pd.concat([every.reset_index(), by_count.astype({"modalities": str})])
    table["modalities"] = pd.Categorical(table["modalities"], ["all", "1", "2", "3", "4"], ordered=True)
    table["run"] = pd.Categorical(table["run"], list(dict.fromkeys(rows["run"])), ordered=True)
    table["region"] = pd.Categorical(table["region"], list(REGIONS), ordered=True)
    return 100 * table.set_index(["run", "modalities", "region"]).sort_index()[columns]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_work_and_runs(
        parser,
        "a quality.py --work folder: its test and held-out cases are scored",
        "two-peer run folders (config.yaml, checkpoints/last.ckpt)",
    )


def run(args: argparse.Namespace) -> None:
    check_csv(args.csv)
    cases = scored_cases(args.work)
    rows = pd.concat([measure(cases, r).assign(run=str(r)) for r in args.runs], ignore_index=True)
    write_csv(args.csv, rows)
    print(f"{len(cases)} test cases; Dice % averaged over cases, then over the 15 subsets")
    print(summarise(rows).round(1).to_string())
