"""smml_lightning.analysis.agreement: Dice from voxel counts against scipy, and its averaging order by hand.
Its prediction is checked peer by peer against `smml test` reports in tests/benchmarks/test_quality_benchmark.py."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import dice as scipy_dice_dissimilarity

from smml_lightning.analysis import agreement, runs


def test_dice_from_counts_matches_scipy():
    rng = np.random.default_rng(0)
    for p_a, p_b in ((0.5, 0.5), (0.1, 0.7), (0.02, 0.02)):
        a, b = rng.random(500) < p_a, rng.random(500) < p_b
        counts = runs.region_counts(a.astype(np.uint8) * 3, b.astype(np.uint8) * 3)["ET"]
        assert runs.dice_from_counts(*counts) == pytest.approx(1.0 - scipy_dice_dissimilarity(a, b))
    assert runs.dice_from_counts(0, 0, 0) == 1.0  # both empty: agree, as the reports score it
    assert runs.dice_from_counts(5, 0, 0) == 0.0


def test_summarise_averages_cases_then_subsets_and_splits_by_modalities():
    rows = pd.DataFrame(
        [  # run, case, subset, region, agreement, peer0, peer1
            ("r", "c1", "T1", "ET", 1.0, 0.5, 0.5),
            ("r", "c2", "T1", "ET", 0.0, 0.5, 0.1),
            ("r", "c1", "FLAIR+T1", "ET", 0.4, 0.8, 0.9),
        ],
        columns=["run", "case", "subset", "region", "agreement", "peer0", "peer1"],
    )
    table = agreement.summarise(rows)
    every = table.loc[("r", "all", "ET")]
    # Subset T1: mean of the two cases; FLAIR+T1: its one case; then the mean of the two subsets.
    assert every["agreement"] == pytest.approx(100 * (0.5 + 0.4) / 2)
    assert every["peer0"] == pytest.approx(100 * (0.5 + 0.8) / 2)
    assert every["peer1"] == pytest.approx(100 * (0.3 + 0.9) / 2)
    one, two = table.loc[("r", "1", "ET")], table.loc[("r", "2", "ET")]
    assert (one["agreement"], one["peer1"]) == pytest.approx((50.0, 30.0))  # T1 alone
    assert (two["agreement"], two["peer0"]) == pytest.approx((40.0, 80.0))  # FLAIR+T1 alone
