import nibabel as nib
import numpy as np
import pytest

from smml_lightning.data.layouts import Case, discover
from smml_lightning.data.synthetic import synthesize
from smml_lightning.data.validate import CaseError, validate_case

SHAPE = (16, 16, 12)


def _case(tmp_path, layout="brats2020"):
    folder = synthesize(tmp_path, 1, layout=layout, shape=SHAPE, seed=3)[0]
    return discover(tmp_path)[0], folder


def _rewrite(path, data, affine=None):
    old = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), str(path))


def _raises(case, file, problem, **kwargs):
    with pytest.raises(CaseError, match=problem) as info:
        validate_case(case, **kwargs)
    err = info.value
    assert case.name in str(err) and err.case == case.name
    if file is not None:
        assert str(file) in str(err) and err.file == str(file)
    return err


def test_valid_case_returns_the_arrays_nibabel_reads(tmp_path):
    case, _ = _case(tmp_path)
    v = validate_case(case)
    for m, path in case.images.items():
        img = nib.load(str(path))
        assert np.array_equal(v.images[m], img.get_fdata()) and v.images[m].dtype == np.float32
        assert np.allclose(v.affine, img.affine)
    assert np.array_equal(v.label, np.asarray(nib.load(str(case.label)).dataobj))
    assert v.shape == SHAPE and v.spacing == pytest.approx((240 / 16,) * 3) and v.available == (True,) * 4


def test_missing_modality_file_and_missing_label(tmp_path):
    case, folder = _case(tmp_path)
    case.images["t1ce"].unlink()
    case = discover(tmp_path)[0]
    _raises(case, folder, r"missing modality file\(s\) \['t1ce'\]")
    assert validate_case(case, require_all=False).available == (True, False, True, True)
    case.label.unlink()
    case = discover(tmp_path)[0]
    _raises(case, folder, "missing label", require_all=False)
    assert validate_case(case, require_all=False, require_label=False).label is None


def test_no_modality_at_all(tmp_path):
    case = Case(
        name="X1",
        layout="brats2020",
        convention="brats2018",
        images=dict.fromkeys(["flair", "t1ce", "t1", "t2"]),
        label=tmp_path / "X1_seg.nii.gz",
    )
    _raises(case, tmp_path, "no modality file found", require_all=False, require_label=False)


def test_truncated_gzip(tmp_path):
    case, _ = _case(tmp_path)
    path = case.images["t2"]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _raises(case, path, "unreadable, truncated or not a NIfTI")


def test_non_nifti_file(tmp_path):
    case, _ = _case(tmp_path)
    case.images["flair"].write_bytes(b"this is a text file, not an image")
    _raises(case, case.images["flair"], "unreadable, truncated or not a NIfTI")
    plain = case.images["t1"].with_name(case.images["t1"].name[:-3])  # .nii without gzip
    plain.write_bytes(b"\0" * 400)
    case.images["t1"].unlink()
    case.images["flair"] = None
    case.images["t1"] = plain
    _raises(case, plain, "unreadable, truncated or not a NIfTI", require_all=False)


def test_non_3d_and_shape_mismatch(tmp_path):
    case, _ = _case(tmp_path)
    _rewrite(case.images["t2"], np.ones((*SHAPE, 2), dtype=np.int16))
    _raises(case, case.images["t2"], r"expected a 3-D volume, got shape \(16, 16, 12, 2\)")
    _rewrite(case.images["t2"], np.ones((16, 16, 11), dtype=np.int16))
    _raises(case, case.images["t2"], r"shape \(16, 16, 11\) differs from \(16, 16, 12\) of .*_flair.nii.gz")


def test_affine_mismatch_beyond_tolerance(tmp_path):
    case, _ = _case(tmp_path)
    data = np.asarray(nib.load(str(case.images["t1"])).dataobj)
    affine = nib.load(str(case.images["t1"])).affine.copy()
    affine[0, 3] += 1e-4  # within the default 1e-3 mm
    _rewrite(case.images["t1"], data, affine)
    validate_case(case)
    affine[0, 3] += 0.05
    _rewrite(case.images["t1"], data, affine)
    _raises(case, case.images["t1"], "affine differs .* not co-registered")
    seg = np.asarray(nib.load(str(case.label)).dataobj)
    _rewrite(case.images["t1"], data, nib.load(str(case.images["flair"])).affine)
    _rewrite(case.label, seg, affine)
    _raises(case, case.label, "affine differs")


def test_nan_and_all_zero_modality(tmp_path):
    case, _ = _case(tmp_path)
    data = nib.load(str(case.images["t1ce"])).get_fdata().astype(np.float32)
    data[3, 4, 5] = np.nan
    _rewrite(case.images["t1ce"], data)
    _raises(case, case.images["t1ce"], "1 NaN or infinite voxels")
    _rewrite(case.images["t1ce"], np.zeros(SHAPE, dtype=np.int16))
    _raises(case, case.images["t1ce"], "modality t1ce is all zeros")


@pytest.mark.parametrize("layout, bad", [("brats2020", 3), ("brats2023", 4)])
def test_label_value_outside_release_set(tmp_path, layout, bad):
    case, _ = _case(tmp_path, layout)
    seg = np.asarray(nib.load(str(case.label)).dataobj).copy()
    seg[0, 0, 0] = bad
    _rewrite(case.label, seg)
    _raises(case, case.label, rf"label values \[{bad}\] are not in the {layout} set")


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def _flip_xy(path):
    """The same image stored in another orientation (RAS+ <-> LPS+): the first two voxel axes reversed and
    the affine changed to match, so every voxel keeps its place in the scanner's space."""
    img = nib.load(str(path))
    codes = nib.aff2axcodes(img.affine)
    target = (_OPPOSITE[codes[0]], _OPPOSITE[codes[1]], codes[2])
    flip = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(target)
    )
    nib.save(img.as_reoriented(flip), str(path))
    assert nib.aff2axcodes(nib.load(str(path)).affine) == target
    return "".join(codes), "".join(target)


def test_another_orientation_of_the_same_grid_is_reoriented(tmp_path):
    case, _ = _case(tmp_path)
    reference = validate_case(case)
    _flip_xy(case.images["t2"])
    _flip_xy(case.label)
    assert not np.allclose(nib.load(str(case.label)).affine, reference.affine)
    v = validate_case(case)
    np.testing.assert_array_equal(v.images["t2"], reference.images["t2"])
    np.testing.assert_array_equal(v.label, reference.label)
    np.testing.assert_allclose(v.affine, reference.affine)


def test_another_orientation_of_another_grid_says_orientation_differs(tmp_path):
    case, _ = _case(tmp_path)
    path = case.images["t1"]
    before, after = _flip_xy(path)
    img = nib.load(str(path))
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0  # and 5 mm away: no reorientation makes it coincide
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), str(path))
    _raises(
        case, path, rf"orientation {after} differs from {before} of .*flair.*and the volumes do not coincide"
    )
