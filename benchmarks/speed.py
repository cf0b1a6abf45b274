"""Speed benchmarks: training step, mixed precision, SMML vs one branch, 15-subset reuse, data loading,
whole-case inference memory and preprocessing, measured side by side in one run.

The machine may be shared and noisy, so the configurations of each item alternate repetition by
repetition (A B C, C B A, ...) and the table reports medians and ratios of medians: a load spike then
hits every configuration rather than one. Everything runs on synthetic data written to a temporary
folder. ``--quick`` is a smoke version (small patches, fewer repetitions, an extrapolated naive
15-subset cost and a smaller inference case); the default run is sized for about 15 minutes on 2 cores.

Results: a table ``item | measured | target | pass/fail`` on stdout, and ``speed.md``, ``speed.json``
(every repetition's seconds) and ``PROVENANCE.md`` (command, commit, host CPU, date) in the benchmark's
current-result folder ``benchmarks/results/speed/``, which each full run replaces as a whole; ``--quick``
writes to ``runs/speed-quick``, ``--out`` anywhere else, and an interrupted run to ``<out>-partial``.
``--profile`` adds torch.profiler's top operators for one training step per precision (where the
time of a step goes).

Item 7 is the training step at the paper's size (128^3, the brats2018 experiment's network, every SMML
term, priors as tensors): SMML in bf16 against our single branch in bf16 and in fp32, one warm-up and
``--paper-reps`` (default 1) alternated repetitions each, a few minutes; ``--no-paper-size`` skips it.

Usage: ``python benchmarks/speed.py [--quick] [--threads 2] [--profile] [--skip data,infer] [--no-paper-size]
[--out DIR]``.
"""

from __future__ import annotations

import os

# libgomp reads this when torch loads, which here is before smml_lightning sets the same default (its
# __init__ says why). Override by setting GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import copy
import datetime as dt
import functools
import gc
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from smml_lightning.analysis.results import (
    PROVENANCE,
    check_result_folder,
    provenance,
    write_result_folder,
)
from smml_lightning.analysis.timing import (
    cpu_description,
    interleaved,
    med,
    synthetic_branch,
)
from smml_lightning.data import cache
from smml_lightning.data.datamodule import BratsDataModule, read_label_npy
from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.layouts import discover
from smml_lightning.data.modalities import MODALITIES, SUBSETS
from smml_lightning.data.prepare import prepare, z_score
from smml_lightning.data.synthetic import synthesize, synthesize_arrays
from smml_lightning.data.transforms import AugmentedPatches, case_subject
from smml_lightning.evaluation.inference import predict_subsets
from smml_lightning.lit.baselines import SingleBranch
from smml_lightning.lit.smml import SMML
from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.base import MaskedSegmenter
from smml_lightning.models.refine import SemanticRefiner

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "speed"  # the benchmark's current result
FULL_SHAPE = (240, 240, 155)
GIB = 2**30


@dataclass
class Settings:
    """Sizes and repetitions of one run (``--quick`` shrinks them)."""

    patch: int = 64
    batch: int = 2
    reps: int = 3
    eval_case: tuple[int, int, int] = (128, 128, 96)
    eval_roi: int = 64
    eval_overlap: float = 0.5
    naive_subsets: int = 4  # single-subset runs actually timed; the rest are extrapolated
    infer_case: tuple[int, int, int] = FULL_SHAPE
    # One subset, as `smml predict` runs per case. `--infer-15` adds all 15 subsets with the brats2018
    # network (what `smml test` runs per case): minutes at this size on 2 cores, outside the 15-minute default.
    infer_configs: tuple[str, ...] = ("default-1", "fastest-1")
    loader_epochs: int = 2
    prepare_reps: int = 2
    n_cases: int = 4


QUICK = Settings(
    patch=32,
    reps=2,
    eval_case=(64, 64, 48),
    eval_roi=32,
    naive_subsets=3,
    infer_configs=("fastest-1",),
    loader_epochs=1,
    prepare_reps=1,
)


@dataclass
class Row:
    """One line of the final table; ``passed`` is ``None`` for figures reported without a target."""

    item: str
    measured: str
    target: str = "-"
    passed: bool | None = None
    value: float | None = None

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.passed]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        item: str,
        value: float,
        fmt: str,
        target: str = "-",
        check: Callable[[float], bool] | None = None,
    ) -> None:
        self.rows.append(
            Row(item, fmt.format(value), target, None if check is None else bool(check(value)), value)
        )
        print(f"  {item}: {fmt.format(value)}" + (f"  (target {target})" if check else ""), flush=True)


# ---- models and batches ----------------------------------------------------------------------------


def build(method: str, patch: int, channels_last: bool) -> SMML | SingleBranch:
    """A module as the CLI would build it; ``warmup_epochs=0`` so every SMML loss term is computed."""
    torch.manual_seed(0)
    if method == "smml":
        module: SMML | SingleBranch = SMML(
            network=synthetic_branch(patch),
            refiner=functools.partial(SemanticRefiner, width=8),
            warmup_epochs=0,
            roi_size=patch,
            channels_last=channels_last,
        )
    else:
        module = SingleBranch(network=synthetic_branch(patch), roi_size=patch, channels_last=channels_last)
    module.setup("fit")
    return module


def batch(size: int, patch: int) -> dict[str, torch.Tensor]:
    """A training batch with tensor priors (no SAM) and two distinct masks per sample."""
    g = torch.Generator().manual_seed(0)
    shape = (size, 1, patch, patch, patch)
    # Two available modalities per branch and sample: close to the mean under uniform subsets (32/15),
    # so SMML and the single branch run their auxiliary decoders on as many pairs as in training.
    masks = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1]], [[1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    return {
        "image": torch.randn(size, 4, *shape[2:], generator=g),
        "label": torch.randint(0, 4, shape, generator=g),
        "masks": masks[torch.arange(size) % 2],
        "prior": torch.rand(size, 4, 4, *shape[2:], generator=g).softmax(dim=2),
    }


def train_step(module: SMML | SingleBranch, data: dict[str, torch.Tensor], bf16: bool) -> Callable[[], None]:
    """One optimisation step as Lightning runs it (``precision=bf16-mixed`` = autocast around the step)."""
    optimizer = module.configure_optimizers()["optimizer"]
    data = dict(data, image=module._layout(data["image"]))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = module.training_losses(data)
            loss = torch.stack(list(terms.values())).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---- 1 + 2: training step ----------------------------------------------------------------------------

STEP_CONFIGS = {  # name: (method, bf16, channels_last)
    "smml fp32": ("smml", False, False),
    "smml bf16": ("smml", True, False),
    "smml bf16+CL": ("smml", True, True),
    "single fp32": ("single", False, False),
    "single bf16": ("single", True, False),
    "single bf16+CL": ("single", True, True),
}


def peaks(reps: int) -> dict[str, float]:
    """GFLOP/s of a large conv3d (fp32; bf16 + channels_last_3d) and a 2048^2 matmul (fp32, bf16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 48, 48, 48, generator=g)
    w = torch.randn(64, 64, 3, 3, 3, generator=g)
    x_cl, w_cl = (t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d) for t in (x, w))
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    a16, b16 = a.bfloat16(), b.bfloat16()
    conv_flops = 2 * 64 * 64 * 27 * 48**3
    mm_flops = 2 * 2048**3
    fns = {
        "conv3d fp32": lambda: torch.nn.functional.conv3d(x, w, padding=1),
        "conv3d bf16+CL": lambda: torch.nn.functional.conv3d(x_cl, w_cl, padding=1),
        "matmul fp32": lambda: a @ b,
        "matmul bf16": lambda: a16 @ b16,
    }
    times = interleaved(fns, max(reps, 5))
    return {k: (conv_flops if k.startswith("conv") else mm_flops) / med(v) / 1e9 for k, v in times.items()}


def bench_steps(s: Settings, report: Report) -> float:
    """Items 1 and 2; returns the fastest SMML step (seconds) for the data item's consumption rate."""
    print(f"[1,2] training step, patch {s.patch}^3, batch {s.batch}", flush=True)
    data = batch(s.batch, s.patch)
    steps = {
        name: train_step(build(m, s.patch, cl), data, bf16) for name, (m, bf16, cl) in STEP_CONFIGS.items()
    }
    flops = {name: count_flops(steps[name]) for name in ("smml fp32", "smml bf16", "single bf16")}
    times = interleaved(steps, s.reps)
    t = {k: med(v) for k, v in times.items()}
    peak = peaks(s.reps)
    report.raw["steps"] = {
        "seconds": times,
        "flops": flops,
        "peak_gflops": peak,
        "patch": s.patch,
        "batch": s.batch,
    }
    for name, value in t.items():
        report.add(f"step {name} ({s.patch}^3, batch {s.batch})", value, "{:.2f} s")
    # The target is on the configs' setting, bf16-mixed without channels-last (the module default); the
    # "bf16+CL" row shows whether channels-last pays on this CPU (its norms convert layouts).
    report.add(
        "1. SMML speed-up fp32 / bf16 (configs' default, no CL)",
        t["smml fp32"] / t["smml bf16"],
        "{:.2f}x",
        ">= 2.5x",
        lambda v: v >= 2.5,
    )
    report.add("1. SMML speed-up fp32 / bf16+CL", t["smml fp32"] / t["smml bf16+CL"], "{:.2f}x")
    report.add("1. SMML step GFLOP (fwd+bwd)", flops["smml fp32"] / 1e9, "{:.1f}")
    report.add("1. achieved fp32 GFLOP/s", flops["smml fp32"] / t["smml fp32"] / 1e9, "{:.1f}")
    report.add("1. achieved bf16 GFLOP/s", flops["smml bf16"] / t["smml bf16"] / 1e9, "{:.1f}")
    for name, value in peak.items():
        report.add(f"1. peak {name} GFLOP/s", value, "{:.0f}")
    report.add(
        "1. fp32 step % of conv3d fp32 peak",
        100 * flops["smml fp32"] / t["smml fp32"] / 1e9 / peak["conv3d fp32"],
        "{:.1f}%",
    )
    report.add(
        "1. bf16 step % of conv3d bf16+CL peak",
        100 * flops["smml bf16"] / t["smml bf16"] / 1e9 / peak["conv3d bf16+CL"],
        "{:.1f}%",
    )
    report.add(
        "2. SMML / single step, bf16",
        t["smml bf16"] / t["single bf16"],
        "{:.2f}x",
        "<= 2.3x",
        lambda v: v <= 2.3,
    )
    report.add("2. SMML / single step, bf16+CL", t["smml bf16+CL"] / t["single bf16+CL"], "{:.2f}x")
    report.add("2. SMML / single step, fp32", t["smml fp32"] / t["single fp32"], "{:.2f}x")
    report.add("2. SMML / single FLOPs", flops["smml bf16"] / flops["single bf16"], "{:.2f}x")
    return min(t["smml fp32"], t["smml bf16"], t["smml bf16+CL"])


def profile_steps(s: Settings, report: Report, rows: int = 15) -> None:
    """torch.profiler's top operators (self CPU time) of one SMML and one single-branch step."""
    from torch.profiler import ProfilerActivity, profile

    data = batch(s.batch, s.patch)
    tables = {}
    for name in ("smml fp32", "smml bf16", "smml bf16+CL", "single fp32"):
        method, bf16, cl = STEP_CONFIGS[name]
        step = train_step(build(method, s.patch, cl), data, bf16)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45
        )
        print(f"--- profile: {name}, {s.patch}^3\n{table}", flush=True)
        tables[name] = table
    report.raw["profiles"] = tables


# ---- 7: the training step at the paper's size ------------------------------------------------------------

PAPER_PATCH = 128
PAPER_CONFIGS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    # name: (method, bf16, SMML arguments); the issue-48 targets compare the first three
    "smml bf16": ("smml", True, {}),
    "single bf16": ("single", True, {}),
    "single fp32": ("single", False, {}),
    "smml bf16 fused peers": ("smml", True, {"fuse_peers": True}),
    "smml bf16 without refiners": ("smml", True, {"use_prior": False}),
}


def build_paper(
    method: str,
    device: str = "cpu",
    patch: int = PAPER_PATCH,
    network_overrides: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> SMML | SingleBranch:
    """A module with the brats2018 experiment's network (and SMML refiner), read from the shipped config;
    ``warmup_epochs=0`` so every SMML term is computed. ``network_overrides`` replace network arguments
    (the GPU check's CPU smoke mode shrinks it); ``module_kwargs`` go to the module (``fuse_peers`` to
    SMML, ``compile`` to either)."""
    from smml_lightning.experiments import load

    model = load("brats2018")["model"]["init_args"]
    net = functools.partial(
        MMFormer, **(model["network"]["init_args"] | (network_overrides or {})), patch_size=patch
    )
    torch.manual_seed(0)
    if method == "smml":
        refiner = functools.partial(SemanticRefiner, **model["refiner"]["init_args"])
        module: SMML | SingleBranch = SMML(
            network=net, refiner=refiner, warmup_epochs=0, roi_size=patch, **module_kwargs
        )
    else:
        module = SingleBranch(network=net, roi_size=patch, **module_kwargs)
    module.setup("fit")
    return module.to(device)


def paper_step(
    module: SMML | SingleBranch, bf16: bool, device: str = "cpu", patch: int = PAPER_PATCH
) -> Callable[[], None]:
    """One optimisation step (fwd + bwd + Adam) on one patch with tensor priors, bf16 autocast as
    ``precision=bf16-mixed`` or fp32; on CUDA it waits for the GPU so that the time is the step's."""
    optimizer = module.configure_optimizers()["optimizer"]
    data = {k: v.to(device) for k, v in batch(1, patch).items()}
    data["image"] = module._layout(data["image"])
    kind = torch.device(device).type

    def step() -> None:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            terms = module.training_losses(data)
            loss = torch.stack(list(terms.values())).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if kind == "cuda":
            torch.cuda.synchronize()

    return step


def bench_paper(reps: int, report: Report, device: str = "cpu") -> dict[str, float]:
    """Item 7: SMML (brats2018 network, refiners, every term, priors as tensors) against our single
    branch at 128^3, batch 1, alternating; returns the median seconds per configuration."""
    print(
        f"[7] training step at the paper's size: {PAPER_PATCH}^3, batch 1, brats2018 network, {reps} rep(s) "
        "after one warm-up",
        flush=True,
    )
    steps = {
        name: paper_step(build_paper(method, device, **kwargs), bf16, device)
        for name, (method, bf16, kwargs) in PAPER_CONFIGS.items()
    }
    times = interleaved(steps, reps)
    t = {k: med(v) for k, v in times.items()}
    report.raw["paper"] = {"seconds": times, "patch": PAPER_PATCH, "device": device}
    for name, value in t.items():
        report.add(f"7. step {name} ({PAPER_PATCH}^3, brats2018 network)", value, "{:.2f} s")
    report.add(
        "7. SMML bf16 / single bf16",
        t["smml bf16"] / t["single bf16"],
        "{:.2f}x",
        "<= 2.1x",
        lambda v: v <= 2.1,
    )
    report.add(
        "7. SMML bf16 / single fp32",
        t["smml bf16"] / t["single fp32"],
        "{:.2f}x",
        "<= 1x",
        lambda v: v <= 1.0,
    )
    report.add("7. SMML bf16, fused peers / plain", t["smml bf16 fused peers"] / t["smml bf16"], "{:.2f}x")
    report.add(
        "7. SMML bf16 without refiners / single bf16 (two branches + HCC)",
        t["smml bf16 without refiners"] / t["single bf16"],
        "{:.2f}x",
    )
    report.add(
        "7. the two refiners' share of the SMML bf16 step",
        1 - t["smml bf16 without refiners"] / t["smml bf16"],
        "{:.0%}",
    )
    if device == "cpu":
        models = cast(SMML, build_paper("smml", device)).inference_models()
        report.add(
            f"7. FLOP bound of 15 subsets / one subset (brats2018 network, one {PAPER_PATCH}^3 window)",
            subset_flop_bound(models[0], PAPER_PATCH),
            "{:.2f}x",
        )
    return t


def subset_flop_bound(model: MaskedSegmenter, roi: int) -> float:
    """(encode + 15 decodes) / (encode + one decode) of one ``roi``^3 window, in FLOPs: what the
    15-subset / one-subset time ratio would be if every operation ran at the same rate."""
    model = copy.deepcopy(model).eval().requires_grad_(False)  # the flop counter's hooks need no grads
    image = torch.zeros(1, len(MODALITIES), roi, roi, roi)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            encoded = model.encode(image)
        encode = counter.get_total_flops()
        decodes = []
        for subset in (SUBSETS[-1:], SUBSETS):
            masks = [torch.tensor([s]) for s in subset]
            with FlopCounterMode(display=False) as counter:
                model.decode_subsets(encoded, masks)
            decodes.append(counter.get_total_flops())
    return (encode + decodes[1]) / (encode + decodes[0])


# ---- 3: 15-subset evaluation with encoder reuse --------------------------------------------------------


def zscored_case(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """A synthetic case as the cache holds it: ``(1, 4, *shape)`` float32, z-scored over the brain."""
    images, _, _ = synthesize_arrays(shape, seed=seed)
    brain = np.logical_or.reduce([images[m] != 0 for m in MODALITIES])
    return torch.from_numpy(np.stack([z_score(images[m], brain) for m in MODALITIES]))[None]


def bench_subsets(s: Settings, report: Report) -> None:
    """Item 3: all 15 subsets (encoder reuse, subsets decoded in batches: ``predict_subsets``' default),
    the same decoded subset by subset (``subset_batch=1``), and single subsets, alternated."""
    print(
        f"[3] 15-subset evaluation of a {s.eval_case} case, roi {s.eval_roi}, bf16 (the configs' precision)",
        flush=True,
    )
    models = build("smml", s.eval_roi, False).inference_models()
    image = zscored_case(s.eval_case)
    run = functools.partial(
        predict_subsets,
        models,
        image,
        roi_size=s.eval_roi,
        overlap=s.eval_overlap,
        autocast_dtype=torch.bfloat16,
    )
    run(subsets=[SUBSETS[-1]])  # warm-up
    reuse, one_by_one, singles = [], [], []
    step = len(SUBSETS) / s.naive_subsets
    picked = [SUBSETS[int(i * step)] for i in range(s.naive_subsets)]
    # reuse, one by one, singles; then singles, one by one, reuse
    for r, half in enumerate((picked[: len(picked) // 2], picked[len(picked) // 2 :])):
        for part in ("reuse", "one", "singles") if r == 0 else ("singles", "one", "reuse"):
            if part == "singles":
                for subset in half:
                    start = time.perf_counter()
                    run(subsets=[subset])
                    singles.append(time.perf_counter() - start)
                continue
            start = time.perf_counter()
            run(subsets=SUBSETS, **({"subset_batch": 1} if part == "one" else {}))
            (reuse if part == "reuse" else one_by_one).append(time.perf_counter() - start)
    one = med(singles)
    naive = sum(singles) * len(SUBSETS) / len(singles)
    report.raw["subsets"] = {
        "reuse": reuse,
        "reuse_subset_by_subset": one_by_one,
        "single": singles,
        "case": s.eval_case,
        "roi": s.eval_roi,
        "extrapolated_from": len(singles),
    }
    report.add("3. one subset, 2 branches (s)", one, "{:.2f} s")
    report.add("3. all 15 with encoder reuse, subsets batched (s)", med(reuse), "{:.2f} s")
    report.add("3. all 15 with encoder reuse, subset by subset (s)", med(one_by_one), "{:.2f} s")
    tag = "" if len(singles) == len(SUBSETS) else f", extrapolated from {len(singles)}"
    report.add(f"3. 15 separate runs (s{tag})", naive, "{:.2f} s")
    report.add("3. reuse / one subset", med(reuse) / one, "{:.2f}x", "<= 3x", lambda v: v <= 3)
    report.add("3. subsets batched / subset by subset", med(reuse) / med(one_by_one), "{:.2f}x")
    report.add("3. naive 15 runs / one subset", naive / one, "{:.2f}x")
    report.add("3. naive / reuse", naive / med(reuse), "{:.2f}x")
    report.add(
        f"3. FLOP bound of reuse / one subset (one {s.eval_roi}^3 window)",
        subset_flop_bound(models[0], s.eval_roi),
        "{:.2f}x",
    )


# ---- 4 + 6: preprocessing and data loading ---------------------------------------------------------------


def bench_prepare(s: Settings, report: Report, raw: Path, work: Path) -> Path:
    """Item 6; returns a prepared cache for item 4."""
    print(f"[6] preprocessing {s.n_cases} full-size cases", flush=True)
    times: dict[str, list[float]] = {"workers=1": [], "workers=2": []}
    out = work / "cache"
    for r in range(s.prepare_reps):
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            target = work / f"cache-{r}-{workers}"
            start = time.perf_counter()
            prepare(raw, target, min_size=(s.patch,) * 3, workers=workers, progress=False)
            times[f"workers={workers}"].append(time.perf_counter() - start)
            out = target
    report.raw["prepare"] = times
    serial, parallel = med(times["workers=1"]) / s.n_cases, med(times["workers=2"]) / s.n_cases
    report.add("6. prepare s/case, workers=1", serial, "{:.2f} s")
    report.add("6. prepare s/case, workers=2", parallel, "{:.2f} s")
    report.add("6. prepare speed-up workers=2", serial / parallel, "{:.2f}x")
    return out


def raw_patches(raw: Path, patch: int, per_volume: int, rng: np.random.Generator) -> int:
    """The no-cache path: read 4 nii.gz + seg, z-score, cut ``per_volume`` random patches per case."""
    count = 0
    for case in discover(raw):
        images = [np.asarray(nib.load(str(case.images[m])).dataobj, dtype=np.float32) for m in MODALITIES]
        label = np.asarray(nib.load(str(case.label)).dataobj)
        brain = np.logical_or.reduce([im != 0 for im in images])
        volume = np.stack([z_score(im, brain) for im in images])
        for _ in range(per_volume):
            corner = [rng.integers(0, n - patch + 1) for n in volume.shape[1:]]
            box = tuple(slice(c, c + patch) for c in corner)
            torch.from_numpy(np.ascontiguousarray(volume[(slice(None), *box)]))
            torch.from_numpy(np.ascontiguousarray(label[box]))
            count += 1
    return count


def cache_patches(cache_dir: Path, patch: int, per_volume: int) -> int:
    """The cache path in this process: what one loader worker does per case (label-balanced centres,
    memory-mapped windows, no augmentation), for a like-for-like comparison with :func:`raw_patches`."""
    cut = AugmentedPatches((patch,) * 3, per_volume, dict.fromkeys(range(NUM_CLASSES), 1.0), augment=False)
    count = 0
    for name in cache.list_cases(cache_dir):
        count += cut(case_subject(cache_dir, name, read_label_npy))["image"].shape[1] // patch
    return count


def loader_rate(
    cache_dir: Path, s: Settings, augment: bool, use_prior: bool, workers: int
) -> tuple[float, int]:
    """Patches/s through BratsDataModule's train loader over ``loader_epochs`` epochs, worker start included."""
    dm = BratsDataModule(
        str(cache_dir),
        val_fraction=0.0,
        test_fraction=0.0,
        patch_size=s.patch,
        batch_size=s.batch,
        samples_per_volume=4,
        queue_length=32,
        num_workers=workers,
        n_masks=2,
        mask_ratio=0.5,
        use_prior=use_prior,
        augment=augment,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    patches = 0
    start = time.perf_counter()
    for _ in range(s.loader_epochs):
        for b in loader:
            patches += b["image"].shape[0]
    rate = patches / (time.perf_counter() - start)
    # Free the queue's worker iterators now: left to a later GC pass, they are copied into the next
    # loader's forked workers, whose exit then fails on them ("can only test a child process").
    del loader, dm
    gc.collect()
    return rate, patches


def bench_data(s: Settings, report: Report, raw: Path, cache_dir: Path, step_seconds: float | None) -> None:
    print("[4] patches/s: cache loader vs raw NIfTI", flush=True)
    for name in cache.list_cases(cache_dir):  # tensor priors (no SAM), as the configured loader reads them
        shape = cache.load_meta(cache_dir, name).cropped_shape
        cache.write_prior(cache_dir, name, np.full((4, 4, *shape), 0.25, dtype=np.float16))
    rng = np.random.default_rng(0)
    workers = 2
    rates: dict[str, list[float]] = {"raw": [], "cache": [], "loader": [], "loader+aug+prior": []}
    timed = {
        "raw": lambda: raw_patches(raw, s.patch, 4, rng),
        "cache": lambda: cache_patches(cache_dir, s.patch, 4),
    }
    for r in range(2):
        for name in rates if r == 0 else list(rates)[::-1]:
            if name in timed:
                start = time.perf_counter()
                n = timed[name]()
                rates[name].append(n / (time.perf_counter() - start))
            else:
                augment = name == "loader+aug+prior"
                rates[name].append(
                    loader_rate(cache_dir, s, augment=augment, use_prior=augment, workers=workers)[0]
                )
    report.raw["data"] = {"patches_per_s": rates, "num_workers": workers}
    r = {k: med(v) for k, v in rates.items()}
    report.add("4. raw NIfTI patches/s (1 process)", r["raw"], "{:.1f}")
    report.add("4. cache patches/s (1 process, the loader worker's work)", r["cache"], "{:.1f}")
    report.add("4. cache / raw (1 process each)", r["cache"] / r["raw"], "{:.1f}x", ">= 5x", lambda v: v >= 5)
    # The loader figures include starting the queue's workers, which torchio does every epoch: with the
    # benchmark's 4 cases per epoch that start is a large share; with a real epoch (hundreds) it is not.
    report.add(
        f"4. cache loader patches/s (no aug, {workers} workers, worker start included)", r["loader"], "{:.1f}"
    )
    report.add(
        f"4. cache loader patches/s (aug + priors, {workers} workers, worker start included)",
        r["loader+aug+prior"],
        "{:.1f}",
    )
    if step_seconds is not None:
        need = s.batch / step_seconds
        report.add("4. model consumption patches/s (fastest SMML step)", need, "{:.2f}")
        report.add(
            "4. loader (aug + priors) / consumption",
            r["loader+aug+prior"] / need,
            "{:.1f}x",
            ">= 1x",
            lambda v: v >= 1,
        )


# ---- 5: whole-case sliding window in a subprocess ------------------------------------------------------

# name: (overlap, autocast bf16, accumulate dtype); the configs train and test in bf16-mixed. Over a
# 240x240x155 grid, 128^3 windows at overlap 0.5 or 0.25 both need 3x3x2 = 18 windows (MONAI's interval
# int(128 * (1 - overlap)) = 64 or 96 reaches 112 in three steps either way); overlap 0 needs 2x2x2 = 8.
INFER = {
    "default": (0.5, True, "float16"),
    "fastest": (0.0, True, "float16"),
    "paper": (0.5, True, "float16"),  # the brats2018 experiment's network, as `smml test` runs it
}


def infer_child(spec: dict[str, Any]) -> None:
    """Run in a fresh process: one whole-case inference; print seconds and this process's peak RSS."""
    torch.set_num_threads(spec["threads"])
    overlap, bf16, accumulate = INFER[spec["setting"]]
    module = build_paper("smml") if spec["setting"] == "paper" else build("smml", 128, False)
    models = module.inference_models()
    image = zscored_case(tuple(spec["shape"]))
    subsets = SUBSETS if spec["subsets"] == 15 else [SUBSETS[-1]]
    start = time.perf_counter()
    predict_subsets(
        models,
        image,
        subsets,
        roi_size=128,
        overlap=overlap,
        mode="gaussian",
        autocast_dtype=torch.bfloat16 if bf16 else None,
        accumulate_dtype=getattr(torch, accumulate),
    )
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_gib": peak_rss() / GIB}))


def peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux keeps ``ru_maxrss`` across fork + exec, so a child started by a large parent would report the
    parent's size; ``VmHWM`` in /proc/self/status is the peak of this program's own memory map.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def bench_inference(s: Settings, report: Report, threads: int) -> None:
    print(f"[5] sliding window over a {s.infer_case} case, roi 128, 2 branches", flush=True)
    found = {}
    for config in s.infer_configs:
        setting, n = config.split("-")
        spec = {"setting": setting, "subsets": int(n), "shape": list(s.infer_case), "threads": threads}
        proc = subprocess.run(
            [sys.executable, __file__, "--infer-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"inference child {config} failed:\n{proc.stderr[-2000:]}")
        found[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        overlap, bf16, accumulate = INFER[setting]
        label = (
            f"{setting} ({'brats2018' if setting == 'paper' else 'synthetic'} network, overlap {overlap}, "
            f"{'bf16' if bf16 else 'fp32'}, {accumulate} blend), {n} subset(s)"
        )
        report.add(f"5. {label}: seconds", found[config]["seconds"], "{:.1f} s")
        report.add(
            f"5. {label}: peak RSS", found[config]["peak_gib"], "{:.2f} GiB", "< 6 GiB", lambda v: v < 6
        )
    report.raw["inference"] = {"case": s.infer_case, "runs": found}


# ---- output ----------------------------------------------------------------------------------------------


def markdown(report: Report, header: str) -> str:
    lines = [header, "", "| item | measured | target | pass/fail |", "|---|---|---|---|"]
    lines += [f"| {r.item} | {r.measured} | {r.target} | {r.verdict} |" for r in report.rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, report: Report, header: str, meta: dict[str, Any], command: str) -> None:
    """``out`` holds this run's table, its raw seconds and PROVENANCE.md, replacing a previous result."""
    payload = {
        "meta": meta,
        "rows": [asdict(r) | {"verdict": r.verdict} for r in report.rows],
        "raw": report.raw,
    }
    settings = (
        f"Threads: {meta['threads']}, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"GOMP_SPINCOUNT={meta['gomp_spincount']}, "
        f"GLIBC_TUNABLES={meta['glibc_tunables'] or '(unset)'}, torch {meta['torch']}"
    )
    load = (
        f"Load average {meta['load_average_start'][0]:.1f} -> {meta['load_average_end'][0]:.1f}, "
        f"{meta['seconds'] / 60:.1f} min"
    )
    notes = (settings, load)
    write_result_folder(
        out,
        {
            "speed.md": markdown(report, header),
            "speed.json": json.dumps(payload, indent=1, default=str),
            PROVENANCE: provenance("speed benchmark", command, REPO, notes),
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~2 minute smoke version")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--profile", action="store_true", help="also print torch.profiler top ops per precision"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="comma list of items to skip: steps,subsets,data,prepare,infer "
        "(prepare runs anyway when data does: it makes the cache)",
    )
    parser.add_argument(
        "--infer-15",
        action="store_true",
        help="item 5 also with all 15 subsets and the brats2018 network at overlap 0.5, what `smml test` "
        "runs per case with that experiment; adds ten minutes or more",
    )
    parser.add_argument(
        "--paper-size",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="item 7, the training step at 128^3 with the brats2018 network, a few minutes (on "
        "by default, off with --quick)",
    )
    parser.add_argument("--paper-reps", type=int, default=1, help="timed repetitions of item 7 (default 1)")
    parser.add_argument(
        "--out",
        type=Path,
        help="result folder, replaced as a whole by each run (default "
        f"{RESULTS.relative_to(REPO)}, the benchmark's current result; quick: runs/speed-quick)",
    )
    parser.add_argument("--infer-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.infer_child:
        infer_child(json.loads(args.infer_child))
        return 0
    out = args.out or (REPO / "runs" / "speed-quick" if args.quick else RESULTS)
    try:
        check_result_folder(out)
    except FileExistsError as error:
        parser.error(f"--out {error}")
    command = shlex.join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    if args.infer_15:
        s = replace(s, infer_configs=(*s.infer_configs, "paper-15"))
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    report = Report()
    started = time.perf_counter()
    load_start = os.getloadavg()
    try:
        run_items(args, s, skip, report)
    except KeyboardInterrupt:  # keep what was measured, beside the current result: a full run is long
        report.rows.append(Row("run interrupted: items after this line are missing", "-"))
        out = out.with_name(f"{out.name}-partial")
    meta = {
        "quick": args.quick,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(unset)"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "settings": asdict(s),
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "seconds": time.perf_counter() - started,
    }
    header = (
        f"## Speed ({'quick' if args.quick else 'full'} run, {dt.date.today()}, {meta['cpu']}, torch {torch.__version__}, "
        f"{args.threads} threads, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
        f"GOMP_SPINCOUNT={meta['gomp_spincount']}, "
        f"GLIBC_TUNABLES={meta['glibc_tunables'] or '(unset)'}, {meta['seconds'] / 60:.1f} min, "
        f"load average {load_start[0]:.1f} -> {meta['load_average_end'][0]:.1f})"
    )
    print("\n" + markdown(report, header))
    write_results(out, report, header, meta, command)
    print(f"results in {out}")
    return 0


def run_items(args: argparse.Namespace, s: Settings, skip: set[str], report: Report) -> None:
    step_seconds = None
    if "steps" not in skip:
        step_seconds = bench_steps(s, report)
    if args.profile:
        profile_steps(s, report)
    if "subsets" not in skip:
        bench_subsets(s, report)
    if not {"data", "prepare"} <= skip:
        with tempfile.TemporaryDirectory(prefix="smml-bench-") as tmp:
            work = Path(tmp)
            print(f"[4,6] writing {s.n_cases} synthetic {FULL_SHAPE} cases", flush=True)
            synthesize(work / "raw", s.n_cases, shape=FULL_SHAPE, spacing=1.0)
            prepared = bench_prepare(s, report, work / "raw", work)
            if "data" not in skip:
                bench_data(s, report, work / "raw", prepared, step_seconds)
    if "infer" not in skip:
        bench_inference(s, report, args.threads)
    if args.paper_size if args.paper_size is not None else not args.quick:
        bench_paper(args.paper_reps, report)


if __name__ == "__main__":
    sys.exit(main())
