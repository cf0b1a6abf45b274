import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread

from smml_lightning.data.cache import CaseMeta
from smml_lightning.data.labels import to_internal
from smml_lightning.evaluation.predict import write_overlay, write_prediction

SHAPE = (14, 12, 10)
# A box reaching past the start of axis 1 (padded crop) and inside the volume elsewhere.
BOX = ((2, 12), (-2, 10), (1, 9))
AFFINE = np.array([[-1.0, 0, 0, 120], [0, -1.0, 0, 119], [0, 0, 1.2, -70], [0, 0, 0, 1]])


def _meta(convention, source=None):
    return CaseMeta(
        name="case1",
        layout="brats2020",
        convention=convention,
        available=(True,) * 4,
        original_shape=SHAPE,
        affine=AFFINE.tolist(),
        spacing=(1.0, 1.0, 1.2),
        crop_box=BOX,
        source=source or {},
    )


def _release_label(et):
    """A synthetic release-convention label whose tumour lies inside the crop box's in-volume part."""
    rng = np.random.default_rng(0)
    label = np.zeros(SHAPE, np.uint8)
    label[3:11, 1:9, 2:8] = rng.choice(np.array([0, 1, 2, et], np.uint8), size=(8, 8, 6))
    return label


def _crop(array, box):
    padded = np.pad(array, [(max(-a, 0), max(b - n, 0)) for (a, b), n in zip(box, array.shape)])
    return padded[tuple(slice(a + max(-a, 0), b + max(-a, 0)) for a, b in box)]


@pytest.mark.parametrize("convention,et", [("brats2018", 4), ("brats2023", 3)])
def test_prediction_reads_back_as_original_label_in_original_grid(tmp_path, convention, et):
    release = _release_label(et)
    internal_cropped = to_internal(_crop(release, BOX), convention)
    assert internal_cropped.shape == _meta(convention).cropped_shape
    out = write_prediction(internal_cropped, _meta(convention), tmp_path / "pred" / "case1.nii.gz")
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert img.shape == SHAPE and data.dtype == np.uint8
    assert np.array_equal(data, release)
    assert set(np.unique(data)) == {0, 1, 2, et}
    np.testing.assert_allclose(img.affine, AFFINE)
    assert not list((tmp_path / "pred").glob(".*"))  # no temp files left behind


def test_header_copied_from_source_label_and_refuses_overwrite(tmp_path):
    release = _release_label(4)
    src_img = nib.Nifti1Image(release.astype(np.int16), AFFINE)
    src_img.header["descrip"] = b"source seg"
    src_img.header.set_xyzt_units("mm", "sec")
    nib.save(src_img, tmp_path / "seg.nii.gz")
    meta = _meta("brats2018", {"seg": str(tmp_path / "seg.nii.gz")})
    out = write_prediction(to_internal(_crop(release, BOX), "brats2018"), meta, tmp_path / "p.nii.gz")
    img = nib.load(out)
    assert img.header["descrip"].item() == b"source seg"
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(img.dataobj), release)

    with pytest.raises(FileExistsError, match="p.nii.gz"):
        write_prediction(np.zeros(meta.cropped_shape, np.uint8), meta, out)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), release)
    write_prediction(np.zeros(meta.cropped_shape, np.uint8), meta, out, overwrite=True)
    assert not np.asarray(nib.load(out).dataobj).any()


def test_prediction_shape_mismatch_names_case(tmp_path):
    with pytest.raises(ValueError, match="case1.*crop box"):
        write_prediction(np.zeros((3, 3, 3), np.uint8), _meta("brats2018"), tmp_path / "x.nii.gz")


def test_overlay_png_written_and_non_trivial(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(4, 16, 16, 12)).astype(np.float32)
    labels = np.zeros((16, 16, 12), np.uint8)
    labels[4:12, 5:11, 3:9] = 2
    labels[6:10, 7:9, 4:8] = 3
    out = write_overlay(image, labels, (True, False, True, True), tmp_path / "ov.png", n_slices=3)
    png = imread(out)
    assert png.ndim == 3 and png.var() > 0
    # Three rows by three available modalities: the figure is wider than one column and taller than a row.
    assert png.shape[1] > 2 * 2.6 * 80 and png.shape[0] > 2 * 2.6 * 80
    with pytest.raises(FileExistsError):
        write_overlay(image, labels, (True,) * 4, out)
