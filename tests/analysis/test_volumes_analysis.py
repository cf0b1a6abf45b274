"""smml_lightning.analysis.volumes: voxel counts and pooled ratios against sums written out by hand. Its run
loading and prediction are checked end to end against a quality run's own report in
tests/benchmarks/test_quality_benchmark.py."""

import numpy as np
import pandas as pd
import pytest

from smml_lightning.analysis import runs, volumes


def test_region_counts_by_hand():
    truth = np.array([0, 1, 2, 3, 3, 2, 0, 0])
    pred = np.array([0, 3, 2, 3, 0, 1, 2, 0])
    counts = runs.region_counts(pred, truth)
    # WT = {1, 2, 3}: pred at 1, 2, 3, 5, 6; truth at 1, 2, 3, 4, 5; both at 1, 2, 3, 5.
    assert counts["WT"] == (5, 5, 4)
    # TC = {1, 3}: pred at 1, 3, 5; truth at 1, 3, 4; both at 1, 3.
    assert counts["TC"] == (3, 3, 2)
    # ET = {3}: pred at 1, 3; truth at 3, 4; both at 3.
    assert counts["ET"] == (2, 2, 1)


def test_summarise_pools_voxels_then_averages_runs():
    rows = [  # method, run, modalities, region, pred, true, both
        ("A", "a0", 1, "ET", 10, 20, 5),
        ("A", "a0", 1, "ET", 30, 20, 15),  # two cases, pooled: 40 / 40 / 20
        ("A", "a1", 1, "ET", 0, 10, 0),  # predicts nothing
        ("B", "b0", 4, "WT", 12, 10, 9),
        ("C", "c0", 4, "ET", 5, 0, 0),  # no true voxel
    ]
    counts = pd.DataFrame(rows, columns=["method", "run", "modalities", "region", "pred", "true", "both"])
    table = volumes.summarise(counts)
    a = table.loc[("A", 1, "ET")]
    assert a["volume"] == pytest.approx((100 * 40 / 40 + 0.0) / 2)
    assert a["precision"] == pytest.approx((100 * 20 / 40 + 0.0) / 2)  # no predicted voxel: precision 0
    assert a["recall"] == pytest.approx((100 * 20 / 40 + 0.0) / 2)
    b = table.loc[("B", 4, "WT")]
    assert (b["volume"], b["precision"], b["recall"]) == pytest.approx((120.0, 75.0, 90.0))
    c = table.loc[("C", 4, "ET")]
    assert np.isnan(c["volume"]) and np.isnan(c["recall"]) and c["precision"] == 0.0
