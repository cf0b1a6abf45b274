import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from smml_lightning.data.modalities import SUBSET_NAMES
from smml_lightning.evaluation.report import (
    load_published,
    modality_gains,
    subset_ranking,
    summary_table,
    write_report,
)

REGIONS = ("WT", "TC", "ET", "ET_post")


def _rows(n_cases=3, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "case": f"case{c}",
            "subset": s,
            "region": r,
            "dice": float(rng.random()),
            "hd95": float(rng.random() * 20),
        }
        for c in range(n_cases)
        for s in SUBSET_NAMES
        for r in REGIONS
    ]


def test_summary_means_equal_groupby_by_hand():
    rows = _rows()
    table = summary_table(rows).set_index("subset")
    frame = pd.DataFrame(rows)
    assert list(table.index) == [*SUBSET_NAMES, "Average"]
    for (subset, region), group in frame.groupby(["subset", "region"]):
        assert table.loc[subset, f"{region}_dice"] == pytest.approx(group["dice"].mean())
        assert table.loc[subset, f"{region}_hd95"] == pytest.approx(group["hd95"].mean())
    # Every case has every subset, so the average of subset means equals the mean over all rows.
    for region, group in frame.groupby("region"):
        assert table.loc["Average", f"{region}_dice"] == pytest.approx(group["dice"].mean())
    assert (table["n_cases"] == 3).all()


def test_summary_hand_computed_two_cases():
    rows = [
        {"case": "a", "subset": "FLAIR", "region": "WT", "dice": 0.5, "hd95": 2.0},
        {"case": "b", "subset": "flair", "region": "WT", "dice": 1.0, "hd95": np.nan},
        {"case": "a", "subset": 14, "region": "WT", "dice": 0.9, "hd95": 4.0},
    ]
    table = summary_table(rows).set_index("subset")
    assert list(table.index) == ["FLAIR", "FLAIR+T1ce+T1+T2", "Average"]
    assert table.loc["FLAIR", "WT_dice"] == pytest.approx(0.75)
    assert table.loc["FLAIR", "WT_hd95"] == pytest.approx(2.0)  # NaN skipped
    assert table.loc["Average", "WT_dice"] == pytest.approx((0.75 + 0.9) / 2)
    assert table.loc["FLAIR", "n_cases"] == 2


def test_write_report_files_rows_and_markdown_order(tmp_path):
    rows = _rows()
    paths = write_report(
        rows,
        tmp_path / "rep",
        "SMML",
        dataset_layout="brats2018",
        settings={"roi_size": 128, "overlap": 0.5, "mode": "gaussian"},
    )
    assert set(paths) == {"per_case", "summary", "report", "heatmap", "modality_gains"}
    assert all(p.is_file() for p in paths.values())
    per_case = pd.read_csv(paths["per_case"])
    assert list(per_case.columns) == ["case", "subset", "region", "dice", "hd95"]
    assert len(per_case) == 3 * 15 * 4
    summary = pd.read_csv(paths["summary"])
    assert list(summary["subset"]) == [*SUBSET_NAMES, "Average"]
    assert {f"{r}_{m}" for r in REGIONS for m in ("dice", "hd95")} <= set(summary.columns)

    text = paths["report"].read_text()
    table = [
        line for line in text.splitlines() if (line.startswith("| ") and "●" in line) or "**Average**" in line
    ]
    assert len(table) == 16
    assert [line.split("|")[1].strip() for line in table] == [*map(str, range(1, 16)), "**Average**"]
    # Row 1 is T2 only: FLAIR, T1ce, T1 missing, T2 present; its WT Dice is the mean in percent.
    cells = [c.strip() for c in table[0].split("|")[1:-1]]
    assert cells[1:5] == ["○", "○", "○", "●"]
    assert cells[5] == f"{summary.loc[0, 'WT_dice'] * 100:.1f}"
    assert "roi_size=128, overlap=0.5, mode=gaussian" in text
    assert "fewer than 500 voxels" in text
    assert "| RFNet | brats2018 | 85.7 | 76.5 | 57.1 |" in text and "brats2020" not in text

    png = imread(paths["heatmap"])
    assert png.ndim == 3 and png.std() > 0
    assert not list((tmp_path / "rep").glob("*.tmp"))


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write_report(_rows(1), tmp_path, "m", compare=False)
    before = (tmp_path / "summary.csv").read_text()
    with pytest.raises(FileExistsError, match="summary.csv"):
        write_report(_rows(1, seed=1), tmp_path, "m")
    assert (tmp_path / "summary.csv").read_text() == before
    write_report(_rows(1, seed=1), tmp_path, "m", overwrite=True)
    assert (tmp_path / "summary.csv").read_text() != before


def test_rejects_bad_rows():
    with pytest.raises(ValueError, match="lack columns"):
        summary_table([{"case": "a", "subset": 0, "region": "WT", "dice": 1.0}])
    with pytest.raises(ValueError, match="duplicate"):
        summary_table([{"case": "a", "subset": 0, "region": "WT", "dice": 1.0, "hd95": 0.0}] * 2)
    with pytest.raises(ValueError, match="unknown modality"):
        summary_table([{"case": "a", "subset": "t3", "region": "WT", "dice": 1.0, "hd95": 0.0}])


def test_published_rows_match_methods_reference():
    table = load_published()
    assert list(table.columns) == ["method", "dataset", "wt", "tc", "et", "source"]
    rfnet = table[(table.method == "RFNet") & (table.dataset == "brats2020")].iloc[0]
    assert (rfnet.wt, rfnet.tc, rfnet.et) == (87.0, 78.2, 61.5)
    assert set(load_published("brats2018").method) == {"HeMIS", "U-HVED", "RobustSeg", "RFNet"}
    assert table.source.str.contains(r"\b(?:19|20)\d\d\b").all()


def test_subset_ranking_and_its_line_in_the_report(tmp_path):
    # Dice grows with the number of modalities; T1 alone is made the worst; ET_post is not ranked.
    rows = []
    for subset in SUBSET_NAMES:
        n = subset.count("+") + 1
        for region in REGIONS:
            dice = 0.2 * n - (0.1 if subset == "T1" else 0.0)
            rows.append(
                {
                    "case": "a",
                    "subset": subset,
                    "region": region,
                    "dice": 0.0 if region == "ET_post" else dice,
                    "hd95": 1.0,
                }
            )
    ranking = subset_ranking(summary_table(rows))
    assert ranking.index[0] == "FLAIR+T1ce+T1+T2" and ranking.index[-1] == "T1"
    assert ranking.iloc[0] == pytest.approx(0.8) and ranking.iloc[-1] == pytest.approx(0.1)
    assert len(ranking) == 15
    text = write_report(rows, tmp_path / "rep", "SMML")["report"].read_text()
    assert (
        "Mean Dice over WT, TC and ET: best FLAIR+T1ce+T1+T2 (80.0), worst T1 (10.0); "
        "all four modalities rank 1 of 15."
    ) in text


def _additive_rows(n_cases=4):
    """Dice = case offset + 0.1 per modality + 0.3 more for T1ce: every gain is known exactly."""
    rows = []
    for c in range(n_cases):
        for subset in SUBSET_NAMES:
            dice = 0.05 * c + 0.1 * (subset.count("+") + 1) + (0.3 if "T1ce" in subset else 0.0)
            rows += [
                {"case": f"c{c}", "subset": subset, "region": r, "dice": dice, "hd95": 1.0} for r in REGIONS
            ]
    return rows


def test_modality_gains_hand_computed_and_pairing_by_case(tmp_path):
    gains = modality_gains(_additive_rows()).set_index(["modality", "added", "region"])
    assert len(gains) == 4 * 2 * 3  # modalities x (any, last) x (WT, TC, ET); ET_post not by default
    for modality in ("FLAIR", "T1", "T2", "T1ce"):
        expected = 0.4 if modality == "T1ce" else 0.1  # the case offsets cancel in the paired differences
        for added in ("any", "last"):
            row = gains.loc[(modality, added, "ET")]
            assert row["gain"] == pytest.approx(expected)
            assert row["ci_low"] == pytest.approx(expected) and row["ci_high"] == pytest.approx(expected)
            assert row["n_cases"] == 4
    text = write_report(_additive_rows(), tmp_path / "rep", "m", compare=False)["report"].read_text()
    assert "## What each modality adds" in text
    assert "| T1ce | +40.0 [+40.0, +40.0] | +40.0 [+40.0, +40.0] |" in text
    saved = pd.read_csv(tmp_path / "rep" / "modality_gains.csv")
    assert len(saved) == 24 and set(saved["added"]) == {"any", "last"}


def test_modality_gains_random_against_numpy_and_an_independent_bootstrap():
    rows = _rows(n_cases=40, seed=3)
    frame = pd.DataFrame(rows)
    dice = frame[frame.region == "TC"].pivot(index="case", columns="subset", values="dice")
    without_t2 = [s for s in SUBSET_NAMES if "T2" not in s]
    per_case = np.mean([dice[f"{s}+T2"] - dice[s] for s in without_t2], axis=0)
    got = modality_gains(rows, n_resamples=4000).set_index(["modality", "added", "region"])
    row = got.loc[("T2", "any", "TC")]
    assert len(without_t2) == 7
    assert row["gain"] == pytest.approx(per_case.mean())
    # A plain numpy percentile bootstrap of the same per-case gains agrees to Monte Carlo precision.
    rng = np.random.default_rng(123)
    means = per_case[rng.integers(0, len(per_case), (20000, len(per_case)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    assert row["ci_low"] == pytest.approx(low, abs=0.01) and row["ci_high"] == pytest.approx(high, abs=0.01)
    assert row["ci_low"] < row["gain"] < row["ci_high"]
    last = got.loc[("FLAIR", "last", "WT")]
    wt = frame[frame.region == "WT"].pivot(index="case", columns="subset", values="dice")
    assert last["gain"] == pytest.approx((wt["FLAIR+T1ce+T1+T2"] - wt["T1ce+T1+T2"]).mean())


def test_modality_gains_use_only_evaluated_pairs():
    rows = [r for r in _additive_rows() if r["subset"] in ("FLAIR", "FLAIR+T1ce")]
    gains = modality_gains(rows)
    assert set(zip(gains["modality"], gains["added"])) == {("T1ce", "any")}
    assert gains["gain"].to_numpy() == pytest.approx([0.4] * 3)
    one_case = modality_gains([r for r in rows if r["case"] == "c0"])
    assert one_case["ci_low"].isna().all() and one_case["gain"].to_numpy() == pytest.approx([0.4] * 3)
