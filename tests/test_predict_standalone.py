"""``smml predict -i INPUT -o OUTPUT -c CKPT``: new cases segmented with only a checkpoint, each case
accounted for, outputs in the input's grid and header, and caches that never mix inputs."""

import json
import os
import shutil
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from lightning.pytorch import Trainer

from conftest import cache_lock_refusals
from smml_lightning.cli import main
from smml_lightning.data.synthetic import synthesize
from smml_lightning.lit.smml import SMML
from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.refine import SemanticRefiner

SHAPE = (32, 32, 24)
# Modalities deleted per case (BraTS 2020 names): one, two and three missing, then none.
DROPS = [("t1",), ("t1", "t2"), ("flair", "t1ce", "t2"), ()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model = SMML(
        network=partial(MMFormer, base_width=4, transformer_dim=16, num_heads=2),
        refiner=partial(SemanticRefiner, width=4),
        roi_size=16,
    )
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(root / "model.ckpt")
    synthesize(root / "raw", 5, layout="brats2020", shape=SHAPE, seed=4)
    return root


def _inputs(setup: Path, dest: Path) -> list[Path]:
    """Five cases: four with 1, 2, 3 and 0 modalities deleted (labels too), one with a truncated FLAIR."""
    cases = sorted(p for p in (setup / "raw").iterdir() if p.is_dir())
    out = []
    for case, drop in zip(cases, [*DROPS, ()]):
        shutil.copytree(case, dest / case.name)
        for m in (*drop, "seg"):
            (dest / case.name / f"{case.name}_{m}.nii.gz").unlink()
        out.append(dest / case.name)
    flair = out[4] / f"{out[4].name}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:400])  # truncated gzip: header readable or not, data not
    # The first case's header as a scanner might write it: "aligned" sform, no qform.
    for f in out[0].glob("*.nii.gz"):
        img = nib.load(f)
        copy = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, header=img.header)
        copy.set_sform(img.affine, code=2)
        copy.set_qform(None, code=0)
        nib.save(copy, f)
    return out


def _run(*args) -> int:
    try:
        main(["predict", *map(str, args)])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _summary(out: Path) -> dict[str, dict]:
    return {r["case"]: r for r in json.loads((out / "predict_summary.json").read_text())["cases"]}


def test_every_case_accounted_for_in_its_native_grid_and_header(setup, tmp_path, capsys):
    cases = _inputs(setup, tmp_path / "in")
    out, ckpt = tmp_path / "out", setup / "model.ckpt"
    assert _run("-i", tmp_path / "in", "-o", out, "-c", ckpt) == 1  # the truncated case failed
    summary = _summary(out)
    assert [summary[c.name]["status"] for c in cases] == ["written"] * 4 + ["failed"]
    assert f"{cases[4].name}_flair.nii.gz" in summary[cases[4].name]["reason"]
    assert cases[4].name in capsys.readouterr().out
    assert not (out / f"{cases[4].name}_seg.nii.gz").exists()
    for case, drop in zip(cases[:4], DROPS):
        assert summary[case.name]["modalities"] == [m for m in ("flair", "t1ce", "t1", "t2") if m not in drop]
        seg = nib.load(out / f"{case.name}_seg.nii.gz")
        ref = nib.load(next(case.glob("*.nii.gz")))
        assert seg.shape == ref.shape == SHAPE and np.allclose(seg.affine, ref.affine)
        for form in ("qform_code", "sform_code"):
            assert seg.header[form] == ref.header[form]
        assert np.allclose(seg.get_sform(), ref.get_sform()) and seg.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}  # 2020: ET written as 4
    assert (
        nib.load(out / f"{cases[0].name}_seg.nii.gz").header["sform_code"],
        nib.load(out / f"{cases[0].name}_seg.nii.gz").header["qform_code"],
    ) == (2, 0)

    # A re-run keeps what is there (not run again) and still reports the failure.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert _run("-i", tmp_path / "in", "-o", out, "-c", ckpt) == 1
    summary = _summary(out)
    assert [summary[c.name]["status"] for c in cases] == ["kept"] * 4 + ["failed"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == stamps

    # With the switch, the unreadable FLAIR is a missing modality, named in a warning and the summary.
    with pytest.warns(UserWarning, match=f"{cases[4].name}_flair.nii.gz treated as missing"):
        assert (
            _run(
                "-i", tmp_path / "in", "-o", out, "-c", ckpt, "--missing_ok", "true", "--brats_names", "true"
            )
            == 0
        )
    summary = _summary(out)
    assert summary[cases[4].name]["status"] == "written" and summary[cases[4].name]["modalities"] == [
        "t1ce",
        "t1",
        "t2",
    ]
    assert list(summary[cases[4].name]["dropped"]) == [
        str((cases[4] / f"{cases[4].name}_flair.nii.gz").resolve())
    ]
    assert nib.load(out / f"{cases[4].name}.nii.gz").shape == SHAPE  # BraTS naming: <case id>.nii.gz


def test_missing_ok_drops_all_zero_and_off_grid_modalities(setup, tmp_path):
    case = _inputs(setup, tmp_path / "in")[3]  # all four modalities
    flair, t2 = case / f"{case.name}_flair.nii.gz", case / f"{case.name}_t2.nii.gz"
    img = nib.load(flair)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), img.affine, img.header), flair)
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.int16), img.affine), t2)
    out = tmp_path / "out"
    assert _run("-i", case, "-o", out, "-c", setup / "model.ckpt") == 1  # one case folder as input
    assert "all zeros" in _summary(out)[case.name]["reason"]
    with pytest.warns(UserWarning) as caught:
        assert _run("-i", case, "-o", out, "-c", setup / "model.ckpt", "--missing_ok=true") == 0
    messages = " ".join(str(w.message) for w in caught)
    assert "all zeros" in messages and "another grid" in messages and t2.name in messages
    assert _summary(out)[case.name]["modalities"] == ["t1ce", "t1"]


def test_inputs_with_the_same_name_never_mix(setup, tmp_path):
    raw = sorted(p for p in (setup / "raw").iterdir() if p.is_dir())
    first, second = tmp_path / "a" / "cases", tmp_path / "b" / "cases"
    for dest, picks in ((first, raw[:2]), (second, raw[2:3])):
        for case in picks:
            shutil.copytree(case, dest / case.name)
    shared = tmp_path / "cache"
    assert (
        _run("-i", first, "-o", tmp_path / "out_a", "-c", setup / "model.ckpt", "--cache_root", shared) == 0
    )
    assert (
        _run("-i", second, "-o", tmp_path / "out_b", "-c", setup / "model.ckpt", "--cache_root", shared) == 0
    )
    assert sorted(_summary(tmp_path / "out_b")) == [raw[2].name]
    assert sorted(p.name for p in (tmp_path / "out_b").glob("*.nii.gz")) == [f"{raw[2].name}_seg.nii.gz"]
    assert len(list(shared.iterdir())) == 2  # one cache per input folder, both named "cases-<key>"

    # A case removed from an input is never predicted, even into a fresh output.
    shutil.rmtree(first / raw[1].name)
    assert (
        _run("-i", first, "-o", tmp_path / "out_a2", "-c", setup / "model.ckpt", "--cache_root", shared) == 0
    )
    assert sorted(_summary(tmp_path / "out_a2")) == [raw[0].name]
    assert sorted(p.name for p in (tmp_path / "out_a2").glob("*.nii.gz")) == [f"{raw[0].name}_seg.nii.gz"]


def test_lightning_cli_predict_cache_is_keyed_by_input_path_and_content(setup, tmp_path, monkeypatch):
    """`smml predict --data.predict_root` (the Lightning CLI path) names its cache the same way."""
    from smml_lightning.data.datamodule import BratsDataModule
    from smml_lightning.data.prepare import prepare

    monkeypatch.chdir(tmp_path)
    raw = sorted(p for p in (setup / "raw").iterdir() if p.is_dir())
    first, second = tmp_path / "a" / "cases", tmp_path / "b" / "cases"
    for dest, picks in ((first, raw[:2]), (second, raw[:2])):
        for case in picks:
            shutil.copytree(case, dest / case.name)
    caches = [BratsDataModule("unused", predict_root=str(root)).predict_cache for root in (first, second)]
    assert caches[0] != caches[1] and all(c.parent == Path("runs") / "predict_cache" for c in caches)
    assert all(c.name.startswith("cases-") for c in caches)
    # An explicit predict_dir holding a case removed from the input: that case is not predicted.
    prepare(first, tmp_path / "pc", min_size=(16, 16, 16), require_label=False, progress=False)
    shutil.rmtree(first / raw[1].name)
    data = BratsDataModule("unused", predict_root=str(first), predict_dir=str(tmp_path / "pc"), num_workers=0)
    assert [b["name"][0] for b in data.predict_dataloader()] == [raw[0].name]
    assert BratsDataModule("unused", predict_root=str(first)).predict_cache != caches[0]


def test_prepare_and_a_second_predict_are_refused_while_predict_runs(setup, tmp_path, monkeypatch):
    """The working cache is locked as ``smml predict``'s: a refusal names the command that holds it."""
    from smml_lightning.data.prepare import cache_lock
    from smml_lightning.lit import predict

    case = min(p for p in (setup / "raw").iterdir() if p.is_dir())
    refusals: list[str] = []
    real_prepare_case = predict.prepare_case

    def prepare_case_beside_others(case, out, **kwargs):
        refusals.extend(cache_lock_refusals(out, "smml prepare", "smml predict"))
        return real_prepare_case(case, out, **kwargs)

    monkeypatch.setattr(predict, "prepare_case", prepare_case_beside_others)
    out = tmp_path / "out"
    assert _run("-i", case, "-o", out, "-c", setup / "model.ckpt") == 0
    (work,) = (out / ".smml-cache").iterdir()
    held = f"{work} is in use by another `smml predict` (pid {os.getpid()})"
    assert len(refusals) == 2 and all(r.startswith(held) for r in refusals), refusals
    assert _summary(out)[case.name]["status"] == "written"
    with cache_lock(work):  # released when the run ends
        pass


def test_a_checkpoint_that_cannot_be_loaded_is_one_clear_error(setup, tmp_path):
    case = min(p for p in (setup / "raw").iterdir() if p.is_dir())
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        main(["predict", "-i", str(case), "-o", str(tmp_path / "out"), "-c", str(bad)])
    assert str(stop.value.code).startswith(f"smml: error: checkpoint {bad} cannot be loaded")
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_lightning_cli_predict_names_the_cases_it_cannot_prepare(setup, tmp_path):
    from lightning.pytorch.trainer.states import TrainerFn

    from smml_lightning.data.datamodule import BratsDataModule

    cases = _inputs(setup, tmp_path / "in")
    data = BratsDataModule(
        "unused",
        predict_root=str(tmp_path / "in"),
        predict_dir=str(tmp_path / "pc"),
        patch_size=16,
        num_workers=0,
    )
    data.trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data.trainer.state.fn = TrainerFn.PREDICTING
    with pytest.warns(UserWarning, match=f"case {cases[4].name} of .* is not predicted: .*_flair.nii.gz"):
        data.prepare_data()
    assert sorted(b["name"][0] for b in data.predict_dataloader()) == [c.name for c in cases[:4]]


def test_a_model_trained_at_reduced_spacing_sees_new_cases_at_that_spacing(setup, tmp_path):
    """The checkpoint records the training cache's spacing; predict resamples inputs to it and writes the
    labels back in the input's own grid."""
    model = SMML(
        network=partial(MMFormer, base_width=4, transformer_dim=16, num_heads=2),
        refiner=partial(SemanticRefiner, width=4),
        roi_size=16,
    )
    model.input_spacing = (2.0, 2.0, 2.0)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    ckpt = tmp_path / "coarse.ckpt"
    trainer.save_checkpoint(ckpt)
    assert SMML.load_from_checkpoint(ckpt).input_spacing == (2.0, 2.0, 2.0)

    case = sorted(p for p in (setup / "raw").iterdir() if p.is_dir())[0]
    shutil.copytree(case, tmp_path / "in" / case.name)
    out = tmp_path / "out"
    assert _run("-i", tmp_path / "in", "-o", out, "-c", ckpt, "--overlay", "true") == 0
    metas = list((out / ".smml-cache").rglob("meta.json"))
    assert len(metas) == 1
    meta = json.loads(metas[0].read_text())
    seg = nib.load(out / f"{case.name}_seg.nii.gz")
    ref = nib.load(case / f"{case.name}_flair.nii.gz")
    assert meta["spacing"] == [2.0, 2.0, 2.0]
    assert np.allclose(meta["native_spacing"], ref.header.get_zooms()[:3])
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert (out / f"{case.name}_overlay.png").stat().st_size > 0
