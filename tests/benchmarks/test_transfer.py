"""benchmarks/transfer.py: its table against a hand computation."""

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "transfer", Path(__file__).parents[2] / "benchmarks" / "transfer.py"
)
transfer = sys.modules["transfer"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(transfer)


def test_table_averages_cases_then_subsets_then_seeds():
    rows = []
    # seed 0: subset A cases 1.0 and 0.0 (mean 0.5), subset B one case 0.9 -> run mean 0.7
    # seed 1: subset A 0.3, subset B cases 0.5 and 0.7 (mean 0.6) -> run mean 0.45
    for seed, subset, dice in [
        (0, "A", 1.0),
        (0, "A", 0.0),
        (0, "B", 0.9),
        (1, "A", 0.3),
        (1, "B", 0.5),
        (1, "B", 0.7),
    ]:
        rows.append(
            {
                "trained": "tiny",
                "tested": "anatomy",
                "method": "SMML",
                "seed": seed,
                "subset": subset,
                "region": "WT",
                "dice": dice,
                "case": f"c{len(rows)}",
            }
        )
    rows.append(
        {
            "trained": "tiny",
            "tested": "tiny",
            "method": "SMML",
            "seed": 0,
            "subset": "A",
            "region": "ET",
            "dice": 0.25,
            "case": "x",
        }
    )
    table = transfer.transfer_table(pd.DataFrame(rows))
    assert table.loc[("tiny", "anatomy", "SMML"), "WT"] == pytest.approx((0.7 + 0.45) / 2)
    assert table.loc[("tiny", "tiny", "SMML"), "ET"] == 0.25
    assert list(table.columns) == ["WT", "ET"]  # the quality table's region order, present regions only
