"""The test report callback: the module's test_step produces rows, the callback writes them."""

from __future__ import annotations

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from smml_lightning.lit.baselines import SingleBranch
from smml_lightning.lit.test_report import TestReport
from smml_lightning.models.baselines import UNetBaseline

P = 32


def _cases(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    cases = []
    for i in range(n):
        label = torch.zeros(1, P, P, P, dtype=torch.long)
        label[:, 8:24, 8:24, 8 + i : 20 + i] = 2
        label[:, 12:20, 12:20, 12 + i : 16 + i] = 3
        cases.append(
            {
                "image": torch.randn(4, P, P, P, generator=g) + label.float(),
                "label": label,
                "name": f"case{i}",
                "available": torch.ones(4, dtype=torch.bool),
            }
        )
    return cases


def test_test_step_rows_become_the_report_and_the_logged_means(tmp_path):
    torch.manual_seed(0)
    model = SingleBranch(
        network=lambda: UNetBaseline(base_width=2),
        roi_size=P,
        sw_batch_size=1,
        test_subsets=["all", "flair", "t1ce+t2"],
        compare_published=False,
        report_dir=str(tmp_path / "report"),
        method_name="tiny",
    )
    assert [type(c) for c in model.configure_callbacks()] == [TestReport]
    loader = DataLoader(_cases(2), batch_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    logged = trainer.test(model, loader, verbose=False)[0]

    model.eval()
    with torch.no_grad():
        expected = [
            row
            for i, case in enumerate(_cases(2))
            for row in model.test_step(default_collate([case]), i)["rows"]
        ]
    per_case = pd.read_csv(tmp_path / "report" / "per_case.csv")
    assert len(per_case) == len(expected) == 2 * 3 * 4
    got = per_case.set_index(["case", "subset", "region"])["dice"]
    for row in expected:
        assert got[row["case"], row["subset"], row["region"]] == pytest.approx(row["dice"])
    for region in ("WT", "TC", "ET", "ET_post"):
        assert logged[f"test/dice_{region}"] == pytest.approx(
            per_case.loc[per_case["region"] == region, "dice"].mean()
        )
    assert "# tiny:" in (tmp_path / "report" / "report.md").read_text()
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "per_case.csv",
        "summary.csv",
        "report.md",
        "heatmap.png",
        "modality_gains.csv",
        "lesionwise_per_case.csv",
        "lesionwise_summary.csv",
    }
    lesions = pd.read_csv(tmp_path / "report" / "lesionwise_per_case.csv")
    assert len(lesions) == 2 * 3 * 3  # WT, TC, ET
    got = lesions.set_index(["case", "subset", "region"])["lesion_dice"]
    for row in expected:
        if row["region"] != "ET_post":
            assert got[row["case"], row["subset"], row["region"]] == pytest.approx(row["lesion_dice"])
    for region in ("WT", "TC", "ET"):
        assert logged[f"test/lesion_dice_{region}"] == pytest.approx(
            lesions.loc[lesions["region"] == region, "lesion_dice"].mean()
        )
    assert "BraTS-GLI rules" in (tmp_path / "report" / "report.md").read_text()

    model.challenge = None  # the setting leaves the challenge figures out of the rows
    with torch.no_grad():
        assert not any(
            "lesion_dice" in row for row in model.test_step(default_collate([_cases(1)[0]]), 0)["rows"]
        )
