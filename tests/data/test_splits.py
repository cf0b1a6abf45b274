import json

import pytest

from smml_lightning.data.splits import kfold_split, read_split, read_split_file, resolve_split, write_split

NAMES = [f"BraTS20_Training_{i:03d}" for i in range(1, 24)]


def test_read_split_file_ignores_blanks_comments_and_paths(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text(
        "# validation cases\n\nBraTS20_Training_001\n  HGG/BraTS20_Training_002/  \n"
        "BraTS20_Training_003  # inline note\n"
    )
    assert read_split_file(path) == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"]
    path.write_text("BraTS20_Training_001\nBraTS20_Training_001\n")
    with pytest.raises(ValueError, match=f"{path}.*listed twice.*BraTS20_Training_001"):
        read_split_file(path)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_split_file(tmp_path / "nope.txt")


def test_resolve_split_unknown_names_and_overlap(tmp_path):
    (tmp_path / "test.txt").write_text("BraTS20_Training_001\nBraTS20_Training_999\nBraTS20_Training_998\n")
    with pytest.raises(
        ValueError,
        match=r"test split \(split file .*test.txt\).* 2 case\(s\) not found"
        r".*BraTS20_Training_999, BraTS20_Training_998",
    ):
        resolve_split(NAMES, test=tmp_path / "test.txt")
    (tmp_path / "test.txt").write_text("BraTS20_Training_001\nBraTS20_Training_002\n")
    (tmp_path / "val.txt").write_text("BraTS20_Training_002\n")
    with pytest.raises(ValueError, match="val .*val.txt.* and test .*test.txt.* share.*BraTS20_Training_002"):
        resolve_split(NAMES, val=tmp_path / "val.txt", test=tmp_path / "test.txt")
    (tmp_path / "val.txt").write_text("BraTS20_Training_003\n")
    split = resolve_split(NAMES, val=tmp_path / "val.txt", test=tmp_path / "test.txt")
    assert split["val"] == ["BraTS20_Training_003"]
    assert split["train"] == NAMES[3:]  # the rest, when no train file is given
    assert resolve_split(NAMES, train=NAMES[:2])["val"] == []


def test_kfold_is_deterministic_partitions_and_order_independent():
    folds = [kfold_split(NAMES, n_folds=5, fold=k, val_fraction=0.2, seed=7) for k in range(5)]
    assert folds[2] == kfold_split(list(reversed(NAMES)), n_folds=5, fold=2, val_fraction=0.2, seed=7)
    assert folds[0] != kfold_split(NAMES, n_folds=5, fold=0, val_fraction=0.2, seed=8)
    tests = [n for f in folds for n in f["test"]]
    assert sorted(tests) == NAMES  # every case is tested exactly once
    for f in folds:
        assert sorted(f["train"] + f["val"] + f["test"]) == NAMES
        assert len(f["val"]) == round(0.2 * (len(NAMES) - len(f["test"])))
        assert len(f["test"]) in (4, 5)
    with pytest.raises(ValueError, match="0 <= fold < n_folds"):
        kfold_split(NAMES, n_folds=5, fold=5)
    with pytest.raises(ValueError, match="cannot make 5 folds from 3"):
        kfold_split(NAMES[:3], n_folds=5)


@pytest.mark.parametrize("target", ["split.json", "split_dir"])
def test_write_split_roundtrip(tmp_path, target):
    split = kfold_split(NAMES, fold=1, seed=0)
    path = write_split(split, tmp_path / target)
    assert read_split(path) == split
    if target.endswith(".json"):
        assert json.loads(path.read_text())["test"] == split["test"]
    else:
        assert read_split_file(path / "train.txt") == split["train"]
    assert not list(tmp_path.rglob("*.tmp"))
