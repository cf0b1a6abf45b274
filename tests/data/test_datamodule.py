import json

import numpy as np
import pytest
import torch

from conftest import synthetic_meta
from smml_lightning.data import cache
from smml_lightning.data.datamodule import BratsDataModule
from smml_lightning.data.stream import QueueSampler

SHAPE = (40, 40, 32)


def _blob_label(shape, centre, radius):
    """Nested spheres: ET core, NCR ring, ED shell (internal classes 3, 1, 2)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    dist = np.sqrt(((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[dist < radius] = 2
    label[dist < 0.7 * radius] = 1
    label[dist < 0.4 * radius] = 3
    return label


def make_cache(root, n=4, shape=SHAPE, prior=False, missing=None, labels=True, seed=0):
    """Tiny cache of ``n`` cases, a tumor blob at a different place in each."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"case{i:02d}"
        available = tuple(m != missing for m in range(4)) if i == 0 and missing is not None else (True,) * 4
        meta = synthetic_meta(name, shape, available, offset=3, original_shape=(60, 60, 50), has_label=labels)
        image = rng.normal(size=(4, *shape)).astype(np.float32)
        image[[not a for a in available]] = 0
        centre = [int(rng.integers(8, s - 8)) for s in shape]
        label = _blob_label(shape, centre, 6) if labels else None
        cache.write_case(root, meta, image, label)
        if prior:
            # channel 0 of each modality's prior is a copy of the image, channel 1 its negative
            cache.write_prior(root, name, np.stack([image, -image], axis=1))
        names.append(name)
    return names


def dm_for(root, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("patch_size", 16)
    kw.setdefault("queue_length", 8)
    kw.setdefault("samples_per_volume", 2)
    kw.setdefault("batch_size", 2)
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("test_fraction", 0.25)
    return BratsDataModule(cache_dir=str(root), **kw)


def first_batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_train_batches_shaped_and_typed_with_two_workers(tmp_path):
    make_cache(tmp_path / "c", n=4, prior=True)
    dm = dm_for(
        tmp_path / "c",
        num_workers=2,
        use_prior=True,
        split=None,
        val_fraction=0,
        test_fraction=0,
        patch_size=(16, 12, 8),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 4 * 2 // 2
    batches = list(loader)
    assert len(batches) == 4
    for b in batches:
        assert b["image"].dtype == torch.float32 and b["image"].shape == (2, 4, 16, 12, 8)
        assert b["label"].dtype == torch.long and b["label"].shape == (2, 1, 16, 12, 8)
        assert set(b["label"].unique().tolist()) <= {0, 1, 2, 3}
        assert b["masks"].dtype == torch.bool and b["masks"].shape == (2, 2, 4)
        assert b["prior"].dtype == torch.float32 and b["prior"].shape == (2, 4, 2, 16, 12, 8)
        assert b["masks"].any(-1).all(), "every mask keeps at least one modality"
        assert (b["masks"][:, 0] != b["masks"][:, 1]).any(-1).all(), "a sample's two masks differ"


def test_masks_follow_mask_ratio_and_single_branch(tmp_path):
    make_cache(tmp_path / "c", n=2)
    dm = dm_for(
        tmp_path / "c", n_masks=1, mask_ratio=0.0, val_fraction=0, test_fraction=0, samples_per_volume=4
    )
    dm.setup("fit")
    masks = torch.cat([b["masks"] for b in dm.train_dataloader()])
    assert masks.shape == (8, 1, 4) and masks.all()  # ratio 0 drops nothing: only the full subset


def test_priors_stay_aligned_with_image_under_augmentation(tmp_path):
    make_cache(tmp_path / "c", n=3, prior=True)
    dm = dm_for(
        tmp_path / "c",
        use_prior=True,
        augment=True,
        val_fraction=0,
        test_fraction=0,
        samples_per_volume=3,
        patch_size=20,
    )
    torch.manual_seed(3)
    dm.setup("fit")
    n_checked = 0
    for b in dm.train_dataloader():
        for i in range(b["image"].shape[0]):
            for m in range(4):
                x = b["prior"][i, m, 0].flatten().double()
                y = b["image"][i, m].flatten().double()
                assert torch.allclose(b["prior"][i, m, 1], -b["prior"][i, m, 0], atol=1e-3)
                # the image is the prior under one per-channel scale and shift, nothing else
                a, c = np.polyfit(x.numpy(), y.numpy(), 1)
                resid = (y - (a * x + c)).abs().max().item()
                assert 0.9 - 1e-3 <= a <= 1.1 + 1e-3 and abs(c) <= 0.1 + 1e-3
                assert resid < 0.02, f"prior and image misaligned: residual {resid}"
                n_checked += 1
    assert n_checked == 3 * 3 * 4


def test_priors_are_geometrically_augmented(tmp_path):
    """The alignment test above would pass trivially without augmentation; this shows it happens."""
    make_cache(tmp_path / "c", n=1, prior=True)
    image = torch.from_numpy(np.array(cache.load_image(tmp_path / "c", "case00")))
    dm = dm_for(
        tmp_path / "c",
        use_prior=True,
        val_fraction=0,
        test_fraction=0,
        samples_per_volume=4,
        batch_size=4,
        patch_size=SHAPE,
    )  # whole-case patch: only augmentation can change it
    torch.manual_seed(0)
    b = first_batch(dm)
    moved = [not torch.allclose(b["prior"][i, :, 0], image, atol=1e-2) for i in range(4)]
    assert all(moved)


def test_label_balanced_sampling_centres_on_tumor(tmp_path):
    names = make_cache(tmp_path / "c", n=2)
    p = 12
    dm = dm_for(
        tmp_path / "c",
        augment=False,
        val_fraction=0,
        test_fraction=0,
        samples_per_volume=150,
        queue_length=300,
        batch_size=30,
        patch_size=p,
    )
    torch.manual_seed(0)
    dm.setup("fit")
    centres = torch.cat([b["label"][:, 0, p // 2, p // 2, p // 2] for b in dm.train_dataloader()])
    assert centres.numel() == 300
    balanced = (centres > 0).float().mean().item()
    # uniform sampling over the valid centres, computed exactly from the label maps
    uniform = np.mean(
        [
            (
                cache.load_label(tmp_path / "c", n)[
                    p // 2 : SHAPE[0] - (p - 1) // 2,
                    p // 2 : SHAPE[1] - (p - 1) // 2,
                    p // 2 : SHAPE[2] - (p - 1) // 2,
                ]
                > 0
            ).mean()
            for n in names
        ]
    )
    assert uniform < 0.1
    # three tumor classes and background at equal weight: 3/4 of centres in the tumor
    assert abs(balanced - 0.75) < 0.1, (balanced, uniform)


def test_seeded_runs_give_identical_first_batches(tmp_path):
    make_cache(tmp_path / "c", n=4, prior=True)

    def run(seed):
        torch.manual_seed(seed)
        dm = dm_for(tmp_path / "c", num_workers=2, use_prior=True, val_fraction=0, test_fraction=0)
        return first_batch(dm)

    a, b, c = run(7), run(7), run(8)
    for key in ("image", "label", "masks", "prior"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], c["image"])


def _shard_names(dm, world, rank, monkeypatch):
    monkeypatch.setattr(dm, "world", lambda: (world, rank))
    train = dm.train_dataloader()
    queue = train.dataset
    train_names = [queue.subjects_dataset.dry_iter()[i]["name"] for i in queue.subject_sampler]
    test_names = [item["name"][0] for item in dm.test_dataloader()]
    return train, train_names, test_names


def test_ddp_sharding_disjoint_and_complete(tmp_path, monkeypatch):
    names = make_cache(tmp_path / "c", n=7)
    split = {"train": names[:4], "val": [], "test": names[4:]}  # odd test set: no duplicate allowed
    (tmp_path / "split.json").write_text(json.dumps(split))
    dm = dm_for(tmp_path / "c", split=str(tmp_path / "split.json"))
    dm.setup("fit")
    shards = [_shard_names(dm, 2, r, monkeypatch) for r in (0, 1)]
    (l0, tr0, te0), (l1, tr1, te1) = shards
    assert set(tr0).isdisjoint(tr1) and sorted(tr0 + tr1) == names[:4]
    assert set(te0).isdisjoint(te1) and sorted(te0 + te1) == names[4:]
    assert len(te0) + len(te1) == 3
    # each rank's queue yields only its own shard's patches
    assert len(l0) == len(l1) == 2 * 2 // 2
    # Lightning's per-epoch set_epoch reaches the subject sampler and reshuffles the shards
    assert isinstance(l0.sampler, QueueSampler)
    before = list(l0.dataset.subject_sampler)
    orders = set()
    for epoch in range(1, 6):
        l0.sampler.set_epoch(epoch)
        assert l0.dataset.subject_sampler.epoch == epoch
        orders.add(tuple(l0.dataset.subject_sampler))
    assert len(orders | {tuple(before)}) > 1


def test_eval_batches_whole_cases(tmp_path):
    make_cache(tmp_path / "c", n=4, missing=2)
    dm = dm_for(tmp_path / "c", val_fraction=0.5, test_fraction=0.25, seed=1)
    dm.setup("fit")
    dm.setup("test")
    seen = []
    for b in list(dm.val_dataloader()) + list(dm.test_dataloader()):
        name = b["name"][0]
        seen.append(name)
        assert b["image"].shape == (1, 4, *SHAPE) and b["image"].dtype == torch.float32
        assert b["label"].shape == (1, 1, *SHAPE) and b["label"].dtype == torch.long
        meta = cache.load_meta(tmp_path / "c", name)
        assert b["available"].tolist() == [list(meta.available)]
        assert torch.equal(b["image"][0], torch.from_numpy(np.array(cache.load_image(tmp_path / "c", name))))
    val = list(dm.val_dataloader())
    assert sorted(seen) == sorted(dm.splits["val"] + dm.splits["test"]) and len(val) == 2


def test_seeded_split_written_and_reproducible(tmp_path):
    names = make_cache(tmp_path / "c", n=10)
    dm = dm_for(tmp_path / "c", seed=5, val_fraction=0.2, test_fraction=0.3, output_dir=str(tmp_path / "run"))
    dm.setup("fit")
    written = json.loads((tmp_path / "run" / "split.json").read_text())
    assert written == dm.splits
    assert [len(written[k]) for k in ("train", "val", "test")] == [5, 2, 3]
    assert sorted(sum(written.values(), [])) == names
    again = dm_for(tmp_path / "c", seed=5, val_fraction=0.2, test_fraction=0.3)
    again.setup("fit")
    assert again.splits == written
    other = dm_for(tmp_path / "c", seed=6, val_fraction=0.2, test_fraction=0.3)
    other.setup("fit")
    assert other.splits != written


def test_predict_dir_without_labels(tmp_path):
    make_cache(tmp_path / "c", n=2)
    make_cache(tmp_path / "p", n=3, labels=False)
    dm = dm_for(tmp_path / "c", predict_dir=str(tmp_path / "p"))
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [b["name"][0] for b in batches] == ["case00", "case01", "case02"]
    assert all("label" not in b and b["image"].shape == (1, 4, *SHAPE) for b in batches)


# --- errors ---------------------------------------------------------------------------------------


def test_error_cache_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*smml prepare"):
        dm_for(tmp_path / "nope").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no prepared cases.*smml prepare"):
        dm_for(tmp_path / "empty").setup("fit")


def test_error_patch_larger_than_case(tmp_path):
    make_cache(tmp_path / "c", n=2)
    dm = dm_for(tmp_path / "c", patch_size=(16, 16, 48), val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"case00.*\(16, 16, 48\).*\(40, 40, 32\).*patch_size.*prepare"):
        dm.setup("fit")


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_error_mask_ratio_out_of_range(tmp_path, ratio):
    with pytest.raises(ValueError, match=r"mask_ratio.*\[0, 1\]"):
        dm_for(tmp_path, mask_ratio=ratio)


def test_error_split_names_unknown_cases(tmp_path):
    make_cache(tmp_path / "c", n=2)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["case00", "ghost7"], "test": ["case01"]}))
    with pytest.raises(ValueError, match=r"split\.json.*train.*ghost7"):
        dm_for(tmp_path / "c", split=str(path)).setup("fit")
    path.write_text(json.dumps({"train": ["case00"], "test": ["case00"]}))
    with pytest.raises(ValueError, match=r"split\.json.*train.*test.*share.*case00"):
        dm_for(tmp_path / "c", split=str(path)).setup("fit")


def test_error_use_prior_without_prior(tmp_path):
    make_cache(tmp_path / "c", n=2)
    dm = dm_for(tmp_path / "c", use_prior=True, val_fraction=0, test_fraction=0)
    with pytest.raises(FileNotFoundError, match=r"case00.*prior\.npy.*smml priors"):
        dm.setup("fit")


def test_error_training_case_lacking_a_modality(tmp_path):
    """Training simulates missing modalities with masks, so its cases must have all four; the same
    case is fine to score (test/predict split)."""
    make_cache(tmp_path / "c", n=2, missing=2)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["case00"], "test": ["case01"]}))
    with pytest.raises(ValueError, match=r"case00.*lacks t1\b.*all four.*test.*predict"):
        dm_for(tmp_path / "c", split=str(path)).setup("fit")
    path.write_text(json.dumps({"train": ["case01"], "test": ["case00"]}))
    dm = dm_for(tmp_path / "c", split=str(path))
    dm.setup("fit")
    dm.setup("test")
    assert [b["available"].tolist() for b in dm.test_dataloader()] == [[[True, True, False, True]]]
