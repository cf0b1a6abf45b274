"""The local runner of W&B sweep files: grid/random expansion and W&B's command macros."""

import sys

import pytest
import yaml

from smml_lightning.experiments import EXPERIMENTS_DIR
from smml_lightning.sweep import build_command, expand, sweep


def test_shipped_sweep_file_expands_to_the_full_grid():
    spec = yaml.safe_load((EXPERIMENTS_DIR / "sweeps" / "mask_ratio.yaml").read_text())
    runs = expand(spec)
    ratios = spec["parameters"]["data.mask_ratio"]["values"]
    seeds = spec["parameters"]["seed_everything"]["values"]
    assert len(runs) == len(ratios) * len(seeds)
    assert {(r["data.mask_ratio"], r["seed_everything"]) for r in runs} == {
        (a, b) for a in ratios for b in seeds
    }
    cmd = build_command(spec, runs[0])
    assert cmd[:6] == [
        sys.executable,
        "-m",
        "smml_lightning",
        "fit",
        "--config",
        "synthetic",
    ]  # the venv's smml
    assert cmd[6:] == [
        f"--data.mask_ratio={runs[0]['data.mask_ratio']}",
        f"--seed_everything={runs[0]['seed_everything']}",
    ]


def test_random_search_is_seeded_and_counted():
    spec = {
        "method": "random",
        "parameters": {"a": {"values": [1, 2, 3]}, "b": {"min": 0.0, "max": 1.0}, "c": {"value": "x"}},
    }
    one, two = expand(spec, count=5, seed=3), expand(spec, count=5, seed=3)
    assert one == two and len(one) == 5
    assert all(r["a"] in (1, 2, 3) and 0.0 <= r["b"] <= 1.0 and r["c"] == "x" for r in one)
    with pytest.raises(ValueError, match="--count"):
        expand(spec)


def test_bayes_needs_the_wandb_controller():
    with pytest.raises(ValueError, match="controller"):
        expand({"method": "bayes", "parameters": {}})


def test_macros_like_the_wandb_agent():
    spec = {
        "program": "train.py",
        "command": ["${env}", "${interpreter}", "${program}", "--flag", "${args_no_hyphens}"],
    }
    assert build_command(spec, {"x": 1, "y": None}) == [sys.executable, "train.py", "--flag", "x=1", "y=null"]


def test_runs_each_command_and_reports_failures(tmp_path, capsys):
    spec = {
        "name": "t",
        "method": "grid",
        "parameters": {"code": {"values": [0, 1]}},
        "command": [sys.executable, "-c", "import sys; sys.exit(int(sys.argv[1].split('=')[1]))", "${args}"],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="1 of 2 sweep runs failed"):
        sweep(str(path), out=str(tmp_path / "runs"))
    assert "[2/2]" in capsys.readouterr().out


RUN = """
import json, sys
from pathlib import Path
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
run = Path(args["trainer.default_root_dir"])
run.mkdir(parents=True)
lr = float(args["lr"])
if lr < 0:
    sys.exit(3)
score = 1 - abs(lr - 0.01) * 10  # best at lr 0.01
(run / "summary.json").write_text(json.dumps({"monitor": "val/dice_mean", "best_model_score": score}))
"""


def test_sweep_ends_with_every_run_ranked_best_first(tmp_path, capsys):
    spec = {
        "name": "lr",
        "method": "grid",
        "metric": {"name": "val/dice_mean", "goal": "maximize"},
        "parameters": {"lr": {"values": [0.03, 0.01, -1.0, 0.02]}},
        "command": [sys.executable, "-c", RUN, "${args}"],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="1 of 4 sweep runs failed"):
        sweep(str(path), out=str(tmp_path / "runs"))
    table = capsys.readouterr().out.split("best first\n", 1)[1]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[1] for r in rows] == ["0.01", "0.02", "0.03", "-1.0"]  # lr, best val/dice_mean first
    assert [r[2] for r in rows] == ["1.0000", "0.9000", "0.8000", "n/a"]
    assert rows[-1][3].startswith("failed (3)")
    assert (tmp_path / "runs" / "lr" / "runs.md").read_text() == table.rstrip("\n") + "\n"


def test_shipped_sweep_runs_smml_with_this_interpreter(capsys):
    """By name, from any folder, and without the venv's bin/ on PATH: `smml` is `<python> -m smml_lightning`."""
    sweep("mask_ratio", dry_run=True)
    out = capsys.readouterr().out
    assert out.count(f"{sys.executable} -m smml_lightning fit --config synthetic") == 6
