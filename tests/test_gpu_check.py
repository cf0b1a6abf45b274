"""benchmarks/gpu_check.py cannot rot: its CPU smoke mode runs the same steps (synth, prepare, fit of the
brats2018 config in bf16-mixed, a 15-subset test of two cases, the speed table) at toy sizes."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_SPEC)  # the CLI imports its callback
_SPEC.loader.exec_module(gpu_check)


def test_smoke_runs_every_step_and_reports_its_figures(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["fit"]["steps"] == 2 and result["fit"]["median_step_s"] > 0
    assert math.isfinite(result["fit"]["last_loss"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # Two test cases, each scored on all 15 subsets, in the report the Dice comes from.
    per_case = (tmp_path / "run" / "test-check" / "per_case.csv").read_text().splitlines()
    cases = {line.split(",")[0] for line in per_case[1:]}
    assert len(cases) == 2 and set(json.loads((tmp_path / "split.json").read_text())["test"]) == cases
    assert {"WT", "TC", "ET"} <= set(result["test"]["dice_15_subsets"])
    assert all(0 <= v <= 1 for v in result["test"]["dice_15_subsets"].values())
    assert [row["config"] for row in result["speed"]] == [
        "smml bf16",
        "single bf16",
        "single fp32",
        "smml bf16 fused peers",
        "smml bf16 without refiners",
    ]
    assert all(row["seconds"] > 0 for row in result["speed"])
    assert math.isfinite(result["refiners_share"])  # toy sizes: noise may even make it negative
    out = capsys.readouterr().out
    assert "## GPU check on cpu (smoke)" in out and "SMML bf16 / single bf16" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_full_check_refuses(capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
