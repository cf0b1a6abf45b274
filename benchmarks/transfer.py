"""Does what a model learns on one synthetic generator carry to the other? The transfer check.

    python benchmarks/transfer.py runs/quality runs/quality-tiny --methods SMML --seeds 0 --steps 600

Given the work folders of two finished quality benchmark runs (``benchmarks/quality.py --work``), made on
different data (the anatomy generator and the tiny ellipsoid heads, say), every named run of each folder
is scored over all 15 subsets on its own test cases (the quality benchmark's reports, reused) and on the
other folder's test cases (its split's test cases and its held-out sets, each on the grid it was prepared
on). The table: Dice (%) per region, mean over the 15 subsets and the runs, trained on -> tested on.

A model that only learned its generator's shortcuts (an ellipsoid head's intensity layout, spherical
tumours) scores well at home and badly away; one trained on realistic anatomy should lose less on the
simpler data than the other way round. The reports of the cross tests go to ``report-transfer-<name>/``
in each run folder (reused by a re-run); the result to ``--out`` (default
``benchmarks/results/transfer/``, replaced as a whole, with PROVENANCE.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

import pandas as pd
import yaml

from smml_lightning.analysis.results import check_result_folder, provenance, write_result_folder
from smml_lightning.analysis.runs import benchmark_split
from smml_lightning.data.cache import list_cases

REPO = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("quality", Path(__file__).with_name("quality.py"))
quality = sys.modules["quality"] = importlib.util.module_from_spec(_SPEC)  # type: ignore[arg-type]
_SPEC.loader.exec_module(quality)  # type: ignore[union-attr]


def test_sets(work: Path, split_dir: Path) -> list[list[str]]:
    """CLI data arguments for each test set of a quality work folder: the split's test cases of its cache,
    then every held-out cache; the split files go to ``split_dir``."""
    sets = [
        quality.test_on(work / "cache", benchmark_split(work / "cache")["test"], split_dir / "split.json")
    ]
    for k, heldout in enumerate(sorted(work.glob("heldout-*/cache"))):
        sets.append(quality.test_on(heldout, list_cases(heldout), split_dir / f"heldout-{k}.json"))
    return sets


def label(work: Path) -> str:
    """A work folder's data, as its raw folder's record names it (generator and spacing)."""
    made = yaml.safe_load((work / "raw" / ".done").read_text())
    generator = made.get("generator", "tiny")
    return f"{generator} ({made['spacing']:g} mm)" if made.get("spacing") else generator


def et_min_voxels(work: Path) -> int:
    """ET_post's threshold on a work folder's test grid, as its own quality run used."""
    made = yaml.safe_load((work / "raw" / ".done").read_text())
    spec = quality.DataSpec(made.get("generator", "tiny"), tuple(made["shape"]), made.get("spacing"))
    return spec.et_min_voxels()


def scores(method, seed: int, run_dir: Path, tested: Path, home: bool) -> pd.DataFrame:
    """Per-case rows of one run on the test sets of ``tested`` (its own reports when ``home``)."""
    if home:
        reports = [run_dir / "report", *sorted(run_dir.glob("report-heldout-*"))]
        reports = [r for r in reports if "peer" not in r.name]
        frames = [pd.read_csv(r / "per_case.csv") for r in reports]
        rows = pd.concat(frames)
        return rows[rows["region"].isin(quality.REGIONS)].assign(method=method.name, seed=seed)
    name = quality.slug(tested.name)
    split_dir = run_dir / f"transfer-{name}"
    split_dir.mkdir(exist_ok=True)
    parts = [
        quality.test(method, data, seed, run_dir, f"report-transfer-{name}-{k}", et_min_voxels(tested))
        for k, data in enumerate(test_sets(tested, split_dir))
    ]
    return pd.concat(parts)


def transfer_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Dice per (trained, tested, method) and region: per run and subset the mean over cases, then the
    mean over the 15 subsets, then over the seeds (as the quality benchmark's table)."""
    keys = ["trained", "tested", "method"]
    per_subset = rows.groupby([*keys, "seed", "subset", "region"])["dice"].mean()
    per_run = per_subset.groupby([*keys, "seed", "region"]).mean()
    table = per_run.groupby([*keys, "region"]).mean().unstack("region")
    return table[[r for r in quality.REGIONS if r in table.columns]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("works", nargs=2, type=Path, help="two quality benchmark work folders")
    parser.add_argument("--methods", nargs="+", default=["SMML"], help="methods (names as in the table)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600, help="the step budget the runs were trained with")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "transfer")
    args = parser.parse_args(argv)
    check_result_folder(args.out)
    known = {m.name: m for m in quality.methods(ablations=True)}
    if unknown := sorted(set(args.methods) - set(known)):
        parser.error(f"unknown --methods {unknown}; choose from {sorted(known)}")
    works = [w.resolve() for w in args.works]
    rows = []
    for trained in works:
        for name in args.methods:
            for seed in args.seeds:
                run_dir = trained / f"{quality.slug(name)}-seed{seed}-steps{args.steps}"
                if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                    parser.error(f"{run_dir}: no finished run (train it with benchmarks/quality.py first)")
                for tested in works:
                    part = scores(known[name], seed, run_dir, tested, home=tested == trained)
                    rows.append(part.assign(trained=label(trained), tested=label(tested)))
    table = transfer_table(pd.concat(rows))
    lines = [
        "# Transfer between the synthetic generators",
        "",
        f"Dice (%), mean over the 15 subsets and seeds {args.seeds}; {args.steps}-step runs of "
        "`benchmarks/quality.py`.",
        "",
        "| trained on | tested on | method | " + " | ".join(table.columns) + " |",
        "|---" * (3 + len(table.columns)) + "|",
    ]
    for (trained, tested, method), row in table.iterrows():
        cells = " | ".join(f"{100 * v:.1f}" for v in row)
        lines.append(f"| {trained} | {tested} | {method} | {cells} |")
    text = "\n".join(lines) + "\n"
    command = shlex.join(["python", "benchmarks/transfer.py", *(argv if argv is not None else sys.argv[1:])])
    write_result_folder(
        args.out,
        {
            "transfer.md": text,
            "transfer.csv": table.reset_index().to_csv(index=False),
            "PROVENANCE.md": provenance(
                "transfer check", command, REPO, tuple(f"Work folder: `{w}`" for w in works)
            ),
        },
    )
    print(text)
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
