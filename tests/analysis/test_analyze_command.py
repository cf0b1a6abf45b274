"""`smml analyze`: every analysis is a subcommand with its one-line help, bad input ends in one clear line
before anything is loaded or written, and arguments after `--` go to loss-terms only."""

import re
from pathlib import Path

import pytest

from smml_lightning.analysis.commands import ANALYSES
from smml_lightning.cli import main as smml


def test_help_lists_every_analysis_with_its_one_line_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps the help column to the terminal's width
    with pytest.raises(SystemExit) as stop:
        smml(["analyze", "--help"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    expected = {"agreement", "volumes", "et-breakdown", "loss-terms", "branches", "priors", "widths"}
    assert set(ANALYSES) == expected
    for name, (_, summary) in ANALYSES.items():
        assert re.search(rf"^ +{name}\s+{re.escape(summary)}$", printed, re.MULTILINE), name


def test_each_analysis_has_its_own_help(capsys):
    for name in ANALYSES:
        with pytest.raises(SystemExit) as stop:
            smml(["analyze", name, "--help"])
        assert stop.value.code == 0
        assert f"usage: smml analyze {name}" in capsys.readouterr().out


def test_existing_csv_is_refused_before_any_run_is_read(tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    csv.write_text("kept\n")
    with pytest.raises(SystemExit) as stop:
        smml(["analyze", "volumes", str(tmp_path / "no-work"), str(tmp_path / "no-run"), "--csv", str(csv)])
    assert str(stop.value.code).startswith(f"smml: error: --csv {csv}: already exists")
    assert csv.read_text() == "kept\n"


def test_missing_work_folder_is_one_line_naming_it(tmp_path):
    with pytest.raises(SystemExit) as stop:
        smml(["analyze", "priors", "score", str(tmp_path / "absent")])
    assert str(stop.value.code).splitlines()[0] == (
        f"smml: error: cache folder {tmp_path / 'absent' / 'cache'} does not exist: run `smml prepare` first"
    )


def test_overrides_after_double_dash_are_for_loss_terms_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        smml(["analyze", "widths", "--", "--model.init_args.temperature=2"])
    assert stop.value.code == 2
    assert "arguments after -- are CLI overrides for loss-terms, not for widths" in capsys.readouterr().err
    # loss-terms takes them, and names the run folder it cannot read.
    run = Path(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        smml(["analyze", "loss-terms", str(run), "--", "--model.init_args.temperature=2"])
    assert str(stop.value.code).startswith(f"smml: error: {run / 'config.yaml'}: missing")
