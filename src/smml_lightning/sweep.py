"""Run a W&B sweep file without W&B's server: an honest expansion of its ``grid`` or ``random`` search.

The same file works with ``wandb sweep FILE`` and ``wandb agent`` when online. Locally each run is the
sweep's ``command`` with ``${args}`` expanded to ``--key=value`` (as the W&B agent does), executed one
after another; ``bayes`` needs W&B's controller and is refused with that explanation.
"""

from __future__ import annotations

import itertools
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def _values(spec: dict[str, Any], rng: random.Random | None) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"]) if rng is None else [rng.choice(spec["values"])]
    if rng is not None and spec.get("distribution", "uniform") in ("uniform", "int_uniform") and "min" in spec:
        lo, hi = spec["min"], spec["max"]
        return [rng.randint(lo, hi) if isinstance(lo, int) and isinstance(hi, int) else rng.uniform(lo, hi)]
    raise ValueError(f"sweep parameter spec {spec} is not supported locally (use value, values, or min/max "
                     "with method: random)")


def expand(sweep: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Parameter sets of a sweep: the full grid, or ``count`` random draws."""
    method = sweep.get("method", "grid")
    params: dict[str, dict[str, Any]] = sweep.get("parameters", {})
    if method == "grid":
        keys = list(params)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(_values(params[k], None) for k in keys))]
        return combos[:count] if count else combos
    if method == "random":
        if not count:
            raise ValueError("a random sweep needs --count")
        rng = random.Random(seed)
        return [{k: _values(spec, rng)[0] for k, spec in params.items()} for _ in range(count)]
    raise ValueError(f"sweep method {method!r} needs W&B's controller: run `wandb sweep` and `wandb agent` online; "
                     "locally use grid or random")


def build_command(sweep: dict[str, Any], run_params: dict[str, Any]) -> list[str]:
    """The run's command line, expanding W&B's macros like its agent."""
    args = [f"--{k}={'null' if v is None else v}" for k, v in run_params.items()]
    template = sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    cmd: list[str] = []
    for token in template:
        if token == "${env}":
            continue
        if token == "${interpreter}":
            cmd.append(sys.executable)
        elif token == "${program}":
            cmd.append(sweep["program"])
        elif token == "${args}":
            cmd.extend(args)
        elif token == "${args_no_hyphens}":
            cmd.extend(a[2:] for a in args)
        else:
            cmd.append(token)
    return cmd


def sweep(file: str, count: int | None = None, seed: int = 0, dry_run: bool = False,
          extra: list[str] | None = None, out: str = "runs/sweep") -> None:
    """Run a W&B sweep file locally, one run after another.

    Args:
        file: W&B sweep YAML (W&B's own format).
        count: number of runs (random search: required; grid: the first ``count``).
        seed: seed of the random search.
        dry_run: print the commands without running them.
        extra: more arguments appended to every run (e.g. ``--trainer.max_epochs=2``).
        out: each run writes under ``<out>/<sweep name>/run-<i>``.
    """
    spec = yaml.safe_load(Path(file).read_text())
    name = spec.get("name", Path(file).stem)
    failures = 0
    runs = expand(spec, count, seed)
    for i, params in enumerate(runs):
        cmd = build_command(spec, params) + [f"--trainer.default_root_dir={Path(out) / name / f'run-{i}'}"]
        cmd += list(extra or [])
        print(f"[{i + 1}/{len(runs)}] {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        env = dict(os.environ, WANDB_RUN_GROUP=name)
        failures += subprocess.run(cmd, env=env).returncode != 0
    if failures:
        raise SystemExit(f"{failures} of {len(runs)} sweep runs failed")
