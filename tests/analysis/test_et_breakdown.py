"""`smml analyze et-breakdown`: both tables against hand computations on a tiny work folder."""

import numpy as np
import pandas as pd
import pytest

from conftest import synthetic_meta
from smml_lightning.analysis.et_breakdown import SMALL_ET
from smml_lightning.cli import main as smml
from smml_lightning.data import cache
from smml_lightning.data.labels import CLASS_NAMES

SHAPE = (10, 10, 10)
ALL, NO_T1CE, T1CE, T2 = "FLAIR+T1ce+T1+T2", "FLAIR+T1+T2", "T1ce", "T2"
# ET Dice per case and subset; "a" has no enhancement, "b" a small ET, "c" a large one.
DICE = {
    "a": {ALL: 0.0, NO_T1CE: 1.0, T1CE: 0.0, T2: 1.0},
    "b": {ALL: 0.6, NO_T1CE: 0.2, T1CE: 0.5, T2: 0.1},
    "c": {ALL: 0.9, NO_T1CE: 0.5, T1CE: 0.8, T2: 0.3},
}
ET_VOXELS = {"a": 0, "b": 100, "c": 400}


def _case(root, name: str, et_voxels: int) -> None:
    label = np.full(SHAPE, CLASS_NAMES.index("ED"), np.uint8)
    label.reshape(-1)[:et_voxels] = CLASS_NAMES.index("ET")
    meta = synthetic_meta(name, SHAPE)
    cache.write_case(root, meta, np.zeros((4, *SHAPE), np.float32), label)


@pytest.fixture
def work(tmp_path):
    assert 0 < ET_VOXELS["b"] < SMALL_ET < ET_VOXELS["c"]
    for name, voxels in ET_VOXELS.items():
        _case(tmp_path / "cache", name, voxels)
    rows = [
        {
            "case": case,
            "subset": subset,
            "region": region,
            "dice": dice if region == "ET" else 1 - dice,
            "hd95": 1.0,
        }
        for case, scores in DICE.items()
        for subset, dice in scores.items()
        for region in ("WT", "ET")  # WT rows must not count
    ]
    (tmp_path / "run1" / "report").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tmp_path / "run1" / "report" / "per_case.csv", index=False)
    return tmp_path


def _table(lines: list[str], first: str) -> dict[str, str]:
    """The markdown table starting at the line that begins with ``first``: header -> the run's cell."""
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    cells = [c.strip() for c in lines[start + 2].strip("|").split("|")]
    return dict(zip(header, cells))


def test_both_tables_match_hand_computations(work, capsys):
    smml(["analyze", "et-breakdown", str(work), "run1"])
    lines = capsys.readouterr().out.splitlines()
    groups = _table(lines, "| run | test cases (no ET) |")
    small = f"ET < {SMALL_ET} vox"
    assert groups == {
        "run": "run1",
        "test cases (no ET)": "3 (1)",
        "ET, with T1ce": "85.0",  # c: (0.9 + 0.8) / 2
        "ET, without T1ce": "40.0",  # c: (0.5 + 0.3) / 2
        f"{small}, with T1ce": "55.0",
        f"{small}, without T1ce": "15.0",
        "no ET, with T1ce": "0.0",
        "no ET, without T1ce": "100.0",
        "all, all": f"{100 * sum(sum(s.values()) for s in DICE.values()) / 12:.1f}",
    }
    gains = _table(lines, "| run | no ET: ")
    # Only T1ce has both its "last" subsets (all four, and the other three) evaluated.
    assert gains == {"run": "run1", "no ET: +T1ce": "-100.0", "ET: +T1ce": "+40.0"}  # ET: b +0.4, c +0.4


def test_a_run_without_reports_is_named(work):
    with pytest.raises(SystemExit, match=r"run2: no report\*/per_case.csv"):
        smml(["analyze", "et-breakdown", str(work), "run1", "run2"])
