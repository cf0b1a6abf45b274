"""The anatomy generator: full-size cases on the MNI template, written in real layouts."""

import time

import nibabel as nib
import numpy as np
import pytest

from conftest import alive, ctrl_c_when, start_cli
from smml_lightning.cli import main
from smml_lightning.data.labels import to_internal
from smml_lightning.data.layouts import discover
from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.synthetic import anatomy_arrays, synthesize_anatomy
from smml_lightning.data.synthetic.anatomy import _P_LGG

SHAPE = (240, 240, 155)


def _read(case):
    images = {m: np.asarray(nib.load(str(p)).dataobj) for m, p in case.images.items()}
    return images, to_internal(np.asarray(nib.load(str(case.label)).dataobj), case.convention)


@pytest.fixture(scope="module")
def cases():
    # Cases 0 and 1 of seed 11, and its first low-grade case after them (a grade is its first draw).
    lgg = next(i for i in range(2, 50) if np.random.default_rng([11, i]).random() < _P_LGG)
    return [anatomy_arrays([11, i]) for i in (0, 1, lgg)]


def test_written_in_parallel_deterministic_and_in_the_2023_convention(tmp_path, cases):
    """Two workers write the very cases generated in memory here, in 2023 naming and labels (ET = 3)."""
    synthesize_anatomy(tmp_path, 2, layout="brats2023", seed=11, workers=2)
    written = discover(tmp_path)
    assert [c.name for c in written] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    for case, (images, label, _) in zip(written, cases):
        ia, la = _read(case)
        assert all(np.array_equal(ia[m], images[m]) for m in MODALITIES) and np.array_equal(la, label)
        raw = np.asarray(nib.load(str(case.label)).dataobj)
        assert not (raw == 4).any() and np.array_equal(raw == 3, label == 3)
    img = nib.load(str(written[0].images["t1ce"]))
    assert img.shape == SHAPE and img.get_data_dtype() == np.int16
    assert img.header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    assert nib.load(str(written[0].label)).get_data_dtype() == np.uint8


def test_skull_stripped_brain_of_realistic_size_and_distinct_anatomy(cases):
    masks = []
    for images, label, _ in cases:
        brain = images["t1"] != 0
        assert all(np.array_equal(images[m] != 0, brain) for m in MODALITIES)  # one mask, zero outside
        assert 1.0e6 < brain.sum() < 2.0e6  # adult brain volume in mL (1 mm voxels)
        assert not (label[~brain]).any()
        # The brain sits inside the grid, not cut at the sides (only the brainstem may leave at the bottom).
        for axis in (0, 1):
            extent = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
            assert extent[0] > 5 and extent[-1] < SHAPE[axis] - 6
        masks.append(brain)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        dice = 2 * (masks[a] & masks[b]).sum() / (masks[a].sum() + masks[b].sum())
        assert 0.75 < dice < 0.97  # the same kind of organ, deformed differently


def test_tumour_compartments_sizes_and_grades(cases):
    grades = [g for _, _, g in cases]
    assert grades[2] == "LGG" and "HGG" in grades
    for _, label, grade in cases:
        volumes = {c: int((label == c).sum()) for c in range(4)}
        assert 20_000 < volumes[1] + volumes[2] + volumes[3] < 400_000  # whole tumour 20-400 mL
        assert volumes[2] > 0  # oedema around every tumour
        assert (volumes[3] > 0) == (grade == "HGG")  # enhancement only in high grade
        assert volumes[1] + volumes[3] > 2_000


def test_contrasts_follow_mri(cases):
    """Region means ordered as clinical scans show them, compared within each case (no constants):
    CSF dark on FLAIR and bright on T2, oedema bright on FLAIR and T2, the enhancing rim bright on T1ce."""
    for images, label, grade in cases:
        healthy = (images["t1"] > 0) & (label == 0)
        t1 = images["t1"].astype(float)
        # T1 orders the healthy tissues: the darkest voxels are CSF, the brightest white matter.
        csf = healthy & (t1 < np.percentile(t1[healthy], 2))
        wm = healthy & (t1 > np.percentile(t1[healthy], 70))
        mean = {
            m: {
                k: images[m][r].astype(float).mean()
                for k, r in (
                    ("csf", csf),
                    ("wm", wm),
                    ("ed", label == 2),
                    ("core", label == 1),
                    ("et", label == 3),
                )
                if r.any()
            }
            for m in MODALITIES
        }
        assert (
            mean["flair"]["csf"] < 0.6 * mean["flair"]["wm"]
            and mean["flair"]["ed"] > 1.3 * mean["flair"]["wm"]
        )
        assert mean["t2"]["csf"] > 1.3 * mean["t2"]["wm"] and mean["t2"]["ed"] > 1.3 * mean["t2"]["wm"]
        assert mean["t1"]["ed"] < mean["t1"]["wm"]
        if grade == "HGG":
            et = mean["t1ce"]["et"]
            assert et > 1.15 * mean["t1ce"]["wm"] and et > 1.4 * mean["t1ce"]["ed"]
            assert et > 1.3 * mean["t1"]["et"] * mean["t1ce"]["wm"] / mean["t1"]["wm"]  # contrast uptake
        else:
            assert mean["t1ce"]["core"] < mean["t1ce"]["wm"]  # low grade: nothing enhances


def test_refuses_existing_files(tmp_path):
    folder = tmp_path / "BraTS20_Training_001"
    folder.mkdir()
    (folder / "BraTS20_Training_001_t2.nii.gz").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="BraTS20_Training_001_t2.nii.gz already exists"):
        synthesize_anatomy(tmp_path, 1)
    assert (folder / "BraTS20_Training_001_t2.nii.gz").read_bytes() == b"precious"
    assert sorted(p.name for p in folder.iterdir()) == ["BraTS20_Training_001_t2.nii.gz"]
    with pytest.raises(ValueError, match="workers"):
        synthesize_anatomy(tmp_path / "x", 1, workers=0)


def test_cli_default_is_the_anatomy_generator(tmp_path):
    """`smml synth` without --generator writes anatomy cases: it refuses the same existing file, and
    --shape belongs to the tiny generator."""
    folder = tmp_path / "BraTS20_Training_001"
    folder.mkdir()
    (folder / "BraTS20_Training_001_seg.nii.gz").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="BraTS20_Training_001_seg.nii.gz already exists"):
        main(["synth", str(tmp_path), "--cases", "1"])
    with pytest.raises(SystemExit, match="--shape applies to --generator tiny"):
        main(["synth", str(tmp_path / "x"), "--generator", "anatomy", "--shape", "[32, 32, 24]"])
    with pytest.raises(SystemExit, match="unknown --generator 'big'"):
        main(["synth", str(tmp_path / "x"), "--generator", "big"])
    assert not (tmp_path / "x").exists()


def test_ctrl_c_stops_parallel_synth_at_once(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) ends `smml synth --workers 2` with
    status 130 and one line, its workers gone and the pending cases never started."""
    proc = start_cli(["synth", str(tmp_path), "--cases", "6", "--workers", "2"])
    code, took, err, workers = ctrl_c_when(
        proc,
        lambda: bool(list(tmp_path.glob("*/*_seg.nii.gz"))),  # a first case is written: the pool is busy
        timeout=180,
        too_late="no case written in 180 s",
    )
    assert (
        code == 130
        and "Traceback" not in err
        and err.strip().splitlines()[-1].startswith("smml: interrupted")
    )
    assert took < 15, f"synth took {took:.1f} s to stop"
    time.sleep(0.5)
    assert workers and not [pid for pid in workers if alive(pid)]
    assert len(list(tmp_path.glob("*/*_seg.nii.gz"))) < 6, "the pending cases were not cancelled"
