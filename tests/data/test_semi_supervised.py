"""Semi-supervised training data: which cases are labeled, what supervised and semi-supervised batches
hold, that unlabeled labels are never read, and that a mixed epoch resumes exactly."""

import dataclasses

import numpy as np
import pytest
import torch
from test_datamodule import dm_for, make_cache

from smml_lightning.data import cache
from smml_lightning.data.stream import UNLABELED, MixedQueue


def _names_in_epoch(loader, epoch: int = 0) -> list[str]:
    """Case names of an epoch's positions, in order (read from the queue, as the loader would)."""
    queue = loader.dataset
    loader.sampler.set_epoch(epoch)
    queue.start_epoch(epoch, loader.batch_size)
    return [queue[i]["name"] for i in range(len(queue))]


def test_labeled_fraction_is_seeded_and_written(tmp_path):
    make_cache(tmp_path / "c", n=8)
    dm = dm_for(
        tmp_path / "c",
        labeled_fraction=0.5,
        output_dir=str(tmp_path / "out"),
        val_fraction=0,
        test_fraction=0,
    )
    dm.setup("fit")
    assert len(dm.labeled) == 4 and set(dm.labeled) < set(dm.splits["train"])
    assert (tmp_path / "out" / "labeled.txt").read_text().split() == dm.labeled
    again = dm_for(tmp_path / "c", labeled_fraction=0.5, val_fraction=0, test_fraction=0)
    again.setup("fit")
    other = dm_for(tmp_path / "c", labeled_fraction=0.5, val_fraction=0, test_fraction=0, seed=1)
    other.setup("fit")
    assert again.labeled == dm.labeled and other.labeled != dm.labeled
    tiny = dm_for(tmp_path / "c", labeled_fraction=0.01, val_fraction=0, test_fraction=0)
    tiny.setup("fit")
    assert len(tiny.labeled) == 1  # at least one labeled case


def test_supervised_methods_see_only_labeled_cases_for_a_full_length_epoch(tmp_path):
    make_cache(tmp_path / "c", n=8)
    full = dm_for(tmp_path / "c", val_fraction=0, test_fraction=0)
    full.setup("fit")
    dm = dm_for(tmp_path / "c", labeled_fraction=0.25, val_fraction=0, test_fraction=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == len(full.train_dataloader()) == 8  # 8 cases x 2 patches, batches of 2
    names = _names_in_epoch(loader)
    assert len(names) == 16 and set(names) == set(dm.labeled) and len(dm.labeled) == 2
    batch = next(iter(loader))
    assert "labeled" not in batch and batch["label"].min() >= 0


def test_semi_supervised_batches_mix_at_the_share_and_never_read_unlabeled_labels(tmp_path):
    names = make_cache(tmp_path / "c", n=6)
    labeled = names[:2]
    (tmp_path / "labeled.txt").write_text("\n".join(labeled) + "\n")
    for name in names[2:]:  # unlabeled cases, as a user's unlabeled data: no label in the cache at all
        meta = cache.load_meta(tmp_path / "c", name)
        image = np.array(cache.load_image(tmp_path / "c", name))
        (cache.case_dir(tmp_path / "c", name) / "label.npy").unlink()
        cache.write_case(tmp_path / "c", dataclasses.replace(meta, has_label=False), image, None)
        assert not (cache.case_dir(tmp_path / "c", name) / "label.npy").exists()
    dm = dm_for(
        tmp_path / "c",
        labeled_cases=str(tmp_path / "labeled.txt"),
        use_unlabeled=True,
        val_fraction=0,
        test_fraction=0,
        num_workers=1,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, MixedQueue) and len(loader) == 6
    positions = _names_in_epoch(loader)
    assert [n in labeled for n in positions] == [False, True] * 6
    # 6 unlabeled positions of 4 cases x 2 patches: most unlabeled cases appear; labeled ones recur
    assert set(labeled) <= set(positions) and len(set(positions) - set(labeled)) >= 3
    loader.sampler.set_epoch(0)
    for batch in loader:
        assert batch["labeled"].tolist() == [False, True]
        assert (batch["label"][0] == UNLABELED).all()
        assert batch["label"][1].min() >= 0 and batch["label"][1].max() <= 3
        assert batch["masks"].shape == (2, 2, 4)


@pytest.mark.parametrize("use_unlabeled", [True, False])
def test_an_epoch_with_unlabeled_cases_replays_from_a_mid_epoch_loader_state(tmp_path, use_unlabeled):
    """Mixed (semi-supervised) and labeled-only epochs that cycle over their cases both resume exactly."""
    make_cache(tmp_path / "c", n=6)

    def loader():
        torch.manual_seed(3)
        dm = dm_for(
            tmp_path / "c",
            labeled_fraction=0.34,
            use_unlabeled=use_unlabeled,
            val_fraction=0,
            test_fraction=0,
            queue_length=3,
            labeled_share=0.5,
            batch_size=1,
        )
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    first.sampler.set_epoch(1)
    epoch = list(first)
    assert len(epoch) == 12
    keys = ("image", "label", "masks", "labeled") if use_unlabeled else ("image", "label", "masks")
    if use_unlabeled:
        assert [b["labeled"].item() for b in epoch] == [False, True] * 6
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 5})
    resumed.sampler.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == 7
    for i, (got, want) in enumerate(zip(rest, epoch[5:])):
        for key in keys:
            assert torch.equal(got[key], want[key]), f"batch {i + 5}: {key} differs"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labeled_fraction": 0.0}, "labeled_fraction"),
        ({"labeled_fraction": 0.5, "labeled_cases": "x.txt"}, "not both"),
        ({"labeled_share": 1.0}, "labeled_share"),
        ({"jitter_mm": -1.0}, "jitter_mm"),
    ],
)
def test_bad_semi_supervised_options_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm_for(tmp_path, **kwargs)


def test_labeled_cases_file_must_name_training_cases(tmp_path):
    make_cache(tmp_path / "c", n=4)
    (tmp_path / "labeled.txt").write_text("case00\nnot_a_case\n")
    dm = dm_for(tmp_path / "c", labeled_cases=str(tmp_path / "labeled.txt"), val_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match=r"labeled.txt: 1 name\(s\) not in the training split"):
        dm.setup("fit")


def test_test_inputs_can_be_misaligned(tmp_path):
    make_cache(tmp_path / "c", n=4)
    plain = dm_for(tmp_path / "c")
    plain.setup("test")
    moved = dm_for(tmp_path / "c", test_misalign_mm=2.0, test_misalign_degrees=3.0)
    moved.setup("test")
    a, b = next(iter(plain.test_dataloader())), next(iter(moved.test_dataloader()))
    assert torch.equal(a["image"][0, 1], b["image"][0, 1])  # T1ce is the reference
    assert not torch.equal(a["image"][0, 0], b["image"][0, 0]) and torch.equal(a["label"], b["label"])
    again = next(iter(moved.test_dataloader()))
    assert torch.equal(again["image"], b["image"])  # seeded: every method sees the same inputs
    assert np.isfinite(b["image"].numpy()).all()
