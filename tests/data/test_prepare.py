import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import NormalizeIntensity

from smml_lightning.data import cache
from smml_lightning.data.labels import to_internal
from smml_lightning.data.layouts import discover
from smml_lightning.data.prepare import LOCK, SUMMARY, crop, crop_box, prepare, z_score
from smml_lightning.data.synthetic import synthesize

SHAPE = (20, 20, 16)
MIN = (12, 12, 12)


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name not in (SUMMARY, LOCK)}


def test_crop_box_by_hand():
    mask = np.zeros((10, 10, 12), dtype=bool)
    mask[2:6, 3, 4:10] = True
    assert crop_box(mask, (6, 4, 3)) == ((1, 7), (2, 6), (4, 10))
    assert crop_box(mask, (1, 1, 1)) == ((2, 6), (3, 4), (4, 10))
    assert crop_box(mask, (13, 1, 1))[0] == (-2, 11)  # reaches outside on both sides
    with pytest.raises(ValueError, match="no non-zero voxel"):
        crop_box(np.zeros((3, 3, 3)), (1, 1, 1))


def test_crop_then_uncrop_restores_the_original_grid():
    rng = np.random.default_rng(0)
    volume = np.zeros((9, 7, 8), dtype=np.float32)
    volume[1:8, 2:5, 3:8] = rng.random((7, 3, 5)) + 0.1
    for least in [(1, 1, 1), (12, 10, 4), (9, 7, 8)]:
        box = crop_box(volume != 0, least)
        cropped = crop(volume[None], box)
        assert cropped.shape[1:] == tuple(b - a for a, b in box)
        assert all(s >= m for s, m in zip(cropped.shape[1:], least))
        meta = cache.CaseMeta(
            name="c",
            layout="brats2020",
            convention="brats2018",
            available=(True,) * 4,
            original_shape=volume.shape,
            affine=np.eye(4).tolist(),
            spacing=(1.0, 1.0, 1.0),
            crop_box=box,
        )
        assert np.array_equal(cache.uncrop(cropped, meta)[0], volume)


def test_z_score_matches_numpy_and_monai():
    rng = np.random.default_rng(1)
    volume = np.zeros((8, 9, 10), dtype=np.float32)
    volume[2:7, 1:8, 3:9] = rng.normal(300, 50, size=(5, 7, 6))
    brain = volume != 0
    out = z_score(volume, brain)
    assert out[brain].mean() == pytest.approx(0, abs=1e-6) and out[brain].std() == pytest.approx(1, abs=1e-5)
    assert not out[~brain].any()
    expected = (volume[brain] - volume[brain].mean()) / volume[brain].std()
    np.testing.assert_allclose(out[brain], expected, rtol=1e-5, atol=1e-5)
    monai = np.asarray(NormalizeIntensity(nonzero=True)(volume))
    np.testing.assert_allclose(out, monai, atol=1e-5)


@pytest.mark.parametrize("layout, et", [("brats2018", 4), ("brats2023", 3)])
def test_prepare_case_contents_and_label_remapping(tmp_path, layout, et):
    synthesize(tmp_path / "raw", 2, layout=layout, shape=SHAPE, seed=5)
    summary = prepare(tmp_path / "raw", tmp_path / "cache", min_size=MIN, progress=False)
    cases = discover(tmp_path / "raw")
    assert summary.prepared == [c.name for c in cases] and not summary.failed and not summary.skipped
    assert json.loads((tmp_path / "cache" / SUMMARY).read_text())["prepared"] == summary.prepared
    for case in cases:
        meta = cache.load_meta(tmp_path / "cache", case.name)
        seg_img = nib.load(str(case.label))
        seg = np.asarray(seg_img.dataobj)
        assert meta.original_shape == SHAPE and meta.convention == case.convention
        assert np.allclose(meta.affine, seg_img.affine) and meta.source == case.sources
        label = cache.uncrop(np.asarray(cache.load_label(tmp_path / "cache", case.name)), meta)
        assert np.array_equal(label == 3, seg == et) and np.array_equal(
            label, to_internal(seg, case.convention)
        )
        image = cache.uncrop(np.asarray(cache.load_image(tmp_path / "cache", case.name)), meta)
        raw = np.stack([nib.load(str(case.images[m])).get_fdata() for m in ("flair", "t1ce", "t1", "t2")])
        brain = (raw != 0).any(0)
        assert np.array_equal(image[0] != 0, brain)
        for i in range(4):
            assert image[i][brain].mean() == pytest.approx(0, abs=1e-5)
            assert image[i][brain].std() == pytest.approx(1, abs=1e-4)


def test_missing_modality_allowed_when_not_required(tmp_path):
    folder = synthesize(tmp_path / "raw", 1, shape=SHAPE)[0]
    (folder / f"{folder.name}_t1.nii.gz").unlink()
    with pytest.raises(
        RuntimeError, match=r"no case .* could be prepared.*missing modality file\(s\) \['t1'\]"
    ):
        prepare(tmp_path / "raw", tmp_path / "cache", min_size=MIN, progress=False)
    prepare(tmp_path / "raw", tmp_path / "cache", min_size=MIN, require_all=False, progress=False)
    meta = cache.load_meta(tmp_path / "cache", folder.name)
    image = cache.load_image(tmp_path / "cache", folder.name)
    assert meta.available == (True, True, False, True)
    assert not image[2].any() and image[0].any()


def test_idempotent_rerun_skips_and_leaves_files_untouched(tmp_path):
    synthesize(tmp_path / "raw", 2, shape=SHAPE)
    first = prepare(tmp_path / "raw", tmp_path / "cache", min_size=MIN, progress=False)
    before = _mtimes(tmp_path / "cache")
    second = prepare(tmp_path / "raw", tmp_path / "cache", min_size=MIN, progress=False)
    assert second.skipped == first.prepared and second.prepared == []
    assert _mtimes(tmp_path / "cache") == before
    third = prepare(tmp_path / "raw", tmp_path / "cache", min_size=(20, 20, 20), progress=False)
    assert third.prepared == first.prepared  # a larger patch size invalidates the old crops


@pytest.mark.parametrize("damage", ["no_meta", "stray_tmp", "truncated_image"])
def test_interrupted_case_is_redone_alone(tmp_path, damage):
    synthesize(tmp_path / "raw", 3, shape=SHAPE)
    out = tmp_path / "cache"
    prepare(tmp_path / "raw", out, min_size=MIN, progress=False)
    names = cache.list_cases(out)
    victim = out / names[1]
    reference = np.load(victim / "image.npy")
    (victim / "meta.json").unlink()
    if damage == "stray_tmp":
        (victim / ".image.npy.abc123.tmp").write_bytes(b"half")
    if damage == "truncated_image":
        data = (victim / "image.npy").read_bytes()
        (victim / "image.npy").write_bytes(data[: len(data) // 3])
    before = _mtimes(out)
    summary = prepare(tmp_path / "raw", out, min_size=MIN, progress=False)
    assert summary.prepared == [names[1]] and summary.skipped == [names[0], names[2]]
    after = _mtimes(out)
    for path, t in before.items():
        if path.parent != victim:
            assert after[path] == t
    assert cache.is_complete(out, names[1]) and not list(victim.glob("*.tmp"))
    assert np.array_equal(np.load(victim / "image.npy"), reference)


def test_truncated_image_with_meta_is_redone(tmp_path):
    synthesize(tmp_path / "raw", 1, shape=SHAPE)
    out = tmp_path / "cache"
    (name,) = prepare(tmp_path / "raw", out, min_size=MIN, progress=False).prepared
    data = (out / name / "image.npy").read_bytes()
    (out / name / "image.npy").write_bytes(data[:200])
    assert prepare(tmp_path / "raw", out, min_size=MIN, progress=False).prepared == [name]


def test_bad_case_is_reported_and_others_prepared(tmp_path):
    folders = synthesize(tmp_path / "raw", 3, shape=SHAPE)
    bad = folders[0] / f"{folders[0].name}_flair.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    summary = prepare(tmp_path / "raw", tmp_path / "cache", min_size=MIN, progress=False)
    assert summary.prepared == [f.name for f in folders[1:]]
    assert list(summary.failed) == [folders[0].name]
    assert folders[0].name in summary.failed[folders[0].name] and str(bad) in summary.failed[folders[0].name]
    saved = json.loads((tmp_path / "cache" / SUMMARY).read_text())
    assert saved["failed"] == summary.failed


def test_parallel_equals_serial(tmp_path):
    synthesize(tmp_path / "raw", 3, shape=SHAPE, seed=2)
    serial = prepare(tmp_path / "raw", tmp_path / "a", min_size=MIN, workers=1, progress=False)
    parallel = prepare(tmp_path / "raw", tmp_path / "b", min_size=MIN, workers=2, progress=False)
    assert serial.prepared == parallel.prepared and len(serial.prepared) == 3
    for name in serial.prepared:
        assert cache.load_meta(tmp_path / "a", name) == cache.load_meta(tmp_path / "b", name)
        assert np.array_equal(cache.load_image(tmp_path / "a", name), cache.load_image(tmp_path / "b", name))
        assert np.array_equal(cache.load_label(tmp_path / "a", name), cache.load_label(tmp_path / "b", name))
