"""prepare --spacing: cases resampled after cropping, recorded in the cache, and put back on the native grid."""

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to

from smml_lightning.cli import main
from smml_lightning.data import cache
from smml_lightning.data.labels import REGION_CLASSES, to_internal
from smml_lightning.data.layouts import discover
from smml_lightning.data.prepare import crop, prepare, z_score
from smml_lightning.data.resample import (
    grid_affine,
    grid_shape,
    labels_to_native,
    logits_to_box,
    logits_to_native,
    native_label,
)
from smml_lightning.data.synthetic import synthesize, synthesize_anatomy
from smml_lightning.evaluation.predict import write_prediction

MIN = (48, 48, 48)


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """One full-size anatomy case prepared at 2 mm."""
    root = tmp_path_factory.mktemp("resample")
    synthesize_anatomy(root / "raw", 1, seed=5)
    prepare(root / "raw", root / "cache", min_size=MIN, spacing=2.0, progress=False)
    (case,) = discover(root / "raw")
    return root / "cache", case


def test_cache_records_spacing_and_grid(realistic):
    root, case = realistic
    meta = cache.load_meta(root, case.name)
    assert meta.spacing == (2.0, 2.0, 2.0) and meta.native_spacing == (1.0, 1.0, 1.0)
    assert meta.original_shape == (240, 240, 155)
    image, label = cache.load_image(root, case.name), cache.load_label(root, case.name)
    assert meta.grid_shape == meta.cropped_shape == image.shape[1:] == label.shape
    assert meta.grid_shape == tuple(round(b / 2) for b in meta.box_shape)
    assert all(g >= m for g, m in zip(meta.grid_shape, MIN))
    # Reading it back does not redo it; another spacing, or none, does.
    again = prepare(root.parent / "raw", root, min_size=MIN, spacing=2.0, progress=False)
    assert again.skipped == [case.name] and not again.prepared


def test_cached_grid_is_where_its_affine_says(realistic):
    """nibabel, given the cached grid's affine, resamples the native scan to what prepare cached."""
    root, case = realistic
    meta = cache.load_meta(root, case.name)
    native = nib.load(str(case.label))
    truth = to_internal(np.asarray(native.dataobj), case.convention)
    expected = resample_from_to(
        nib.Nifti1Image(truth, native.affine), (meta.grid_shape, grid_affine(meta)), order=0
    ).get_fdata()
    cached = np.asarray(cache.load_label(root, case.name))
    assert (expected == cached).mean() > 0.995  # ties of nearest neighbour may round either way
    # Images: linear interpolation of the z-scored crop, the same as scipy's through nibabel.
    flair = np.asarray(nib.load(str(case.images["flair"])).dataobj).astype(np.float32)
    brain = np.logical_or.reduce([np.asarray(nib.load(str(p)).dataobj) != 0 for p in case.images.values()])
    zs = z_score(crop(flair, meta.crop_box), crop(brain, meta.crop_box))
    box_affine = np.asarray(meta.affine) @ np.vstack(
        [np.c_[np.eye(3), [a for a, _ in meta.crop_box]], [0, 0, 0, 1]]
    )
    by_nibabel = resample_from_to(
        nib.Nifti1Image(zs, box_affine), (meta.grid_shape, grid_affine(meta)), order=1, mode="nearest"
    ).get_fdata()
    ours = np.asarray(cache.load_image(root, case.name))[0]
    assert np.abs(by_nibabel - ours)[1:-1, 1:-1, 1:-1].max() < 1e-4


def test_labels_back_on_the_native_grid_match_the_original(realistic):
    """A label through prepare (2 mm) and back matches the original within resampling error, both as
    labels (nearest) and as one-hot scores resampled before the argmax."""
    root, case = realistic
    meta = cache.load_meta(root, case.name)
    native = nib.load(str(case.label))
    truth = to_internal(np.asarray(native.dataobj), case.convention)
    cached = np.array(cache.load_label(root, case.name))
    scores = torch.nn.functional.one_hot(torch.from_numpy(cached).long(), 4).permute(3, 0, 1, 2).float()
    for back in (labels_to_native(cached, meta), logits_to_native(scores, meta)):
        assert back.shape == truth.shape == meta.original_shape and back.dtype == np.uint8
        for region, classes in REGION_CLASSES.items():
            assert _dice(np.isin(back, classes), np.isin(truth, classes)) > 0.9, region
    with pytest.raises(ValueError, match="do not match the cached grid"):
        logits_to_native(scores[:, 1:], meta)
    with pytest.raises(ValueError, match="resample it to the native grid first"):
        cache.uncrop(cached, meta)


def test_spacing_of_the_scan_itself_changes_nothing(tmp_path):
    """At the scan's own spacing the grid is the crop box and the arrays those of a native prepare."""
    synthesize(tmp_path / "raw", 1, shape=(40, 40, 32), spacing=1.5, seed=2)
    prepare(tmp_path / "raw", tmp_path / "native", min_size=(16, 16, 16), progress=False)
    prepare(tmp_path / "raw", tmp_path / "same", min_size=(16, 16, 16), spacing=1.5, progress=False)
    (name,) = cache.list_cases(tmp_path / "native")
    a, b = cache.load_meta(tmp_path / "native", name), cache.load_meta(tmp_path / "same", name)
    assert a.native_spacing is None and b.native_spacing == (1.5, 1.5, 1.5) and a.box_shape == b.grid_shape
    assert np.array_equal(
        cache.load_label(tmp_path / "native", name), cache.load_label(tmp_path / "same", name)
    )
    assert np.allclose(cache.load_image(tmp_path / "native", name), cache.load_image(tmp_path / "same", name))
    np.testing.assert_allclose(
        grid_affine(b),
        np.asarray(b.affine) @ np.vstack([np.c_[np.eye(3), [s for s, _ in b.crop_box]], [0, 0, 0, 1]]),
        atol=1e-9,
    )


def test_cli_spacing_anisotropic_scan_and_rerun_at_another_spacing(tmp_path):
    synthesize(tmp_path / "raw", 2, shape=(32, 32, 16), spacing=(1.0, 1.0, 3.0), seed=1)
    out = str(tmp_path / "cache")
    main(["prepare", str(tmp_path / "raw"), out, "--min_size", "[8, 8, 8]", "--spacing", "2.0"])
    names = cache.list_cases(out)
    for name in names:
        meta = cache.load_meta(out, name)
        assert meta.spacing == (2.0, 2.0, 2.0) and meta.native_spacing == (1.0, 1.0, 3.0)
        assert meta.grid_shape == grid_shape(meta.box_shape, (1.0, 1.0, 3.0), (2.0, 2.0, 2.0))
        assert meta.grid_shape[2] > meta.box_shape[2]  # 3 mm slices become 2 mm ones
    summary = prepare(tmp_path / "raw", out, min_size=(8, 8, 8), progress=False)  # native again: redone
    assert summary.prepared == names
    assert all(cache.load_meta(out, n).native_spacing is None for n in names)
    with pytest.raises(ValueError, match="spacing must be a positive"):
        prepare(tmp_path / "raw", out, spacing=0.0, progress=False)


def test_prediction_written_on_the_original_grid_and_affine(realistic, tmp_path):
    """A prediction over the 2 mm grid (labels, or scores resampled to the crop box) is saved in the scan's
    own shape and affine, aligned with its label; the native reference label is read back for metrics."""
    root, case = realistic
    meta = cache.load_meta(root, case.name)
    source = nib.load(str(case.label))
    truth = to_internal(np.asarray(source.dataobj), case.convention)
    box_truth = native_label(meta)
    assert np.array_equal(box_truth, crop(truth, meta.crop_box)) and np.array_equal(
        native_label(meta, box=False), truth
    )
    cached = np.array(cache.load_label(root, case.name))
    scores = torch.nn.functional.one_hot(torch.from_numpy(cached).long(), 4).permute(3, 0, 1, 2).float()
    on_box = logits_to_box(scores, meta)
    assert on_box.shape == meta.box_shape and np.array_equal(
        cache.uncrop(on_box, meta), logits_to_native(scores, meta)
    )
    for name, labels in (("grid", cached), ("box", on_box)):
        path = write_prediction(labels, meta, tmp_path / f"{name}.nii.gz")
        written = nib.load(str(path))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
        back = to_internal(np.asarray(written.dataobj), case.convention)
        assert _dice(back > 0, truth > 0) > 0.9
