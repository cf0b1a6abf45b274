"""Run a W&B sweep file without W&B's server: an honest expansion of its ``grid`` or ``random`` search.

The same file works with ``wandb sweep FILE`` and ``wandb agent`` when online. Locally each run is the
sweep's ``command`` with ``${args}`` expanded to ``--key=value`` (as the W&B agent does), executed one
after another; ``bayes`` needs W&B's controller and is refused with that explanation. The program
``smml`` runs as ``<this interpreter> -m smml_lightning``, so a sweep works without the venv on PATH.
Each run's folder is ``<out>/<sweep name>/run-<i>``; the sweep ends with a table of every run's settings
and its metric (from the run folder's ``summary.json``), best first, also written as ``runs.md`` there.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

SMML = [sys.executable, "-m", "smml_lightning"]


def _values(spec: dict[str, Any], rng: random.Random | None) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"]) if rng is None else [rng.choice(spec["values"])]
    if (
        rng is not None
        and spec.get("distribution", "uniform") in ("uniform", "int_uniform")
        and "min" in spec
    ):
        lo, hi = spec["min"], spec["max"]
        return [rng.randint(lo, hi) if isinstance(lo, int) and isinstance(hi, int) else rng.uniform(lo, hi)]
    raise ValueError(
        f"sweep parameter spec {spec} is not supported locally (use value, values, or min/max "
        "with method: random)"
    )


def expand(sweep: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Parameter sets of a sweep: the full grid, or ``count`` random draws."""
    method = sweep.get("method", "grid")
    params: dict[str, dict[str, Any]] = sweep.get("parameters", {})
    if method == "grid":
        keys = list(params)
        combos = [
            dict(zip(keys, vals)) for vals in itertools.product(*(_values(params[k], None) for k in keys))
        ]
        return combos[:count] if count else combos
    if method == "random":
        if not count:
            raise ValueError("a random sweep needs --count")
        rng = random.Random(seed)
        return [{k: _values(spec, rng)[0] for k, spec in params.items()} for _ in range(count)]
    raise ValueError(
        f"sweep method {method!r} needs W&B's controller: run `wandb sweep` and `wandb agent` online; "
        "locally use grid or random"
    )


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
            cmd.extend(SMML if sweep["program"] == "smml" else [sweep["program"]])
        elif token == "smml":
            cmd.extend(SMML)
        elif token == "${args}":
            cmd.extend(args)
        elif token == "${args_no_hyphens}":
            cmd.extend(a[2:] for a in args)
        else:
            cmd.append(token)
    return cmd


def run_metric(run_dir: Path, metric: str | None) -> float | None:
    """The run's ``metric``: its best checkpoint's score when the checkpoints monitored it, else its last
    logged value (from ``summary.json`` in the run folder); None when the run left none."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if metric is None:
        metric = summary.get("monitor")
    if metric and summary.get("monitor") == metric and summary.get("best_model_score") is not None:
        return float(summary["best_model_score"])
    value = summary.get("metrics", {}).get(metric)
    return None if value is None else float(value)


def ranking(rows: list[dict[str, Any]], metric: str, goal: str) -> str:
    """A Markdown table of the runs, best first (runs without the metric last)."""
    sign = -1.0 if goal == "maximize" else 1.0
    ordered = sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0)))
    keys = [k for k in ordered[0] if k not in ("run", metric, "status")] if ordered else []
    lines = [
        "| run | " + " | ".join(keys) + f" | {metric} | status |",
        "|---|" + "---|" * len(keys) + "---|---|",
    ]
    for row in ordered:
        value = "n/a" if row[metric] is None else f"{row[metric]:.4f}"
        lines.append(
            f"| {row['run']} | " + " | ".join(str(row[k]) for k in keys) + f" | {value} | {row['status']} |"
        )
    return "\n".join(lines)


def find_sweep(file: str) -> Path:
    """A sweep file by path, or by the name of a shipped one (``mask_ratio``)."""
    from .experiments import EXPERIMENTS_DIR

    path = Path(file)
    if path.is_file():
        return path
    shipped = EXPERIMENTS_DIR / "sweeps" / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in (EXPERIMENTS_DIR / "sweeps").glob("*.yaml"))
    raise FileNotFoundError(
        f"sweep file {file!r} is neither a file nor a shipped sweep; shipped: {', '.join(names)}"
    )


def sweep(
    file: str,
    count: int | None = None,
    seed: int = 0,
    dry_run: bool = False,
    extra: list[str] | None = None,
    out: str = "runs/sweep",
) -> None:
    """Run a W&B sweep file locally, one run after another, and rank the runs.

    Args:
        file: W&B sweep YAML (W&B's own format), by path or shipped name (``mask_ratio``).
        count: number of runs (random search: required; grid: the first ``count``).
        seed: seed of the random search.
        dry_run: print the commands without running them.
        extra: more arguments appended to every run (e.g. ``--trainer.max_epochs=2``).
        out: each run writes its run folder ``<out>/<sweep name>/run-<i>``.
    """
    from .io import atomic_write_text

    spec = yaml.safe_load(find_sweep(file).read_text())
    name = spec.get("name", Path(file).stem)
    metric = spec.get("metric", {}).get("name", "metric")
    goal = spec.get("metric", {}).get("goal", "maximize")
    failures = 0
    runs = expand(spec, count, seed)
    rows: list[dict[str, Any]] = []
    for i, params in enumerate(runs):
        run_dir = Path(out) / name / f"run-{i}"
        cmd = build_command(spec, params) + [f"--trainer.default_root_dir={run_dir}"]
        cmd += list(extra or [])
        print(f"[{i + 1}/{len(runs)}] {shlex.join(cmd)}", flush=True)
        if dry_run:
            continue
        env = dict(os.environ, WANDB_RUN_GROUP=name)
        code = subprocess.run(cmd, env=env, check=False).returncode
        failures += code != 0
        rows.append(
            {
                "run": run_dir.name,
                **params,
                metric: run_metric(run_dir, spec.get("metric", {}).get("name")),
                "status": "ok" if code == 0 else f"failed ({code})",
            }
        )
    if rows:
        table = ranking(rows, metric, goal)
        print(f"\nsweep {name}: {len(rows)} runs, {metric} ({goal}), best first\n{table}", flush=True)
        atomic_write_text(Path(out) / name / "runs.md", table + "\n")
    if failures:
        raise SystemExit(f"{failures} of {len(runs)} sweep runs failed")
