"""benchmarks/gpu_check.py cannot rot: its CPU smoke mode runs the same steps (synth, prepare, fit of the
brats2018 config in bf16-mixed, a 15-subset test of two cases, the speed table) at toy sizes."""

import contextlib
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


def test_speed_only_skips_the_pipeline_and_reports_the_table(tmp_path, capsys):
    out_dir = tmp_path / "new" / "folder"  # the check makes it
    assert gpu_check.main(["--smoke", "--speed-only", "--out", str(out_dir)]) == 0
    result = json.loads((out_dir / "gpu_check.json").read_text())
    assert result["fit"] is None and result["test"] is None and result["compiled_over_eager"] is None
    assert not (out_dir / "raw").exists() and not (out_dir / "run").exists()
    assert len(result["speed"]) == 5
    assert all(row["first_call_s"] > 0 and row["seconds"] > 0 for row in result["speed"])
    out = capsys.readouterr().out
    assert "fit: median step" not in out and "first call" in out and "SMML bf16 / single bf16" in out


@pytest.mark.parametrize("compiler_fails", [False, True])
def test_compile_rows_time_the_compiled_modules_and_say_when_compiling_failed(monkeypatch, compiler_fails):
    # Inductor takes minutes on this CPU, so a stand-in compiler returns the function (or one that
    # raises, as a failed compile does); what is tested is that the rows reach CompiledForward.
    from smml_lightning.lit import base

    compiled = []

    def compile_(fn, **kwargs):
        compiled.append(fn)
        if not compiler_fails:
            return fn

        def broken(*args, **kw):
            raise RuntimeError("inductor failed")

        return broken

    monkeypatch.setattr(base.torch, "compile", compile_)
    with pytest.warns(UserWarning) if compiler_fails else contextlib.nullcontext():
        rows = gpu_check.speed_table("cpu", 1, 32, gpu_check.SMOKE_NETWORK, compiled=True)
    by_name = {row["config"]: row for row in rows}
    assert list(by_name)[-2:] == ["single bf16 compiled", "smml bf16 compiled"]
    assert len(compiled) == 3  # the single branch's network and SMML's two branches
    assert [by_name[n]["compile_fell_back"] for n in list(by_name)[-2:]] == [compiler_fails] * 2
    assert "compile_fell_back" not in by_name["smml bf16"]
    text = gpu_check.markdown(
        {
            "device": "cpu",
            "total_seconds": 1.0,
            "fit": None,
            "test": None,
            "speed": rows,
            "smml_bf16_over_single_bf16": 2.0,
            "smml_bf16_over_single_fp32": 1.0,
            "fused_over_plain": 1.0,
            "refiners_share": 0.2,
            "compiled_over_eager": {"single": 0.9, "smml": 0.8},
        },
        32,
    )
    assert ("(compile failed: eager)" in text) == compiler_fails
    assert "| smml bf16, compiled / eager | 0.80x |" in text
