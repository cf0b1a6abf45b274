"""``smml demo``: its experiment option is honoured (not swallowed by the command line's own ``--config``),
and a re-run with other settings stops instead of reusing data and a fit made with the old ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from smml_lightning.cli import main
from smml_lightning.demo import SETTINGS, claim_folder


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    code = stop.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err
    return (1 if isinstance(code, str) else int(code or 0)), message


def test_settings_are_recorded_and_a_rerun_with_others_is_refused(tmp_path):
    out = tmp_path / "demo"
    first = {"experiment": "synthetic", "cases": 24, "shape": [64, 64, 48], "seed": 0}
    claim_folder(out, first)
    assert json.loads((out / SETTINGS).read_text()) == first
    claim_folder(out, dict(first))  # the same settings resume
    with pytest.raises(ValueError, match=r"cases 24 -> 8.*seed 0 -> 3"):
        claim_folder(out, dict(first, cases=8, seed=3))
    assert json.loads((out / SETTINGS).read_text()) == first


def test_a_folder_with_other_files_is_not_taken(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        claim_folder(tmp_path, {"cases": 2})
    assert not (tmp_path / SETTINGS).exists()


def test_cli_rerun_with_other_options_stops_in_one_line_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    claim_folder(
        out,
        {
            "experiment": "synthetic",
            "cases": 24,
            "shape": [64, 64, 48],
            "seed": 0,
            "sam_checkpoint": None,
            "model_type": "tiny",
            "prior_epochs": 30,
            "fit_args": [],
        },
    )
    (out / "raw").mkdir()
    (out / "raw" / "case.txt").write_text("made by the first run")
    before = _checksums(out)
    code, message = _run(["demo", "--out", str(out), "--cases", "8"], capsys)
    assert code != 0 and "cases 24 -> 8" in message and str(out) in message
    assert "Traceback" not in message and len(message.strip().splitlines()) <= 2
    assert _checksums(out) == before


def test_experiment_option_is_honoured_and_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    code, message = _run(["demo", "--out", str(out), "--experiment", "no_such_experiment"], capsys)
    assert code != 0 and "no_such_experiment" in message
    assert not out.exists()  # nothing made for a name that does not exist
