"""``smml evaluate`` end to end on BraTS-named prediction folders against synthetic references."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from smml_lightning.cli import main
from smml_lightning.data.labels import to_internal, to_release
from smml_lightning.data.synthetic import synthesize
from smml_lightning.evaluation.lesionwise import MAX_HD95, METRICS, challenge_metrics

SHAPE = (40, 40, 40)


def _load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image


def _save_like(path: Path, labels: np.ndarray, like: nib.Nifti1Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), like.affine, like.header), str(path))


def _degrade(internal: np.ndarray) -> np.ndarray:
    """A plausible imperfect prediction: the tumour eroded, plus a spurious blob in a corner."""
    out = np.where(ndimage.binary_erosion(internal > 0, iterations=1), internal, 0).astype(np.uint8)
    out[1:4, 1:4, 1:4] = 2
    return out


def _run(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code not in (0, None)
    return capsys.readouterr().err + (info.value.code if isinstance(info.value.code, str) else "")


@pytest.mark.parametrize("layout", ["brats2023", "brats2020"])
def test_scores_a_prediction_folder(tmp_path: Path, layout: str, capsys) -> None:
    ref = tmp_path / "ref"
    synthesize(ref, 3, layout=layout, shape=SHAPE, seed=5)
    segs = sorted(ref.rglob("*seg.nii.gz"))
    names = [p.parent.name for p in segs]
    convention = "brats2023" if layout == "brats2023" else "brats2018"
    truths, spacings, expected = [], [], {}
    pred = tmp_path / "pred"
    for i, (name, seg) in enumerate(zip(names, segs)):
        raw, image = _load(seg)
        truth = to_internal(raw, convention)
        truths.append(truth)
        spacings.append(tuple(float(z) for z in image.header.get_zooms()))
        if i == 2:
            continue  # no prediction: worst
        guess = truth if i == 0 else _degrade(truth)
        # case 0 in another tool's naming and the 2023 values; case 1 as smml predict writes it
        if i == 0:
            file = pred / (f"team_{name[-9:]}.nii.gz" if layout == "brats2023" else f"{name}.nii.gz")
            _save_like(file, to_release(guess, "brats2023"), image)
        else:
            _save_like(pred / f"{name}_seg.nii.gz", to_release(guess, convention), image)
        expected[name] = challenge_metrics(guess, truth, spacings[-1], "gli")
    _save_like(pred / "unrelated.nii.gz", np.zeros(SHAPE, np.uint8), image)

    out = tmp_path / "out"
    main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out)])
    per_case = pd.read_csv(out / "per_case.csv", keep_default_na=False)
    assert sorted(per_case["case"].unique()) == sorted(names)
    for name, regions in expected.items():
        for region, values in regions.items():
            row = per_case[(per_case["case"] == name) & (per_case["region"] == region)].iloc[0]
            for metric in METRICS:
                assert row[metric] == pytest.approx(values[metric], abs=1e-9), (name, region, metric)
    assert all(expected[names[0]][r]["lesion_dice"] == 1.0 for r in ("WT", "TC", "ET"))
    assert expected[names[1]]["WT"]["n_fp"] == 1 and expected[names[1]]["WT"]["lesion_dice"] < 1.0
    missing = per_case[per_case["case"] == names[2]]
    assert (missing["prediction"] == "").all()
    assert (missing["lesion_dice"] == 0.0).all() and (missing["lesion_hd95"] == MAX_HD95).all()

    summary = pd.read_csv(out / "summary.csv")
    wt = summary.set_index("region").loc["WT"]
    assert wt["n_missing"] == 1 and wt["n_cases"] == 3
    assert wt["lesion_dice"] == pytest.approx(per_case[per_case["region"] == "WT"]["lesion_dice"].mean())
    report = (out / "report.md").read_text()
    assert names[2] in report and "unrelated.nii.gz" in report and "BraTS-GLI" in report

    message = _run(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(out)], capsys)
    assert "already exist" in message


def test_unreadable_prediction_names_the_file_and_writes_nothing(tmp_path: Path, capsys) -> None:
    ref = tmp_path / "ref"
    synthesize(ref, 1, layout="brats2023", shape=SHAPE, seed=6)
    name = next(ref.iterdir()).name
    bad = tmp_path / "pred" / f"{name}.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "out"
    message = _run(["evaluate", "--pred", str(bad.parent), "--ref", str(ref), "--out", str(out)], capsys)
    assert str(bad) in message and "cannot read" in message
    assert len(message.strip().splitlines()) == 2  # the error line and the traceback hint
    assert not out.exists()


def test_prediction_with_both_et_values_is_rejected(tmp_path: Path, capsys) -> None:
    ref = tmp_path / "ref"
    synthesize(ref, 1, layout="brats2023", shape=SHAPE, seed=6)
    seg = next(ref.rglob("*seg.nii.gz"))
    raw, image = _load(seg)
    mixed = raw.copy()
    mixed[0, 0, 0], mixed[0, 0, 1] = 3, 4
    file = tmp_path / "pred" / f"{seg.parent.name}.nii.gz"
    _save_like(file, mixed, image)
    message = _run(
        ["evaluate", "--pred", str(file.parent), "--ref", str(ref), "--out", str(tmp_path / "o")], capsys
    )
    assert str(file) in message and "both 3 and 4" in message
