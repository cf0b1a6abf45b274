import numpy as np
import pytest
import torch

from smml_lightning.data import cache
from smml_lightning.data.labels import regions_from_labels, to_internal, to_release


def _meta(name="c1", box=((2, 10), (-1, 5), (3, 9)), shape=(12, 6, 10)):
    return cache.CaseMeta(
        name=name,
        layout="brats2020",
        convention="brats2018",
        available=(True,) * 4,
        original_shape=shape,
        affine=np.eye(4).tolist(),
        spacing=(1.0, 1.0, 1.0),
        crop_box=box,
    )


def test_write_load_roundtrip_and_marker(tmp_path):
    meta = _meta()
    img = np.random.rand(4, *meta.cropped_shape).astype(np.float32)
    lab = np.random.randint(0, 4, meta.cropped_shape).astype(np.uint8)
    cache.write_case(tmp_path, meta, img, lab)
    assert cache.list_cases(tmp_path) == ["c1"]
    assert np.array_equal(cache.load_image(tmp_path, "c1"), img)
    assert np.array_equal(cache.load_label(tmp_path, "c1"), lab)
    assert cache.load_meta(tmp_path, "c1") == meta
    assert not list(tmp_path.rglob("*.tmp"))
    (tmp_path / "c1" / "meta.json").unlink()
    assert cache.list_cases(tmp_path) == []


def test_corrupt_meta_names_the_file(tmp_path):
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="c2.*meta.json"):
        cache.load_meta(tmp_path, "c2")


def test_uncrop_puts_crop_back_exactly_with_padding_box():
    meta = _meta()
    full = np.random.rand(*meta.original_shape)
    padded = np.pad(full, [(1, 1)] * 3)
    crop = padded[tuple(slice(a + 1, b + 1) for a, b in meta.crop_box)]
    back = cache.uncrop(crop, meta)
    inside = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(meta.crop_box, meta.original_shape))
    assert np.array_equal(back[inside], full[inside])
    mask = np.zeros(meta.original_shape, bool)
    mask[inside] = True
    assert (back[~mask] == 0).all()


@pytest.mark.parametrize("conv,et", [("brats2018", 4), ("brats2023", 3)])
def test_label_conventions_roundtrip(conv, et):
    release = np.array([0, 1, 2, et, et, 0], dtype=np.uint8)
    internal = to_internal(release, conv)
    assert internal.tolist() == [0, 1, 2, 3, 3, 0]
    assert np.array_equal(to_release(internal, conv), release)
    with pytest.raises(ValueError, match="not in the"):
        to_internal(np.array([0, 5]), conv)


def test_regions():
    lab = torch.tensor([[0, 1, 2, 3]])
    r = regions_from_labels(lab)
    assert r[0, :, 0].tolist() == [False, False, False]
    assert r[0, :, 1].tolist() == [True, True, False]  # NCR: WT, TC
    assert r[0, :, 2].tolist() == [True, False, False]  # ED: WT
    assert r[0, :, 3].tolist() == [True, True, True]  # ET: all
