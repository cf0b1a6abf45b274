"""GPU check (issue 48): the paper's configuration end to end on one CUDA GPU, in under 10 minutes on an H100.

1. ``smml synth``: full-size synthetic BraTS 2018 cases (the command's default generator).
2. ``smml prepare`` into a cache, and priors as tensors (uniform, 0.25 per class: SAM is not needed for a
   speed check and its priors would not change the step's cost).
3. ``smml fit --config brats2018``: the paper's network, SMML with every term, ``bf16-mixed``, 128^3
   patches, for ``--steps`` steps (a few hundred), validating once at the end; prints the median step
   time (after the first epoch's warm-up) and the peak GPU memory of the fit.
4. ``smml test`` of ``--test-cases`` whole cases over all 15 modality subsets; prints the 15-subset mean
   Dice per region and the test's seconds.
5. The speed table on the GPU: the training step of our single branch (bf16 and fp32) and of SMML (bf16)
   at 128^3 with the brats2018 network (``benchmarks/speed.py``'s item 7), with each one's peak memory
   and first call. ``--compile`` adds both bf16 steps with ``model.init_args.compile=true`` (the networks'
   training forward through inductor), whose first call is the compile: the measurement that decides
   whether compiling becomes the GPU default. It takes minutes more, so it is not on by default.

Exits non-zero on any error, a non-finite loss or a missing report figure. ``--smoke`` runs the same
steps on the CPU with tiny shapes and a shrunken network in seconds: the test suite runs it
(``tests/test_gpu_check.py``) so that the script cannot rot between GPU machines.

Usage: ``python benchmarks/gpu_check.py [--smoke] [--compile] [--out DIR] [--steps 300] [--cases 8]``. Without
``--out`` everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # speed.py, and this file as `gpu_check` for the CLI

# The smoke mode's network: the brats2018 layout (5 stages, 4 modalities, transformer, refiner) at toy widths.
SMOKE_NETWORK = {"base_width": 4, "transformer_dim": 16, "num_heads": 2, "mlp_ratio": 2.0}


class StepTimer(pl.Callback):
    """Wall time of every training step (waiting for the GPU at both ends) and the losses it saw."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.steps_in_first_epoch = 0
        self._start = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        if trainer.current_epoch == 0:
            self.steps_in_first_epoch += 1


def phase(name: str, started: float) -> None:
    print(f"\n== {name} ({time.perf_counter() - started:.0f} s)", flush=True)


def write_tensor_priors(cache_dir: Path) -> None:
    """A uniform prior (4 modalities x 4 classes) per cached case, as ``smml priors`` would store it."""
    from smml_lightning.data import cache

    for name in cache.list_cases(cache_dir):
        shape = cache.load_meta(cache_dir, name).cropped_shape
        cache.write_prior(cache_dir, name, np.full((4, 4, *shape), 0.25, dtype=np.float16))


def write_split_file(cache_dir: Path, path: Path, n_test: int) -> dict[str, list[str]]:
    """Last ``n_test`` cases for the test, the one before for validation, the rest for training."""
    from smml_lightning.data import cache, splits

    names = cache.list_cases(cache_dir)
    if len(names) < n_test + 2:
        raise SystemExit(
            f"gpu_check: {len(names)} cases cannot give {n_test} test, 1 validation and 1+ training"
        )
    split = {"train": names[: -n_test - 1], "val": names[-n_test - 1 : -n_test], "test": names[-n_test:]}
    splits.write_split(split, path)
    return split


# The compiled rows of ``--compile``: the bf16 steps of item 7 with the networks' forward through inductor.
COMPILED_CONFIGS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "single bf16 compiled": ("single", True, {"compile": True}),
    "smml bf16 compiled": ("smml", True, {"compile": True}),
}


def speed_table(
    device: str, reps: int, patch: int, network: dict[str, Any] | None, compiled: bool = False
) -> list[dict[str, Any]]:
    """Item 7 of ``benchmarks/speed.py`` on ``device`` (plus :data:`COMPILED_CONFIGS` if ``compiled``),
    with each configuration's peak memory and first call (for a compiled one, the compile)."""
    import speed

    from smml_lightning.lit.base import CompiledForward

    configs = speed.PAPER_CONFIGS | (COMPILED_CONFIGS if compiled else {})
    rows = []
    steps = {}
    for name, (method, bf16, kwargs) in configs.items():
        module = speed.build_paper(method, device, patch=patch, network_overrides=network, **kwargs)
        steps[name] = speed.paper_step(module, bf16, device, patch=patch)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first = time.perf_counter()
        steps[name]()  # warm-up (for a compiled module, the compile), and the step's peak memory
        first_call = time.perf_counter() - first
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        row = {"config": name, "peak_gib": peak, "first_call_s": first_call}
        if kwargs.get("compile"):
            wrapped = [m.forward for m in module.modules() if isinstance(m.forward, CompiledForward)]
            if not wrapped:
                raise SystemExit(f"gpu_check: {name} has no compiled network")
            row["compile_fell_back"] = any(f.failed for f in wrapped)
        rows.append(row)
    times = speed.interleaved(steps, reps, warmup=0)
    for row in rows:
        row["seconds"] = statistics.median(times[row["config"]])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny shapes, a few steps (seconds): the tests' mode"
    )
    parser.add_argument("--out", help="keep everything in this folder (default: a temporary one, removed)")
    parser.add_argument("--steps", type=int, help="training steps (default 300; 2 with --smoke)")
    parser.add_argument(
        "--cases",
        type=int,
        help="synthetic cases, 2 test + 1 validation + the rest training (default 10; 4 with --smoke)",
    )
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument(
        "--reps", type=int, help="timed repetitions per speed-table row (default 5; 1 with --smoke)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="add the bf16 steps with model.init_args.compile=true to the speed table (minutes more)",
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only the speed table (step 5): e.g. a second, shorter run with --compile",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes for synth/prepare and data-loader workers (0 loads in the main process)",
    )
    args = parser.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run with --smoke for the CPU version", file=sys.stderr)
        return 2
    os.environ.setdefault("WANDB_MODE", "offline")
    steps = args.steps or (2 if smoke else 300)
    n_cases = args.cases or (4 if smoke else 10)
    reps = args.reps or (1 if smoke else 5)
    workers = 0 if smoke else args.workers
    patch = 32 if smoke else 128
    device = "cpu" if smoke else "cuda"
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="smml-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run(
            out,
            smoke,
            steps,
            n_cases,
            args.test_cases,
            reps,
            workers,
            patch,
            device,
            args.compile,
            args.speed_only,
        )
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


def run(
    out: Path,
    smoke: bool,
    steps: int,
    n_cases: int,
    n_test: int,
    reps: int,
    workers: int,
    patch: int,
    device: str,
    compiled: bool = False,
    speed_only: bool = False,
) -> int:
    started = time.perf_counter()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "fit": None,
        "test": None,
    }
    if not speed_only:
        results |= fit_and_test(out, smoke, steps, n_cases, n_test, workers, patch, device, started)
        gc.collect()  # the fitted model (the fit's CLI and trainer hold cycles) leaves the GPU
        if device == "cuda":
            torch.cuda.empty_cache()  # so that the speed table measures its own peaks

    phase(f"speed table: training step at {patch}^3, {reps} rep(s)", started)
    table = speed_table(device, reps, patch, SMOKE_NETWORK if smoke else None, compiled)
    t = {row["config"]: row["seconds"] for row in table}
    results |= {
        "speed": table,
        "smml_bf16_over_single_bf16": t["smml bf16"] / t["single bf16"],
        "smml_bf16_over_single_fp32": t["smml bf16"] / t["single fp32"],
        "fused_over_plain": t["smml bf16 fused peers"] / t["smml bf16"],
        "refiners_share": 1 - t["smml bf16 without refiners"] / t["smml bf16"],
        "compiled_over_eager": {
            method: t[f"{method} bf16 compiled"] / t[f"{method} bf16"] for method in ("single", "smml")
        }
        if compiled
        else None,
        "total_seconds": time.perf_counter() - started,
    }
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(markdown(results, patch), flush=True)
    return 0


def fit_and_test(
    out: Path,
    smoke: bool,
    steps: int,
    n_cases: int,
    n_test: int,
    workers: int,
    patch: int,
    device: str,
    started: float,
) -> dict[str, Any]:
    """Steps 1-4: synthetic cases, prepare, the bf16 fit and the 15-subset test; their figures."""
    from smml_lightning.cli import COMMANDS

    raw, cache_dir, run_dir = out / "raw", out / "cache", out / "run"
    phase(f"smml synth: {n_cases} cases", started)
    synth = [str(raw), f"--cases={n_cases}", "--layout=brats2018", f"--workers={max(workers, 1)}"]
    COMMANDS["synth"].run([*synth, *([f"--shape=[{patch},{patch},{patch}]"] if smoke else [])])
    phase("smml prepare, tensor priors", started)
    COMMANDS["prepare"].run(
        [str(raw), str(cache_dir), f"--workers={max(workers, 1)}", f"--min_size=[{patch},{patch},{patch}]"]
    )
    write_tensor_priors(cache_dir)
    split = write_split_file(cache_dir, out / "split.json", n_test)

    # Whole epochs, validating once at the end: samples_per_volume sets how many steps an epoch has.
    n_train = len(split["train"])
    per_volume = max(1, min(25, math.ceil(steps / n_train / 2)))
    epochs = math.ceil(steps / (n_train * per_volume))
    common = [
        "--config=brats2018",
        f"--data.cache_dir={cache_dir}",
        f"--data.split={out / 'split.json'}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir=.",
        "--trainer.enable_progress_bar=false",
        f"--data.num_workers={workers}",
        f"--data.patch_size={patch}",
    ]
    if smoke:
        common += [f"--model.init_args.network.init_args.{k}={v}" for k, v in SMOKE_NETWORK.items()]
        common += ["--model.init_args.refiner.init_args.width=4"]
    fit = [
        *common,
        f"--trainer.max_epochs={epochs}",
        f"--trainer.check_val_every_n_epoch={epochs}",
        "--trainer.num_sanity_val_steps=0",
        f"--data.samples_per_volume={per_volume}",
        f"--data.queue_length={max(8, 2 * per_volume)}",
        "--model.init_args.warmup_epochs=0",
        '--trainer.callbacks=[{"class_path": "gpu_check.StepTimer"}]',
    ]
    phase(
        f"smml fit --config brats2018: {epochs} epochs x {n_train} cases x {per_volume} patches, bf16-mixed",
        started,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fit_start = time.perf_counter()
    cli = COMMANDS["fit"].run(fit)
    fit_seconds = time.perf_counter() - fit_start
    fit_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    timer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepTimer")
    if not timer.seconds or not all(math.isfinite(v) for v in timer.losses):
        raise SystemExit(f"gpu_check: the fit's losses are not finite: {timer.losses[-5:]}")
    later = timer.seconds[timer.steps_in_first_epoch :] or timer.seconds
    step_median = statistics.median(later)
    last = run_dir / "checkpoints" / "last.ckpt"

    phase(f"smml test: {n_test} cases x 15 subsets", started)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    test_start = time.perf_counter()
    report_dir = run_dir / "test-check"
    COMMANDS["test"].run([*common, f"--ckpt_path={last}", f"--model.init_args.report_dir={report_dir}"])
    test_seconds = time.perf_counter() - test_start
    test_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    summary = _read_summary(report_dir / "summary.csv")
    return {
        "fit": {
            "steps": len(timer.seconds),
            "seconds": fit_seconds,
            "median_step_s": step_median,
            "peak_gib": fit_peak,
            "last_loss": timer.losses[-1],
        },
        "test": {"cases": n_test, "seconds": test_seconds, "peak_gib": test_peak, "dice_15_subsets": summary},
    }


def _read_summary(path: Path) -> dict[str, float]:
    """The 15-subset average Dice per region from ``smml test``'s ``summary.csv``."""
    import pandas as pd

    if not path.is_file():
        raise SystemExit(f"gpu_check: smml test wrote no {path}")
    table = pd.read_csv(path)
    average = table[table["subset"] == "Average"]
    dice = {c.removesuffix("_dice"): float(average[c].iloc[0]) for c in table.columns if c.endswith("_dice")}
    if len(average) != 1 or not dice or not all(math.isfinite(v) for v in dice.values()):
        raise SystemExit(f"gpu_check: {path} has no finite 15-subset average Dice: {dice}")
    return dice


def gib(value: float) -> str:
    return f"{value:.2f} GiB" if math.isfinite(value) else "n/a (CPU)"


def fit_test_lines(fit: dict[str, Any], test: dict[str, Any]) -> list[str]:
    dice = ", ".join(f"{k} {100 * v:.1f}" for k, v in test["dice_15_subsets"].items())
    return [
        (
            f"| fit: median step after epoch 1 ({fit['steps']} steps, bf16-mixed, loader included) | "
            f"{fit['median_step_s']:.3f} s |"
        ),
        f"| fit: wall time | {fit['seconds']:.0f} s |",
        f"| fit: peak GPU memory | {gib(fit['peak_gib'])} |",
        f"| test: {test['cases']} cases x 15 subsets, wall time | {test['seconds']:.0f} s |",
        f"| test: peak GPU memory | {gib(test['peak_gib'])} |",
        f"| test: 15-subset mean Dice (%) | {dice} |",
    ]


def markdown(r: dict[str, Any], patch: int) -> str:
    fit, test = r["fit"], r["test"]
    lines = [
        f"## GPU check on {r['device']} ({r['total_seconds'] / 60:.1f} min)",
        "",
        "| item | value |",
        "|---|---|",
    ]
    if fit is not None and test is not None:
        lines += fit_test_lines(fit, test)
    for row in r["speed"]:
        fell_back = " (compile failed: eager)" if row.get("compile_fell_back") else ""
        lines.append(
            f"| step {row['config']} ({patch}^3, brats2018 network) | {row['seconds']:.3f} s, "
            f"peak {gib(row['peak_gib'])}, first call {row['first_call_s']:.1f} s{fell_back} |"
        )
    lines.append(f"| SMML bf16 / single bf16 (target <= 2.1x) | {r['smml_bf16_over_single_bf16']:.2f}x |")
    lines.append(f"| SMML bf16 / single fp32 (target <= 1x) | {r['smml_bf16_over_single_fp32']:.2f}x |")
    lines.append(f"| SMML bf16, fused peers / plain | {r['fused_over_plain']:.2f}x |")
    lines.append(f"| the two refiners' share of the SMML bf16 step | {r['refiners_share']:.0%} |")
    for method, ratio in (r["compiled_over_eager"] or {}).items():
        lines.append(f"| {method} bf16, compiled / eager | {ratio:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
