"""The lesion-wise table of the test report: means by hand, files, and the Markdown section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from smml_lightning.data.modalities import SUBSET_NAMES
from smml_lightning.evaluation.lesionwise import METRICS, challenge_metrics
from smml_lightning.evaluation.report import LESIONWISE_FILES, lesionwise_table, write_report


def _rows(seed: int = 0) -> list[dict]:
    """Two cases x three subsets: legacy rows for four regions, challenge figures on WT, TC and ET."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in ("a", "b"):
        for subset in SUBSET_NAMES[:2] + SUBSET_NAMES[-1:]:
            for region in ("WT", "TC", "ET", "ET_post"):
                row = {
                    "case": case,
                    "subset": subset,
                    "region": region,
                    "dice": float(rng.random()),
                    "hd95": float(rng.random() * 9),
                }
                if region != "ET_post":
                    row.update(
                        {
                            m: float(rng.integers(0, 4)) if m.startswith("n_") else float(rng.random())
                            for m in METRICS
                        }
                    )
                rows.append(row)
    return rows


def test_lesionwise_table_by_hand() -> None:
    rows = _rows()
    table = lesionwise_table(rows).set_index("subset")
    frame = pd.DataFrame([r for r in rows if "lesion_dice" in r])
    assert list(table.index) == [*SUBSET_NAMES[:2], SUBSET_NAMES[-1], "Average"]
    assert "ET_post_lesion_dice" not in table.columns
    for (subset, region), group in frame.groupby(["subset", "region"]):
        assert table.loc[subset, f"{region}_lesion_dice"] == pytest.approx(group["lesion_dice"].mean())
        assert table.loc[subset, f"{region}_lesion_hd95"] == pytest.approx(group["lesion_hd95"].mean())
        assert table.loc[subset, f"{region}_n_fp"] == group["n_fp"].sum()
    subsets = table.drop(index="Average")
    assert table.loc["Average", "WT_lesion_dice"] == pytest.approx(subsets["WT_lesion_dice"].mean())
    assert lesionwise_table([{k: v for k, v in r.items() if k not in METRICS} for r in rows]) is None


def test_report_has_both_tables(tmp_path) -> None:
    rows = _rows()
    paths = write_report(rows, tmp_path / "rep", "SMML", compare=False, challenge="met", original_grid=True)
    assert set(LESIONWISE_FILES) <= set(paths)
    per_case = pd.read_csv(paths["lesionwise_per_case"])
    assert len(per_case) == 2 * 3 * 3 and set(per_case["region"]) == {"WT", "TC", "ET"}
    summary = pd.read_csv(paths["lesionwise_summary"]).set_index("subset")
    assert summary.loc[SUBSET_NAMES[0], "TC_lesion_dice"] == pytest.approx(
        per_case[(per_case["subset"] == SUBSET_NAMES[0]) & (per_case["region"] == "TC")]["lesion_dice"].mean()
    )
    text = paths["report"].read_text()
    legacy, lesion = (
        text.index("Dice (%) and HD95 (mm) per available-modality subset"),
        text.index("lesion-wise Dice (%) and HD95 (mm), BraTS-MET rules"),
    )
    assert legacy < lesion < text.index("## How these figures were computed")
    assert "original, uncropped grid" in text
    avg = summary.loc["Average"]
    assert f"**{avg['WT_lesion_dice'] * 100:.1f}**" in text[lesion:]


def test_rows_from_challenge_metrics_fit_the_report(tmp_path) -> None:
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[4:12, 4:12, 4:12] = 2
    truth[6:10, 6:10, 6:10] = 3
    pred = np.roll(truth, 1, axis=0)
    rows = []
    for subset in SUBSET_NAMES[:2]:
        for region, values in challenge_metrics(pred, truth, (1.0, 1.0, 1.0)).items():
            rows.append(
                {
                    "case": "x",
                    "subset": subset,
                    "region": region,
                    "dice": values["legacy_dice"],
                    "hd95": values["legacy_hd95"],
                    **values,
                }
            )
    table = lesionwise_table(rows).set_index("subset")
    assert table.loc[SUBSET_NAMES[0], "WT_n_tp"] == 1 and table.loc[SUBSET_NAMES[0], "WT_n_fp"] == 0
    assert 0.5 < table.loc["Average", "ET_lesion_dice"] < 1.0
