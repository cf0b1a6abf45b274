"""`smml priors` in semi-supervised training and beside other runs: the prior decoder reads only the labeled
cases' labels (the datamodule's own selection), and the cache lock keeps priors and prepare apart."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import cache_lock_refusals
from smml_lightning import cli
from smml_lightning.data import cache
from smml_lightning.data.datamodule import BratsDataModule
from smml_lightning.data.prepare import cache_lock
from smml_lightning.models.sam_prior import save_tiny_sam_checkpoint
from smml_lightning.priors import load_prior_decoder, run_priors
from test_priors import _write_case

NAMES = [f"case{i}" for i in range(8)]
DATA = ["--val_fraction=0.25", "--test_fraction=0", "--seed=3"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("priors_labeled")
    for i, name in enumerate(NAMES):
        _write_case(base / "cache", name, i)
    return base, save_tiny_sam_checkpoint(base / "tiny.pth", seed=0, img_size=32)


def _fresh(prepared, tmp_path: Path) -> tuple[Path, Path]:
    base, ckpt = prepared
    root = tmp_path / "cache"
    shutil.copytree(base / "cache", root)
    return root, ckpt


def _datamodule_labeled(root: Path, **data) -> list[str]:
    """The labeled cases as training will draw them (data.val_fraction=0.25, test_fraction=0, seed=3)."""
    dm = BratsDataModule(cache_dir=str(root), val_fraction=0.25, test_fraction=0.0, seed=3, **data)
    dm.setup("validate")  # draws the split and the labeled cases, checks no patch sizes
    assert dm.labeled is not None
    return dm.labeled


def _poison(root: Path, names: list[str]) -> None:
    """Replace the cases' labels by bytes that are no array: any read of one fails, whatever the user's rights."""
    for name in names:
        (cache.case_dir(root, name) / "label.npy").write_bytes(b"not a label")


def _priors(root: Path, ckpt: Path, *extra: str) -> None:
    cli.main(
        ["priors", str(root), f"--sam_checkpoint={ckpt}", "--model_type=tiny", "--epochs=1", *DATA, *extra]
    )


def test_decoder_reads_only_the_datamodules_labeled_cases(prepared, tmp_path, monkeypatch):
    root, ckpt = _fresh(prepared, tmp_path)
    labeled = _datamodule_labeled(root, labeled_fraction=0.34)
    assert len(labeled) == 2  # 6 training cases of 8, a third of them labeled
    _poison(root, [n for n in NAMES if n not in labeled])  # unlabeled training cases and validation cases
    opened: list[str] = []
    real_load_label = cache.load_label

    def counting_load_label(cache_dir, name, mmap=True):
        opened.append(name)
        return real_load_label(cache_dir, name, mmap)

    monkeypatch.setattr(cache, "load_label", counting_load_label)
    _priors(root, ckpt, "--labeled_fraction=0.34")
    assert set(opened) == set(labeled)
    assert load_prior_decoder(root / "prior_decoder.pt")[1]["fit"]["names"] == labeled
    assert all(cache.has_prior(root, n) for n in NAMES)  # unlabeled cases still get their priors
    # Without the fraction the decoder wants every training case's label, and the poisoned ones stop it.
    opened.clear()
    with pytest.raises(SystemExit, match=r"label\.npy is truncated or unreadable"):
        _priors(root, ckpt, "--overwrite=true")
    assert set(opened) - set(labeled)


def test_labeled_cases_file_is_the_datamodules_and_the_decoders(prepared, tmp_path):
    root, ckpt = _fresh(prepared, tmp_path)
    train = cli.training_names(root, None, 0.25, 0.0, 3)
    listed = tmp_path / "labeled.txt"
    listed.write_text(f"{train[4]}\n{train[1]}\n")
    labeled = _datamodule_labeled(root, labeled_cases=str(listed))
    assert labeled == sorted([train[1], train[4]])
    _poison(root, [n for n in NAMES if n not in labeled])
    result = run_priors(root, ckpt, "tiny", epochs=1, train_names=train, labeled_cases=listed, slab=8)
    assert result["labeled"] == labeled and result["written"] == NAMES
    assert load_prior_decoder(result["decoder"])[1]["fit"]["names"] == labeled


def test_a_fraction_and_a_file_together_are_refused(prepared, tmp_path):
    root, ckpt = _fresh(prepared, tmp_path)
    with pytest.raises(SystemExit, match="give data.labeled_cases or data.labeled_fraction, not both"):
        _priors(root, ckpt, "--labeled_fraction=0.5", f"--labeled_cases={tmp_path / 'x.txt'}")
    assert not (root / "prior_decoder.pt").exists()


def test_priors_are_refused_while_prepare_holds_the_cache(prepared, tmp_path, capsys):
    root, ckpt = _fresh(prepared, tmp_path)
    with cache_lock(root), pytest.raises(SystemExit) as stop:  # as a running `smml prepare` holds it
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        _priors(root, ckpt)
    message = str(stop.value.code)
    assert message.splitlines()[0] == (
        f"smml: error: {root} is in use by another `smml prepare` (pid {os.getpid()}); "
        "wait for it to finish or stop it, then run again"
    )
    assert "Traceback" not in message + capsys.readouterr().err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing written


def test_prepare_and_a_second_priors_are_refused_while_priors_runs(prepared, tmp_path, monkeypatch):
    root, ckpt = _fresh(prepared, tmp_path)
    refusals: list[str] = []
    real_write_prior = cache.write_prior

    def write_prior_beside_others(cache_dir, name, prior):
        refusals.extend(cache_lock_refusals(root, "smml prepare", "smml priors"))
        real_write_prior(cache_dir, name, prior)

    monkeypatch.setattr(cache, "write_prior", write_prior_beside_others)
    run_priors(root, ckpt, "tiny", epochs=1, names=NAMES[:1], train_names=NAMES[:1], slab=8)
    held = f"{root} is in use by another `smml priors` (pid {os.getpid()})"
    assert len(refusals) == 2 and all(r.startswith(held) for r in refusals)
    with cache_lock(root):  # released when the run ends
        pass


def test_priors_on_a_missing_cache_create_nothing(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_priors(tmp_path / "nocache", prepared[1], "tiny", epochs=1)
    assert not (tmp_path / "nocache").exists()
