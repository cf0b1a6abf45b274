"""Does mutual learning change what the two peers predict? Dice between the peers' own label maps.

    python benchmarks/agreement.py runs/quality runs/quality/smml-seed0-steps1200 \
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

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from quality import benchmark_split
from smml_lightning.data import cache
from smml_lightning.data.labels import REGIONS
from smml_lightning.data.modalities import SUBSETS, subset_name
from smml_lightning.io import atomic_write_text
from volumes import load_run, parse_work_and_runs, region_counts


def dice_from_counts(a: int, b: int, both: int) -> float:
    """Dice of two masks from their voxel counts and overlap; 1 when both are empty (as in the reports)."""
    return 1.0 if a + b == 0 else 2.0 * both / (a + b)


def test_cases(work: Path) -> list[tuple[Path, str]]:
    """(cache, case) of every test case of a quality work folder: the split's, then each held-out set's."""
    cases = [(work / "cache", name) for name in benchmark_split(work / "cache")["test"]]
    for heldout in sorted(work.glob("heldout-*/cache")):
        cases += [(heldout, name) for name in cache.list_cases(heldout)]
    return cases


def measure(cases: list[tuple[Path, str]], run_dir: Path) -> pd.DataFrame:
    """One row per case, subset and region: Dice peer 0 vs peer 1, and each peer vs the labels."""
    model, dtype = load_run(run_dir)
    if len(getattr(model, "branches", ())) != 2:
        raise ValueError(f"{run_dir}: {type(model).__name__} has no two peers to compare")
    subset_ids = list(range(len(SUBSETS)))
    rows = []
    for cache_dir, name in cases:
        image = torch.from_numpy(np.array(cache.load_image(cache_dir, name), dtype=np.float32))[None]
        truth = np.asarray(cache.load_label(cache_dir, name))
        preds = []
        for k in (0, 1):
            model.inference_branches = [k]
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                preds.append({sid: p.cpu().numpy() for sid, p in model.predict_case(image, subset_ids).items()})
        for sid in subset_ids:
            between = region_counts(preds[0][sid], preds[1][sid])
            truths = [region_counts(p[sid], truth) for p in preds]
            for region in REGIONS:
                rows.append({"case": name, "subset": subset_name(SUBSETS[sid]), "region": region,
                             "agreement": dice_from_counts(*between[region]),
                             "peer0": dice_from_counts(*truths[0][region]),
                             "peer1": dice_from_counts(*truths[1][region])})
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


def main(argv: list[str] | None = None) -> None:
    args = parse_work_and_runs(__doc__.split("\n\n")[0], argv,
                               "a quality.py --work folder: its test and held-out cases are scored",
                               "two-peer run folders (config.yaml, checkpoints/last.ckpt)")
    cases = test_cases(args.work)
    rows = pd.concat([measure(cases, run).assign(run=str(run)) for run in args.runs], ignore_index=True)
    if args.csv is not None:
        atomic_write_text(args.csv, rows.to_csv(index=False))
    print(f"{len(cases)} test cases; Dice % averaged over cases, then over the 15 subsets")
    print(summarise(rows).round(1).to_string())


if __name__ == "__main__":
    main()
