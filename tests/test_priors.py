import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from conftest import synthetic_meta
from smml_lightning.data import cache
from smml_lightning.models.sam_prior import save_tiny_sam_checkpoint
from smml_lightning.priors import export_priors, fit_prior_decoder, load_prior_decoder, run_priors

SHAPE = (32, 32, 16)
CARRIER = 1  # t1ce: its intensity follows the label; the other modalities are noise


def _write_case(root: Path, name: str, seed: int, available=(True, True, True, True)) -> None:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    centre = [rng.integers(s // 3, 2 * s // 3) for s in SHAPE]
    r = np.sqrt(sum(((g - c) / (s / 4)) ** 2 for g, c, s in zip(grid, centre, SHAPE)))
    label = np.zeros(SHAPE, np.uint8)
    label[r < 1] = 2
    label[r < 0.6] = 3
    label[r < 0.35] = 1
    image = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    image[CARRIER] += np.array([0.0, 1.5, 3.0, 4.5], np.float32)[label]
    image[~np.array(available)] = 0
    meta = synthetic_meta(name, SHAPE, available, offset=2, original_shape=(40, 36, 20))
    cache.write_case(root, meta, image, label)


def _dice(prior: np.ndarray, label: np.ndarray) -> float:
    """Mean Dice over the three tumor classes of a prior's argmax (MONAI)."""
    pred = F.one_hot(torch.from_numpy(prior.astype(np.float32)).argmax(0), 4).permute(3, 0, 1, 2)[None]
    truth = F.one_hot(torch.from_numpy(label.astype(np.int64)), 4).permute(3, 0, 1, 2)[None]
    return float(compute_dice(pred, truth, include_background=False, ignore_empty=False).mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("priors")
    root = base / "cache"
    _write_case(root, "a", 0)
    _write_case(root, "b", 1)
    _write_case(root, "c", 2, available=(False, True, True, False))
    ckpt = save_tiny_sam_checkpoint(base / "tiny.pth", seed=0, img_size=32)
    trained = fit_prior_decoder(
        root, ["a", "b"], ckpt, "tiny", epochs=40, lr=1e-2, out=base / "trained.pt", slab=8
    )
    random = fit_prior_decoder(root, ["a", "b"], ckpt, "tiny", epochs=0, out=base / "random.pt")
    return {"base": base, "root": root, "ckpt": ckpt, "trained": trained, "random": random}


def _copy_cache(setup, name: str) -> Path:
    dest = setup["base"] / name
    shutil.copytree(setup["root"], dest)
    for p in dest.glob("*/prior.npy"):
        p.unlink()
    return dest


def test_decoder_file_holds_config_and_loss_goes_down(setup):
    decoder, payload = load_prior_decoder(setup["trained"])
    cfg = payload["config"]
    assert cfg["model_type"] == "tiny" and cfg["img_size"] == 32 and cfg["in_channels"] == 32
    assert Path(cfg["checkpoint"]) == setup["ckpt"].resolve()
    history = payload["fit"]["history"]
    assert len(history) == 40 and history[-1] < 0.8 * history[0]
    assert not decoder.training
    assert not list(setup["base"].glob(".*.tmp"))


def test_fitted_prior_beats_random_decoder_on_the_informative_modality(setup):
    fitted_root, random_root = _copy_cache(setup, "fitted"), _copy_cache(setup, "rand")
    export_priors(fitted_root, None, setup["trained"])
    export_priors(random_root, None, setup["random"])
    for name in ("a", "b", "c"):  # c was not trained on
        label = cache.load_label(fitted_root, name)
        fitted = _dice(cache.load_prior(fitted_root, name)[CARRIER], label)
        baseline = _dice(cache.load_prior(random_root, name)[CARRIER], label)
        assert fitted > baseline + 0.2, (name, fitted, baseline)


def test_exported_priors_contract(setup):
    root = _copy_cache(setup, "contract")
    result = export_priors(root, ["a", "c"], setup["trained"])
    assert result == {"written": ["a", "c"], "skipped": []}
    assert not cache.has_prior(root, "b")
    for name in ("a", "c"):
        meta = cache.load_meta(root, name)
        prior = cache.load_prior(root, name, mmap=False)
        assert prior.dtype == np.float16 and prior.shape == (4, 4, *meta.cropped_shape)
        for m, on in enumerate(meta.available):
            if on:
                assert np.allclose(prior[m].astype(np.float32).sum(0), 1.0, atol=5e-3)
                assert prior[m].min() >= 0
            else:
                assert not prior[m].any()
    assert not list(root.rglob("*.tmp"))


def test_export_resumes_and_overwrite_rewrites(setup):
    root = _copy_cache(setup, "resume")
    assert export_priors(root, None, setup["trained"])["written"] == ["a", "b", "c"]
    path = root / "a" / "prior.npy"
    before = (path.stat().st_mtime_ns, path.read_bytes())
    assert export_priors(root, None, setup["trained"]) == {"written": [], "skipped": ["a", "b", "c"]}
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert export_priors(root, ["a"], setup["random"], overwrite=True)["written"] == ["a"]
    assert path.read_bytes() != before[1]


def test_crash_during_export_leaves_no_partial_file(setup, monkeypatch):
    root = _copy_cache(setup, "crash")
    real_save = np.save

    def crashing_save(f, arr, **kwargs):
        f.write(b"\x93NUMPY half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        export_priors(root, ["a"], setup["trained"])
    assert not cache.has_prior(root, "a")
    assert sorted(p.name for p in (root / "a").iterdir()) == ["image.npy", "label.npy", "meta.json"]
    monkeypatch.setattr(np, "save", real_save)
    assert export_priors(root, ["a"], setup["trained"])["written"] == ["a"]


def test_feature_cache_fallback_trains_the_same_decoder(setup):
    root, ckpt, base = setup["root"], setup["ckpt"], setup["base"]
    kept = fit_prior_decoder(root, ["a", "b"], ckpt, "tiny", epochs=2, out=base / "kept.pt", slab=8)
    fly = fit_prior_decoder(
        root, ["a", "b"], ckpt, "tiny", epochs=2, out=base / "fly.pt", slab=8, feature_cache_bytes=0
    )
    a, b = load_prior_decoder(kept)[0].state_dict(), load_prior_decoder(fly)[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_run_priors_fits_exports_and_reuses_the_decoder(setup):
    root = _copy_cache(setup, "run")
    first = run_priors(root, setup["ckpt"], "tiny", epochs=1, train_names=["a"], slab=8)
    assert first["written"] == ["a", "b", "c"] and first["decoder"] == root / "prior_decoder.pt"
    assert load_prior_decoder(first["decoder"])[1]["fit"]["names"] == ["a"]
    stamp = first["decoder"].stat().st_mtime_ns
    second = run_priors(root, setup["ckpt"], "tiny", epochs=1, train_names=["a"], slab=8)
    assert second["skipped"] == ["a", "b", "c"] and first["decoder"].stat().st_mtime_ns == stamp
    before = cache.load_prior(root, "a", mmap=False)
    third = run_priors(
        root, setup["ckpt"], "tiny", epochs=2, train_names=["a"], slab=8
    )  # new settings: refit
    assert first["decoder"].stat().st_mtime_ns != stamp
    # The old priors came from the old decoder: all are exported again, none kept stale.
    assert third["written"] == ["a", "b", "c"] and third["skipped"] == []
    assert not np.array_equal(before, cache.load_prior(root, "a", mmap=False))


def test_clear_errors(setup, tmp_path):
    root = _copy_cache(setup, "errors")
    (root / "a" / "label.npy").unlink()
    with pytest.raises(ValueError, match="none of the 1 given cases has a label"):
        fit_prior_decoder(root, ["a"], setup["ckpt"], "tiny", epochs=1, out=tmp_path / "d.pt")
    with pytest.raises(FileNotFoundError, match="prior decoder .*missing.pt not found"):
        export_priors(root, None, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt: not a prior decoder file"):
        export_priors(root, None, tmp_path / "junk.pt")
