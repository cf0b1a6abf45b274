"""Segmentation quality of SMML against its companions at equal budget, on fixed synthetic data.

    python benchmarks/quality.py --quick            # smoke run, a few minutes
    python benchmarks/quality.py                    # full run (32 anatomy cases at 3 mm + 40 held out, 600 steps, 3 seeds)
    python benchmarks/quality.py --generator tiny   # the same on the tiny ellipsoid heads (64x64x48)
    python benchmarks/quality.py --ablations        # also the five SMML ablations and CMC without unlabeled cases
    python benchmarks/quality.py --fp32             # also SMML in fp32 (bf16-mixed's accuracy check)
    python benchmarks/quality.py --peers            # also each peer of every two-peer model scored alone
    python benchmarks/quality.py --train-fit        # also every run scored on its own training cases
    python benchmarks/quality.py --jobs 2           # two fits side by side, one core each (more throughput)
    python benchmarks/quality.py --overlay variants/public_seg_loss --work runs/quality-wce
                                                    # every method with a config overlay (here: the loss)
    python benchmarks/quality.py --overlay ablations/shared_mask --overlay-on SMML \
        --work runs/quality-shared-mask              # an overlay of SMML's own settings, SMML only
    python benchmarks/quality.py --overlay labeled/labeled_10 --methods CMC MAML \
        --work runs/quality-labeled10                # semi-supervised: 10% labeled (CMC also uses the rest)

Pipeline: synthetic cases (fixed seed; by default full-size cases of the anatomy generator, prepared at
3 mm) -> prepare -> SAM priors once when a method uses them (tiny random SAM, decoder fitted on
the training split) -> for each method and seed, `python -m smml_lightning.cli fit` in a subprocess for
exactly ``--steps`` optimizer steps (no validation, the last weights are scored) -> `test` over all 15
subsets on the fixed test split and on 40 more held-out cases -> one table (method x WT/TC/ET/ET_post, mean over
the 15 subsets, spread over seeds), SMML's gain over the single-branch per number of available
modalities, Markdown + CSV + PNG + PROVENANCE.md (command, commit, host CPU, date) in the benchmark's
current-result folder ``benchmarks/results/quality/``, which each run replaces as a whole (``--out``
writes elsewhere; ``--quick`` writes to ``<work>/results``).

Every method keeps its experiment file's settings; the benchmark only sets the data, the seed and the
step budget. SMML's warm-up (in epochs) is rescaled so it covers the same fraction of the budget as in
its config (2 of 15 epochs), otherwise a short budget would be mostly warm-up. The data seed and the
split are the same for every run; only the training seed changes. Work files go under ``--work``
(default runs/quality) and finished runs are reused, so an interrupted benchmark resumes.

The script runs in three steps: :func:`parse` turns the command line into a checked :class:`Plan`,
:func:`run` makes the data and trains and tests every run, and :func:`tables` and :func:`result_files`
make the result folder's files.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import pandas as pd
import yaml

from smml_lightning.analysis.results import PROVENANCE, check_result_folder, provenance, write_result_folder
from smml_lightning.analysis.runs import DATA_SEED, benchmark_split, held_out_fraction
from smml_lightning.experiments import EXPERIMENTS_DIR as EXPERIMENTS
from smml_lightning.experiments import resolve

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality"  # the benchmark's current result
REGIONS = ("WT", "TC", "ET", "ET_post")  # ET_post: small predicted ET emptied, as in the community's tables
PEER = " one peer"  # --peers: "<method> one peer" rows, each peer scored alone, the two averaged per seed
TRAIN_FIT = "train-fit"  # --train-fit: each run's scores on its own training cases (its report folder)


@dataclass(frozen=True)
class Method:
    name: str
    configs: tuple[Path, ...]
    args: tuple[str, ...] = ()  # CLI overrides after the configs (fit and test alike)


def peer_row(method: str) -> str:
    """The --peers row of a two-peer method: its peers scored one at a time."""
    return method + PEER


def two_peers(method: Method) -> bool:
    """Whether the method is SMML's two-peer module (SMML, its ablations and variants)."""
    return load_yaml(method.configs)["model"]["class_path"] == "smml_lightning.lit.smml.SMML"


def methods(ablations: bool, fp32: bool = False) -> list[Method]:
    smml = EXPERIMENTS / "synthetic.yaml"
    out = [
        Method("SMML", (smml,)),
        Method("single-branch", (EXPERIMENTS / "synthetic_single.yaml",)),
        Method("U-Net", (EXPERIMENTS / "synthetic_unet.yaml",)),
        Method("MAML", (EXPERIMENTS / "synthetic_maml.yaml",)),
        Method("CMC", (EXPERIMENTS / "synthetic_cmc.yaml",)),
    ]
    if ablations:
        for overlay in sorted((EXPERIMENTS / "ablations").glob("*.yaml")):
            out.append(Method(f"SMML {overlay.stem}", (smml, overlay)))
        # CMC on its labeled cases alone: what the unlabeled ones add under a labeled-fraction overlay.
        out.append(
            Method("CMC labeled only", (EXPERIMENTS / "synthetic_cmc.yaml",), ("--data.use_unlabeled=false",))
        )
    if fp32:  # the accuracy check behind bf16-mixed as the default precision
        out.append(Method("SMML fp32", (smml,), ("--trainer.precision=32-true",)))
    return out


def load_yaml(paths: tuple[Path, ...]) -> dict:
    """Merge the experiment files (and their ``# base:`` configs) the way the CLI does, later files
    winning, for the few keys read here."""
    from smml_lightning.experiments import load

    return load(*paths)


# ---- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Which synthetic data a benchmark trains and tests on.

    ``anatomy``: full-size 240x240x155 1 mm cases of the anatomy generator (real brain anatomy, the
    default), resampled by ``prepare`` to ``spacing`` mm. ``tiny``: ellipsoid heads of ``shape`` voxels
    (the generator of the tables before the anatomy generator existed), kept on their own grid.
    """

    generator: str = "anatomy"
    shape: tuple[int, int, int] = (64, 64, 48)
    spacing: float | None = 3.0

    def describe(self) -> str:
        if self.generator == "anatomy":
            return (
                f"anatomy-generator cases (240x240x155 at 1 mm, prepared at {self.spacing:g} mm and scored "
                "on that grid)"
            )
        return f"tiny-generator cases of {'x'.join(map(str, self.shape))}"

    def et_min_voxels(self) -> int:
        """ET_post's threshold on the grid the tests score on: the community's 500 mm^3 in the anatomy
        cases' voxels; 10 voxels on the tiny heads (their tumours' scale; what their tables used)."""
        return round(500 / self.spacing**3) if self.generator == "anatomy" and self.spacing else 10

    def record(self) -> dict:
        return {"generator": self.generator, "shape": list(self.shape), "spacing": self.spacing}


def synthetic_cache(root: Path, cases: int, spec: DataSpec, patch: int, first: int = 0) -> Path:
    """Synthetic cases ``first``.. of the data seed under ``root/raw`` (written once), prepared into
    ``root/cache`` (finished cases skipped); returns the cache folder. A folder that holds another
    generator's or spacing's data is refused: its runs would be mixed with this one's."""
    from smml_lightning.data.cache import is_done, mark_done
    from smml_lightning.data.prepare import prepare
    from smml_lightning.data.synthetic import synthesize, synthesize_anatomy

    raw, cache_dir = root / "raw", root / "cache"
    wanted = {"first": first, "cases": cases, "seed": DATA_SEED, **spec.record()}
    if is_done(raw):
        made = yaml.safe_load((raw / ".done").read_text())
        made.setdefault("generator", "tiny")  # folders made before the anatomy generator
        made.setdefault("spacing", None)
        if {k: made.get(k) for k in wanted} != wanted:
            raise SystemExit(
                f"{raw}: holds {made.get('generator')} data (spacing {made.get('spacing')}), not "
                f"{spec.generator} (spacing {spec.spacing}); give this run another --work"
            )
    else:
        if spec.generator == "anatomy":
            synthesize_anatomy(
                raw, cases, layout="brats2020", seed=DATA_SEED, first=first, workers=2, overwrite=True
            )
        else:
            synthesize(raw, cases, layout="brats2020", shape=spec.shape, seed=DATA_SEED, first=first)
        mark_done(raw, wanted)
    prepare(raw, cache_dir, min_size=(patch,) * 3, workers=2, spacing=spec.spacing, progress=False)
    return cache_dir


def prepare_data(
    work: Path, cases: int, spec: DataSpec, patch: int, prior_epochs: int, priors: dict | None = None
) -> tuple[Path, dict[str, list[str]]]:
    """Synthetic cases, the prepared cache and the SAM priors, each made once.

    ``priors``: the data block of the methods that use priors (its labeled fraction or cases restrict
    the prior decoder to the labels those methods train on); ``None`` makes no priors."""
    from smml_lightning.models.sam_prior import save_tiny_sam_checkpoint
    from smml_lightning.priors import run_priors

    cache_dir = synthetic_cache(work, cases, spec, patch)
    split = benchmark_split(cache_dir)
    if priors is None:
        return cache_dir, split
    sam = work / "sam_tiny_random.pth"
    if not sam.is_file():
        save_tiny_sam_checkpoint(sam, seed=DATA_SEED)
    run_priors(
        cache_dir,
        checkpoint=sam,
        model_type="tiny",
        epochs=prior_epochs,
        train_names=split["train"],
        labeled_fraction=priors.get("labeled_fraction") or 1.0,
        labeled_cases=priors.get("labeled_cases"),
        data_seed=DATA_SEED,
    )
    return cache_dir, split


def prepare_heldout(work: Path, first: int, n: int, spec: DataSpec, patch: int) -> list[str]:
    """``n`` more cases of the same generator and data seed, numbered after the training set's (so
    disjoint from it), prepared in a cache of their own; CLI arguments that test on all of them.

    Ten test cases are too few for ET: a case without enhancement scores 0 or 1 per subset depending
    on whether any ET is predicted, so one such case moves a 15-subset ET average by up to 10 points.
    """
    from smml_lightning.data.cache import list_cases

    root = work / f"heldout-{first}-{n}"
    cache_dir = synthetic_cache(root, n, spec, patch, first)
    return test_on(cache_dir, list_cases(cache_dir), root / "split.json")


def test_on(cache_dir: Path, names: list[str], split_path: Path) -> list[str]:
    """CLI arguments that test on ``names`` of ``cache_dir`` (a split file with only a test part):
    the held-out set, or with ``--train-fit`` the benchmark split's training cases."""
    from smml_lightning.data.splits import write_split

    split = write_split({"test": sorted(names)}, split_path)
    return [f"--data.cache_dir={cache_dir}", f"--data.split={split}"]


# ---- one run ------------------------------------------------------------------------------------------


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def data_args(cache_dir: Path, test_fraction: float) -> list[str]:
    """CLI arguments fixing the data and the split for every run."""
    return [
        f"--data.cache_dir={cache_dir}",
        f"--data.seed={DATA_SEED}",
        "--data.val_fraction=0",
        f"--data.test_fraction={test_fraction}",
    ]


def common_args(method: Method, data: list[str], seed: int, run_dir: Path) -> list[str]:
    args: list[str] = []
    for path in method.configs:
        args += ["--config", str(path)]
    return args + [
        *method.args,
        *data,
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=false",
        f"--model.init_args.method_name={method.name}",
    ]


def warmup_args(method: Method, steps: int, train_cases: int) -> list[str]:
    """The CLI override that keeps a config's warm-up (in epochs) at its share of the run's ``steps``, with
    the method's own epoch length: ``train_cases`` times its samples per volume over its batch size (an
    overlay's batch size counts). Empty when the method has no warm-up or its config no epoch budget."""
    cfg = load_yaml(method.configs)
    init = cfg["model"].get("init_args", {})
    if "warmup_epochs" not in init or not cfg["trainer"].get("max_epochs"):
        return []
    fraction = init["warmup_epochs"] / cfg["trainer"]["max_epochs"]
    steps_per_epoch = math.ceil(train_cases * cfg["data"]["samples_per_volume"] / cfg["data"]["batch_size"])
    return [f"--model.init_args.warmup_epochs={round(fraction * steps / steps_per_epoch)}"]


def fit(
    method: Method,
    data: list[str],
    seed: int,
    steps: int,
    train_cases: int,
    run_dir: Path,
    threads: int | None = None,
) -> float:
    """Train in a subprocess (its memory is released at exit); return the wall time in seconds.

    ``train_cases`` sets the warm-up's length (:func:`warmup_args`). ``threads`` caps the subprocess's
    intra-op threads (OpenMP / MKL), for fits that share the cores.
    """
    from smml_lightning.data.cache import is_done, mark_done

    if is_done(run_dir):
        return float(yaml.safe_load((run_dir / ".done").read_text())["wall_seconds"])
    extra = warmup_args(method, steps, train_cases)
    checkpoints = run_dir / "checkpoints"
    cmd = [
        sys.executable,
        "-m",
        "smml_lightning.cli",
        "fit",
        *common_args(method, data, seed, run_dir),
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.monitor=null",
        f"--checkpoint.dirpath={checkpoints}",
        *extra,
    ]
    if checkpoints.exists():  # an interrupted fit: start over, or Lightning would save last-v1.ckpt beside it
        print(f"   {run_dir.name}: removing the checkpoints of an unfinished fit", flush=True)
        shutil.rmtree(checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "fit.log"
    print(f"   {method.name} seed {seed}: fitting {steps} steps (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write(" ".join(cmd) + "\n")
        handle.flush()
        env = {**os.environ, "WANDB_MODE": "disabled"}
        if threads is not None:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        done = subprocess.run(cmd, check=False, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{method.name} seed {seed}: fit failed (exit {done.returncode}); {log}:\n{tail}")
    mark_done(run_dir, {"wall_seconds": wall, "steps": steps})
    return wall


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, as in containers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores_warning(load: float | None = None) -> str | None:
    """A warning when other processes already keep the cores busy, else ``None``.

    Fits that share the cores with another benchmark run several times slower (two benchmarks at
    ``--jobs 1`` each take every core), and the table's fit seconds would not compare with other runs'.
    ``load`` defaults to the one-minute load average.
    """
    if load is None:
        if not hasattr(os, "getloadavg"):
            return None
        load = os.getloadavg()[0]
    if load < cores() - 0.5:
        return None
    return (
        f"warning: load average {load:.1f} on {cores()} cores before any fit: fits will be slower and their "
        "seconds not comparable; to run two benchmarks side by side, start each with OMP_NUM_THREADS=1"
    )


def fit_all(
    runs: list[tuple[Method, int, Path]], data: list[str], steps: int, train_cases: int, jobs: int
) -> dict[Path, float]:
    """Every run's fit, ``jobs`` at a time; wall seconds by run folder.

    Side by side, each fit gets an equal share of the cores: small 3D convolutions do not scale to many
    threads, so on a CPU host two one-thread fits finish in far less time than two two-thread fits in a
    row. A failed fit does not stop the others (finished fits are kept and reused); the failures are
    raised together at the end.
    """
    threads = max(1, cores() // jobs) if jobs > 1 else None
    walls: dict[Path, float] = {}
    failures: list[str] = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        pending = {
            pool.submit(fit, method, data, seed, steps, train_cases, run_dir, threads): (
                method,
                seed,
                run_dir,
            )
            for method, seed, run_dir in runs
        }
        for future in as_completed(pending):
            method, seed, run_dir = pending[future]
            try:
                walls[run_dir] = future.result()
            except RuntimeError as error:
                failures.append(str(error))
                continue
            print(f"   {method.name} seed {seed}: fit {walls[run_dir]:.0f} s", flush=True)
    finally:  # on Ctrl-C, queued fits must not start (running ones get the signal with this process group)
        pool.shutdown(cancel_futures=True)
    if failures:
        raise RuntimeError("\n\n".join(failures))
    return walls


def test(
    method: Method, data: list[str], seed: int, run_dir: Path, report: str = "report", et_min_voxels: int = 10
) -> pd.DataFrame:
    """Score the last weights on the test split of ``data`` over all 15 subsets; per-case rows.
    ``et_min_voxels``: ET_post's threshold, one for every method (:meth:`DataSpec.et_min_voxels`)."""
    from smml_lightning.cli import lightning_main

    report = run_dir / report
    per_case = report / "per_case.csv"
    if not per_case.is_file():
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"{method.name} seed {seed}: no checkpoint {ckpt} after fit")
        # The test's root is its report folder, so its config.yaml lands there and the run folder's
        # config.yaml stays the one of the fit (`smml analyze` rebuilds runs from it).
        # LightningCLI warns when it gets both ``args`` and command-line arguments (this script's own).
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            lightning_main(
                [
                    "test",
                    *common_args(method, data, seed, report),
                    f"--ckpt_path={ckpt}",
                    f"--model.init_args.report_dir={report}",
                    # Methods compare on the grid they train on; the native grid and the challenge's
                    # lesion-wise figures cost minutes per full-size case and are not in the table.
                    "--model.init_args.test_grid=cache",
                    "--model.init_args.challenge=null",
                    f"--model.init_args.et_min_voxels={et_min_voxels}",
                    "--trainer.enable_progress_bar=false",
                ]
            )
    frame = pd.read_csv(per_case)
    return frame[frame["region"].isin(REGIONS)].assign(method=method.name, seed=seed)


# ---- tables and figure --------------------------------------------------------------------------------


def n_modalities(subset: str) -> int:
    return subset.count("+") + 1


def summarise(rows: pd.DataFrame, walls: pd.DataFrame, order: list[str]) -> dict[str, pd.DataFrame]:
    """Per run: mean over cases per subset, then the 15-subset average; per method: spread over seeds."""
    per_subset = rows.groupby(["method", "seed", "subset", "region"])["dice"].mean().reset_index()
    per_run = per_subset.groupby(["method", "seed", "region"])["dice"].mean().unstack("region")[list(REGIONS)]
    per_run = per_run.reset_index().merge(walls, on=["method", "seed"])
    stats = per_run.groupby("method")[list(REGIONS)].agg(["mean", "std", "min", "max"])
    stats[("fit_wall_seconds", "mean")] = per_run.groupby("method")["wall_seconds"].mean()
    stats = stats.reindex(order)
    subsets = per_subset.groupby(["method", "subset", "region"])["dice"].agg(["mean", "std"]).reset_index()
    subsets["n_modalities"] = subsets["subset"].map(n_modalities)
    return {"per_run": per_run, "stats": stats, "subsets": subsets, "per_subset": per_subset}


def spread_sources(rows: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per method and region, the seed std of the 15-subset average split in two (a two-way layout,
    seeds x test cases, one score per cell: each case's mean over the subsets).

    ``test_cases`` is the std that the seed-by-case interaction alone gives a run's mean over its
    ``n`` test cases, sqrt(MS_interaction / n): the part that more test cases would remove (a case whose
    ET Dice flips between 0 and 1 from one seed to the next). ``training`` is what is left,
    sqrt(max(0, var_seed - MS_interaction / n)): models that differ on every case, which only more
    seeds average out. Cases scored in every seed only; methods with one seed are left out."""
    parts = []
    for (method, region), part in rows.groupby(["method", "region"], sort=False):
        wide = part.groupby(["seed", "case"])["dice"].mean().unstack("case").dropna(axis=1)
        k, n = wide.shape
        if k < 2 or n < 2:
            continue
        x = wide.to_numpy()
        residual = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
        test_var = (residual**2).sum() / ((k - 1) * (n - 1)) / n
        seed_var = x.mean(1).var(ddof=1)
        parts.append(
            {
                "method": method,
                "region": region,
                "seeds": k,
                "cases": n,
                "seed_std": math.sqrt(seed_var),
                "test_cases": math.sqrt(test_var),
                "training": math.sqrt(max(0.0, seed_var - test_var)),
            }
        )
    frame = pd.DataFrame(
        parts, columns=["method", "region", "seeds", "cases", "seed_std", "test_cases", "training"]
    )
    frame["method"] = pd.Categorical(frame["method"], categories=order, ordered=True)
    return frame.sort_values(
        ["method", "region"], key=lambda c: c.map(REGIONS.index) if c.name == "region" else c
    )


def gains(per_subset: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Dice gain of ``a`` over ``b`` per number of available modalities (mean over subsets), with the
    min-max over seed pairs (seed i of ``a`` against seed i of ``b``)."""
    wide = (
        per_subset[per_subset["method"].isin([a, b])]
        .pivot_table(index=["seed", "subset", "region"], columns="method", values="dice")
        .dropna()
    )
    wide["gain"] = wide[a] - wide[b]
    wide = wide.reset_index()
    wide["n_modalities"] = wide["subset"].map(n_modalities)
    by_seed = wide.groupby(["n_modalities", "region", "seed"])["gain"].mean()
    table = by_seed.groupby(["n_modalities", "region"]).agg(["mean", "min", "max"]).reset_index()
    return table


def last_modality_gains(rows: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per method, seed, modality and region: all four modalities minus the other three (paired by
    case, :func:`~smml_lightning.evaluation.report.modality_gains`); why all four may not rank first."""
    from smml_lightning.evaluation.report import modality_gains

    parts = []
    for (method, seed), run in rows[rows["region"] != "ET_post"].groupby(["method", "seed"], sort=False):
        # The peer rows hold both peers' scores: their mean per case (the gain is linear in Dice).
        run = run.groupby(["case", "subset", "region"], as_index=False)[["dice", "hd95"]].mean()
        table = modality_gains(run.to_dict("records"), n_resamples=200)
        parts.append(table[table["added"] == "last"].assign(method=method, seed=seed))
    frame = pd.concat(parts)
    frame["method"] = pd.Categorical(frame["method"], categories=order, ordered=True)
    return (
        frame.groupby(["method", "modality", "region"], observed=True, sort=False)["gain"]
        .agg(["mean", "min", "max"])
        .reset_index()
    )


def pct(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def spread_cell(row: pd.Series, region: str) -> str:
    """``mean ± std [min–max]`` over seeds, or just the mean for a single seed (no spread to show)."""
    mean, std = row[(region, "mean")], row[(region, "std")]
    if math.isnan(std):
        return pct(mean)
    return f"{pct(mean)} ± {pct(std)} [{pct(row[(region, 'min')])}–{pct(row[(region, 'max')])}]"


def region_rows(stats: pd.DataFrame, wall: bool) -> list[str]:
    """One Markdown row per method: each region's spread cell, and the mean fit wall time if ``wall``."""
    lines = []
    for method, row in stats.iterrows():
        cells = [spread_cell(row, r) for r in REGIONS]
        if wall:
            cells.append(f"{row[('fit_wall_seconds', 'mean')]:.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def last_modality_rows(last: pd.DataFrame) -> list[str]:
    """The "all four minus the other three" table (:func:`last_modality_gains`) in Markdown."""
    regions = list(dict.fromkeys(last["region"]))
    lines = [
        (
            "Dice points gained by adding each modality last (paired by case), mean over seeds "
            "[min–max]; below zero, that three-modality subset beats all four."
        ),
        "",
        "| method | added | " + " | ".join(regions) + " |",
        "|---" * (len(regions) + 2) + "|",
    ]
    for (method, modality), part in last.groupby(["method", "modality"], observed=True, sort=False):
        by_region = part.set_index("region")
        cells = [
            f"{100 * by_region.loc[r, 'mean']:+.1f} [{100 * by_region.loc[r, 'min']:+.1f}, "
            f"{100 * by_region.loc[r, 'max']:+.1f}]"
            for r in regions
        ]
        lines.append(f"| {method} | {modality} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, gain: dict[tuple[str, str], pd.DataFrame], meta: dict) -> str:
    stats = summary["stats"]
    lines = [
        f"# Quality benchmark ({meta['date']})",
        "",
        f"{meta['cases']} synthetic {meta['data']} (data seed {DATA_SEED}); "
        f"split {meta['split']}; {meta['steps']} optimizer steps per run; training seeds {meta['seeds']}. "
        "Dice (%) on the test cases, mean over the 15 subsets; mean ± std over seeds [min–max]. "
        "ET_post is ET after the small-ET post-processing the published tables use (a predicted ET under "
        f"{meta['et_min_voxels']} voxels is emptied, the same for every method). "
        "Wall time: the fit subprocess (includes ~10-20 s start-up; the machine is shared, so noisy"
        + (
            f"; {meta['jobs']} fits ran side by side, each on its share of the cores"
            if meta["jobs"] > 1
            else ""
        )
        + ").",
        f"Command: `{meta['command']}`",
        *(
            [f"Not trained (left out by `--finished-only`): {', '.join(meta['missing'])}."]
            if meta.get("missing")
            else []
        ),
        "",
        "| method | " + " | ".join(REGIONS) + " | fit wall (s) |",
        "|---" * (len(REGIONS) + 2) + "|",
    ]
    lines += region_rows(stats, wall=True)
    if any(str(m).endswith(PEER) for m in stats.index):
        lines += [
            "",
            (
                f"<method>{PEER}: the method's weights with one peer's logits instead of both averaged "
                "(`model.init_args.inference_branches=[k]`), the mean of peers 0 and 1 per seed."
            ),
        ]
    for (a, b), table in gain.items():
        lines += [
            "",
            f"## {a} minus {b}, by number of available modalities",
            "Dice points, mean over the subsets with that many modalities [min–max over seed pairs].",
            "",
            "| modalities | " + " | ".join(REGIONS) + " |",
            "|---" * (len(REGIONS) + 1) + "|",
        ]
        for k in sorted(table["n_modalities"].unique()):
            cells = []
            for region in REGIONS:
                row = table[(table["n_modalities"] == k) & (table["region"] == region)].iloc[0]
                cells.append(f"{100 * row['mean']:+.1f} [{100 * row['min']:+.1f}, {100 * row['max']:+.1f}]")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if summary.get("last_modality") is not None:
        lines += [
            "",
            "## All four modalities minus the other three",
            *last_modality_rows(summary["last_modality"]),
        ]
    if summary.get(TRAIN_FIT) is not None:
        train = summary[TRAIN_FIT]
        lines += [
            "",
            "## On the training cases (`--train-fit`)",
            (
                "The same runs scored on the cases they were trained on (Dice %, mean over the 15 subsets; "
                "mean ± std over seeds [min–max]). Close to the test figures, the runs have not fitted their "
                "own data (under-fitted); far above them, they fit it but do not generalise."
            ),
            "",
            "| method | " + " | ".join(REGIONS) + " |",
            "|---" * (len(REGIONS) + 1) + "|",
            *region_rows(train["stats"], wall=False),
            "",
            "All four modalities minus the other three, on the training cases:",
            *last_modality_rows(train["last_modality"]),
        ]
    if gain:
        lines += ["", "## Acceptance: SMML above single-branch by more than the seed spread", ""]
        per_run = summary["per_run"].set_index(["method", "seed"])
        for region in REGIONS:
            delta = stats.loc["SMML", (region, "mean")] - stats.loc["single-branch", (region, "mean")]
            spread = max(
                stats.loc[m, (region, "max")] - stats.loc[m, (region, "min")]
                for m in ("SMML", "single-branch")
            )
            verdict = (
                ("yes" if delta > spread else "no") if len(meta["seeds"]) > 1 else "n/a (one seed, no spread)"
            )
            paired = (per_run.loc["SMML", region] - per_run.loc["single-branch", region]).dropna()
            lines.append(
                f"- {region}: gain {100 * delta:+.1f} points, largest seed range {100 * spread:.1f} -> {verdict}"
                f" (paired by seed: {', '.join(f'{100 * g:+.1f}' for g in paired)})"
            )
    sources = summary.get("spread_sources")
    if sources is not None and len(sources):
        lines += [
            "",
            "## Where the seed spread comes from",
            (
                "Std over seeds of each run's 15-subset average (Dice points), split into the part more test "
                "cases would remove (seed-by-case interaction over the test cases) and the part only more "
                "seeds average out (training); their squares add up to the seed std's."
            ),
            "",
            "| method | region | seeds x cases | seed std | test cases | training |",
            "|---" * 6 + "|",
        ]
        for row in sources.itertuples():
            lines.append(
                f"| {row.method} | {row.region} | {row.seeds} x {row.cases} | {pct(row.seed_std)} | "
                f"{pct(row.test_cases)} | {pct(row.training)} |"
            )
    return "\n".join(lines) + "\n"


def figure(subsets: pd.DataFrame, order: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smml_lightning.data.modalities import SUBSET_NAMES

    fig, axes = plt.subplots(len(REGIONS), 1, figsize=(12, 3 * len(REGIONS)), sharex=True)
    width = 0.8 / len(order)
    for ax, region in zip(axes, REGIONS):
        for i, method in enumerate(order):
            part = subsets[(subsets["method"] == method) & (subsets["region"] == region)]
            part = part.set_index("subset").reindex(SUBSET_NAMES)
            xs = [x + (i - (len(order) - 1) / 2) * width for x in range(len(SUBSET_NAMES))]
            ax.bar(xs, 100 * part["mean"], width, yerr=100 * part["std"].fillna(0), label=method, capsize=1.5)
        ax.set_ylabel(f"{region} Dice (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=min(len(order), 4), fontsize=8)
    axes[-1].set_xticks(range(len(SUBSET_NAMES)), SUBSET_NAMES, rotation=45, ha="right", fontsize=8)
    fig.suptitle("Test Dice per modality subset (mean ± std over seeds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# ---- parse, run, write --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One benchmark run, from the command line: what to train and score, where, and where the result goes."""

    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    steps: int
    cases: int
    heldout: int
    data: DataSpec
    prior_epochs: int
    peers: bool
    train_fit: bool
    jobs: int
    work: Path
    out: Path
    command: str
    finished_only: bool = False


@dataclass
class Scores:
    """Everything the runs of a plan produced: per-case rows (test and ``--train-fit``), fit seconds, and
    the table order of the methods (with their "one peer" rows)."""

    rows: pd.DataFrame
    train_rows: pd.DataFrame | None
    walls: pd.DataFrame
    order: list[str]
    split: dict[str, list[str]]
    missing: list[str] = field(default_factory=list)  # runs left out by --finished-only


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 small cases, 3 steps, one seed")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 600, quick 3)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2, quick 0)")
    parser.add_argument("--cases", type=int, help="synthetic cases (default 32, quick 8)")
    parser.add_argument(
        "--heldout",
        type=int,
        help="more synthetic test cases, never trained on, scored with "
        "the split's test cases (default 40, quick 2; 0: the split's only)",
    )
    parser.add_argument(
        "--generator",
        choices=("anatomy", "tiny"),
        default="anatomy",
        help="synthetic data: full-size cases on real brain anatomy (default), or the tiny ellipsoid heads "
        "of the tables before it (64x64x48, quick 48x48x32)",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        help="mm the anatomy cases are resampled to by prepare (default 3, quick 4); the tests score on "
        "that grid",
    )
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also train the five SMML ablations, and CMC on its labeled cases only",
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="also train SMML in fp32 (checks that the default bf16-mixed keeps accuracy)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also score each peer of SMML (and of each SMML "
        "ablation run) alone on the same weights (row '<method> one peer', the mean of the "
        "two): what averaging two networks adds, apart from what mutual learning gives each one",
    )
    parser.add_argument(
        "--train-fit",
        action="store_true",
        help="also score every run on its own training "
        "cases (folder train-fit/): tells a model that has not fitted its data from one that "
        "does not generalise",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="only these methods (names as in the table; with SMML, "
        "single-branch is kept for the gain table)",
    )
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        help="config overlay stacked on every method's configs (repeatable), by path or "
        "shipped name, e.g. variants/public_seg_loss; give it its own --work, since run "
        "folders are named by method, seed and steps only",
    )
    parser.add_argument(
        "--overlay-on",
        nargs="+",
        metavar="METHOD",
        help="stack the overlays on these methods only (default: every method), e.g. "
        "--overlay-on SMML for an overlay of SMML's own settings; the others train as in "
        "their experiment files",
    )
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="score only the runs already trained in --work (an interrupted benchmark's table); the "
        "others are named in the table's notes, none is trained",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="fits run side by side, each on an equal share of the cores (default 1); tests "
        "run one at a time after the fits",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="result folder, replaced as a whole by each run (default "
        f"{RESULTS.relative_to(REPO)}, the benchmark's current result; quick: <work>/results)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="data and runs; finished runs are reused (default runs/quality or runs/quality-quick)",
    )
    return parser


def parse(argv: list[str] | None = None) -> Plan:
    """The command line as a checked plan; a bad option ends here, before any data is made."""
    parser = arguments()
    args = parser.parse_args(argv)
    quick = args.quick
    heldout = (2 if quick else 40) if args.heldout is None else args.heldout
    if heldout < 0:
        parser.error(f"--heldout must be >= 0, got {heldout}")
    if args.spacing is not None and (args.generator != "anatomy" or args.spacing <= 0):
        parser.error(f"--spacing {args.spacing}: a positive spacing, for the anatomy generator only")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    chosen = methods(args.ablations, args.fp32)
    if args.methods:
        known = [m.name for m in chosen]
        unknown = sorted(set(args.methods) - set(known))
        if unknown:
            parser.error(f"unknown --methods {unknown}; choose from {known}")
        # SMML's gain table needs the single branch beside it.
        keep = {*args.methods, "single-branch"} if "SMML" in args.methods else set(args.methods)
        chosen = [m for m in chosen if m.name in keep]
    try:
        args.overlay = [resolve(o) for o in args.overlay]
    except FileNotFoundError as err:
        parser.error(f"--overlay: {err}")
    overlaid = set(args.overlay_on or [m.name for m in chosen])
    if not args.overlay and args.overlay_on:
        parser.error("--overlay-on needs at least one --overlay")
    if unknown := sorted(overlaid - {m.name for m in chosen}):
        parser.error(f"--overlay-on {unknown}: not among the methods run ({[m.name for m in chosen]})")
    chosen = [replace(m, configs=(*m.configs, *args.overlay)) if m.name in overlaid else m for m in chosen]
    work = (args.work or REPO / "runs" / ("quality-quick" if quick else "quality")).resolve()
    out = args.out or (work / "results" if quick else RESULTS)
    try:
        check_result_folder(out)
    except FileExistsError as error:
        parser.error(f"--out {error}")
    return Plan(
        methods=tuple(chosen),
        seeds=tuple(args.seeds or ([0] if quick else [0, 1, 2])),
        steps=args.steps or (3 if quick else 600),
        cases=args.cases or (8 if quick else 32),
        heldout=heldout,
        data=DataSpec(
            generator=args.generator,
            shape=(48, 48, 32) if quick else (64, 64, 48),
            spacing=(args.spacing or (4.0 if quick else 3.0)) if args.generator == "anatomy" else None,
        ),
        prior_epochs=2 if quick else 30,
        peers=args.peers,
        train_fit=args.train_fit,
        jobs=args.jobs,
        finished_only=args.finished_only,
        work=work,
        out=out,
        command=shlex.join(
            ["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    )


def run(plan: Plan) -> Scores:
    """Data, priors and every fit (reused when finished), then every test: the per-case rows."""
    base = load_yaml((EXPERIMENTS / "synthetic.yaml",))["data"]
    patch = int(base["patch_size"])
    test_fraction = held_out_fraction(plan.cases, base["val_fraction"], base["test_fraction"])
    started = time.time()
    if warning := busy_cores_warning():
        print(warning, flush=True)
    print(f"== data: {plan.cases} {plan.data.describe()} in {plan.work}", flush=True)
    with_priors = [d for d in (load_yaml(m.configs)["data"] for m in plan.methods) if d.get("use_prior")]
    labeled = {(d.get("labeled_fraction"), d.get("labeled_cases")) for d in with_priors}
    if len(labeled) > 1:  # one cache holds the priors of one labeled set
        raise SystemExit(f"methods with priors train on different labeled sets {sorted(map(str, labeled))}")
    priors = with_priors[0] if with_priors else None
    cache_dir, split = prepare_data(plan.work, plan.cases, plan.data, patch, plan.prior_epochs, priors)
    data = data_args(cache_dir, test_fraction)
    heldout = prepare_heldout(plan.work, plan.cases, plan.heldout, plan.data, patch) if plan.heldout else []
    heldout_report = f"report-heldout-{plan.cases}-{plan.heldout}"
    train_cases = (
        test_on(cache_dir, split["train"], plan.work / "train-fit-split.json") if plan.train_fit else []
    )
    n_test = len(split["test"]) + plan.heldout
    runs = [
        (method, seed, plan.work / f"{slug(method.name)}-seed{seed}-steps{plan.steps}")
        for method in plan.methods
        for seed in plan.seeds
    ]
    missing: list[str] = []
    if plan.finished_only:  # score what is trained; name the rest in the table's notes
        from smml_lightning.data.cache import is_done

        missing = [f"{m.name} seed {seed}" for m, seed, d in runs if not is_done(d)]
        runs = [(m, seed, d) for m, seed, d in runs if is_done(d)]
        if not runs:
            raise SystemExit(f"--finished-only: no finished run in {plan.work}")
        if missing:
            print(f"== --finished-only: not trained, left out: {', '.join(missing)}", flush=True)
    peered = {m.name for m in plan.methods if plan.peers and two_peers(m)}  # --peers: scored peer by peer too
    print(f"== {len(runs)} fits of {plan.steps} steps, {plan.jobs} at a time", flush=True)
    fit_walls = fit_all(runs, data, plan.steps, len(split["train"]), plan.jobs)
    rows, train_rows, walls = [], [], []
    et_min = plan.data.et_min_voxels()
    for method, seed, run_dir in runs:
        print(
            f"== {method.name} seed {seed}: test on {n_test} cases x 15 subsets ({time.time() - started:.0f} s)",
            flush=True,
        )
        rows.append(test(method, data, seed, run_dir, et_min_voxels=et_min))
        if heldout:
            rows.append(test(method, heldout, seed, run_dir, heldout_report, et_min))
        if train_cases:
            train_rows.append(test(method, train_cases, seed, run_dir, TRAIN_FIT, et_min))
        walls.append({"method": method.name, "seed": seed, "wall_seconds": fit_walls[run_dir]})
        if method.name in peered:
            for k in (0, 1):
                peer = Method(
                    peer_row(method.name),
                    method.configs,
                    (*method.args, f"--model.init_args.inference_branches=[{k}]"),
                )
                rows.append(test(peer, data, seed, run_dir, f"report-peer{k}", et_min))
                if heldout:
                    rows.append(test(peer, heldout, seed, run_dir, f"{heldout_report}-peer{k}", et_min))
            walls.append({"method": peer_row(method.name), "seed": seed, "wall_seconds": fit_walls[run_dir]})
    trained = {m.name for m, _, _ in runs}
    order = [
        name
        for m in plan.methods
        if m.name in trained
        for name in (m.name, *([peer_row(m.name)] if m.name in peered else []))
    ]
    return Scores(
        rows=pd.concat(rows),
        train_rows=pd.concat(train_rows) if train_rows else None,
        walls=pd.DataFrame(walls),
        order=order,
        split=split,
        missing=missing,
    )


def tables(plan: Plan, scores: Scores) -> tuple[dict, dict[tuple[str, str], pd.DataFrame]]:
    """The summary tables of :func:`summarise` and friends, and each gain table over the single branch."""
    summary = summarise(scores.rows, scores.walls, scores.order)
    summary["last_modality"] = last_modality_gains(scores.rows, scores.order)
    summary["spread_sources"] = spread_sources(scores.rows, scores.order)
    if scores.train_rows is not None:
        trained = [m.name for m in plan.methods]
        summary[TRAIN_FIT] = summarise(scores.train_rows, scores.walls, trained)
        summary[TRAIN_FIT]["last_modality"] = last_modality_gains(scores.train_rows, trained)
    gain = {
        (a, "single-branch"): gains(summary["per_subset"], a, "single-branch")
        for a in scores.order
        if (a == "SMML" or a.endswith(PEER)) and "single-branch" in scores.order
    }
    return summary, gain


def result_files(
    plan: Plan, scores: Scores, summary: dict, gain: dict[tuple[str, str], pd.DataFrame], seconds: float
) -> dict[str, str | bytes]:
    """The result folder's files by name: Markdown, CSVs, the figure and PROVENANCE.md."""
    n_test = len(scores.split["test"]) + plan.heldout
    meta = {
        "date": time.strftime("%Y%m%d"),
        "cases": plan.cases,
        "data": plan.data.describe(),
        "et_min_voxels": plan.data.et_min_voxels(),
        "steps": plan.steps,
        "seeds": list(plan.seeds),
        "jobs": plan.jobs,
        "command": plan.command,
        "missing": scores.missing,
        "split": f"{len(scores.split['train'])}/{len(scores.split['test'])} train/test (the config's validation "
        "cases join the test set: runs here do not validate)"
        + (
            f", and {plan.heldout} more held-out test cases (numbered {plan.cases + 1}-"
            f"{plan.cases + plan.heldout}, same generator), {n_test} test cases in all"
            if plan.heldout
            else ""
        ),
    }
    files: dict[str, str | bytes] = {
        "quality.md": markdown(summary, gain, meta),
        "runs.csv": summary["per_run"].to_csv(index=False),
        "subsets.csv": summary["subsets"].to_csv(index=False),
        "last_modality.csv": summary["last_modality"].to_csv(index=False),
        "spread_sources.csv": summary["spread_sources"].to_csv(index=False),
    }
    if TRAIN_FIT in summary:
        files["train_fit_runs.csv"] = summary[TRAIN_FIT]["per_run"].to_csv(index=False)
        files["train_fit_last_modality.csv"] = summary[TRAIN_FIT]["last_modality"].to_csv(index=False)
    for (a, _), table in gain.items():
        files[f"gain_{slug(a)}_vs_single.csv"] = table.to_csv(index=False)
    files["quality.png"] = figure(summary["subsets"], scores.order)
    files[PROVENANCE] = provenance(
        "quality benchmark",
        plan.command,
        REPO,
        (
            f"Work folder: `{plan.work}` (runs, per-case reports, fit logs)",
            f"Wall time: {seconds:.0f} s, {plan.jobs} fit(s) at a time",
        ),
    )
    return files


def main(argv: list[str] | None = None) -> None:
    plan = parse(argv)
    started = time.time()
    scores = run(plan)
    summary, gain = tables(plan, scores)
    files = result_files(plan, scores, summary, gain, time.time() - started)
    replaced = plan.out.is_dir() and any(plan.out.iterdir())
    write_result_folder(plan.out, files)
    print(files["quality.md"])
    print(
        f"results in {plan.out}{' (the previous result there replaced)' if replaced else ''} "
        f"({time.time() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
