"""Timing on a shared, noisy CPU host, for ``benchmarks/speed.py`` and ``smml analyze widths``.

The configurations being compared alternate repetition by repetition (A B C, C B A, ...) and the
tables report medians and ratios of medians, so a load spike hits every configuration rather than one.
"""

from __future__ import annotations

import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.backbone import MMFormer


def interleaved(fns: dict[Any, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[Any, list[float]]:
    """Seconds per repetition of each callable, alternating their order every repetition."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[Any, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


def cpu_description() -> str:
    """CPU model and its bf16 instructions: bf16 speed-ups differ by these (AMX against AVX-512 bf16 alone)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {
        key.strip(): value.strip()
        for key, value in (line.split(":", 1) for line in info.splitlines() if ":" in line)
    }
    model = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    bf16 = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return f"{model} ({', '.join(bf16) or 'no bf16 instructions'})"


def synthetic_branch(patch: int) -> Callable[..., MMFormer]:
    """The SMML branch of experiments/synthetic.yaml (MMFormer width 8, transformer dim 64, 4 heads)."""
    return functools.partial(
        MMFormer, base_width=8, transformer_dim=64, num_heads=4, transformer_depth=1, patch_size=patch
    )
