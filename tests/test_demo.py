"""``smml demo``: the whole path on full-size anatomy cases (prepared at a coarser spacing, scored on the
native 1 mm grid), its experiment option honoured (not swallowed by the command line's own ``--config``),
and a re-run with other settings stopped instead of reusing data and a fit made with the old ones."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from smml_lightning.cli import main
from smml_lightning.data import cache
from smml_lightning.demo import SETTINGS, claim_folder
from smml_lightning.lit import base as lit_base

TINY_FIT = [  # a CPU-second model: the test checks the path, not what it learns
    "--model.init_args.network.init_args.base_width=4",
    "--model.init_args.network.init_args.transformer_dim=16",
    "--model.init_args.network.init_args.num_heads=2",
    "--model.init_args.refiner.init_args.width=4",
    "--model.init_args.test_subsets=[all]",
    "--model.init_args.challenge=null",
    "--data.batch_size=1",
    "--data.samples_per_volume=1",
    "--data.queue_length=2",
    "--data.num_workers=0",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]


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
    first = {"experiment": "synthetic", "cases": 24, "spacing": 3.0, "seed": 0}
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
            "spacing": 3.0,
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
    code, message = _run(["demo", "--out", str(out), "--cases", "8", "--spacing", "2"], capsys)
    assert code != 0 and "cases 24 -> 8" in message and "spacing 3.0 -> 2.0" in message
    assert str(out) in message
    assert "Traceback" not in message and len(message.strip().splitlines()) <= 2
    assert _checksums(out) == before


def test_experiment_option_is_honoured_and_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    code, message = _run(["demo", "--out", str(out), "--experiment", "no_such_experiment"], capsys)
    assert code != 0 and "no_such_experiment" in message
    assert not out.exists()  # nothing made for a name that does not exist


@pytest.mark.parametrize("spacing", ["0", "-2"])
def test_a_spacing_that_is_not_positive_is_refused_before_any_work(tmp_path, capsys, spacing):
    out = tmp_path / "demo"
    code, message = _run(["demo", "--out", str(out), "--spacing", spacing], capsys)
    assert code != 0 and "spacing" in message and "Traceback" not in message
    assert not out.exists()


@pytest.mark.slow
def test_demo_runs_full_size_cases_at_a_coarse_spacing_and_scores_them_on_the_native_grid(
    tmp_path, capsys, monkeypatch
):
    """Three 240x240x155 anatomy cases (one each for train, val and test), prepared at 6 mm, a tiny
    model: the test must score against the label on the native 1 mm crop box, not the cached grid."""
    scored: list[tuple[str, tuple[int, ...]]] = []
    native_label = lit_base.native_label

    def spy(meta, box=True):
        label = native_label(meta, box)
        scored.append((meta.name, None if label is None else label.shape))
        return label

    monkeypatch.setattr(lit_base, "native_label", spy)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--cases", "3", "--spacing", "6", "--prior_epochs", "1"]
    main([*args, "--fit_args", json.dumps(TINY_FIT)])
    assert "scored on the native 1 mm grid" in capsys.readouterr().out
    assert json.loads((out / SETTINGS).read_text())["spacing"] == 6.0

    raw = sorted((out / "raw").glob("*/*_seg.nii.gz"))
    assert len(raw) == 3
    seg = nib.load(str(raw[0]))
    assert seg.shape == (240, 240, 155) and np.allclose(seg.header.get_zooms(), 1.0)
    names = cache.list_cases(out / "cache")
    metas = {name: cache.load_meta(out / "cache", name) for name in names}
    for meta in metas.values():
        assert meta.spacing == (6.0, 6.0, 6.0) and meta.native_spacing == (1.0, 1.0, 1.0)
        assert max(meta.cropped_shape) < min(meta.box_shape) // 3  # coarse grid, native box

    (report,) = (out / "fit").glob("test-*/per_case.csv")
    rows = pd.read_csv(report)
    (case,) = set(rows["case"])
    assert set(rows["subset"]) == {"FLAIR+T1ce+T1+T2"}
    assert scored == [(case, tuple(metas[case].box_shape))]  # the native box, once per case


def test_a_demo_folder_from_the_ellipsoid_generator_is_not_reused(tmp_path, capsys):
    """A ``runs/demo`` made before the anatomy generator recorded a ``shape`` and no ``spacing``."""
    out = tmp_path / "demo"
    old = {
        "experiment": "synthetic",
        "cases": 24,
        "shape": [64, 64, 48],
        "seed": 0,
        "sam_checkpoint": None,
        "model_type": "tiny",
        "prior_epochs": 30,
        "fit_args": [],
    }
    claim_folder(out, old)
    code, message = _run(["demo", "--out", str(out)], capsys)
    assert code != 0 and "spacing None -> 3.0" in message and "another --out" in message
    assert json.loads((out / SETTINGS).read_text()) == old
