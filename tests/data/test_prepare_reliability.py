"""`smml prepare` keeps no stale case, shares its cache with no second run, and says plainly when a case
failed: sources are fingerprinted, the cache folder is locked, the exit status is non-zero on any failure."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from smml_lightning.cli import main
from smml_lightning.data import cache
from smml_lightning.data.prepare import SUMMARY, prepare
from smml_lightning.data.synthetic import synthesize

SHAPE = (20, 20, 16)
MIN = (12, 12, 12)


def _prepare(raw, out, **kw):
    return prepare(raw, out, min_size=MIN, progress=False, **kw)


def test_a_replaced_source_redoes_its_case(tmp_path):
    folders = synthesize(tmp_path / "raw", 2, shape=SHAPE, seed=1)
    other = synthesize(tmp_path / "other", 1, shape=SHAPE, seed=9)[0]
    out = tmp_path / "cache"
    _prepare(tmp_path / "raw", out)
    victim = folders[0]
    before = np.load(out / victim.name / "image.npy")
    # the same file name, other contents (a re-download, a corrected scan)
    shutil.copy(other / f"{other.name}_flair.nii.gz", victim / f"{victim.name}_flair.nii.gz")
    summary = _prepare(tmp_path / "raw", out)
    assert summary.prepared == [victim.name] and summary.skipped == [folders[1].name]
    after = np.load(out / victim.name / "image.npy")
    assert after.shape != before.shape or not np.array_equal(after[0], before[0])  # flair comes first
    fresh = prepare(victim, tmp_path / "fresh", min_size=MIN, progress=False)  # the new files alone
    assert fresh.prepared == [victim.name]
    np.testing.assert_array_equal(after, np.load(tmp_path / "fresh" / victim.name / "image.npy"))


def test_an_edited_source_redoes_its_case(tmp_path):
    (folder,) = synthesize(tmp_path / "raw", 1, shape=SHAPE, seed=1)
    out = tmp_path / "cache"
    _prepare(tmp_path / "raw", out)
    seg = folder / f"{folder.name}_seg.nii.gz"
    img = nib.load(str(seg))
    data = np.asarray(img.dataobj).copy()
    data[data == 2] = 1  # edema relabelled as necrosis: a corrected annotation
    stat = seg.stat()
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(seg))
    os.utime(seg, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert _prepare(tmp_path / "raw", out).prepared == [folder.name]
    label = np.asarray(cache.load_label(out, folder.name))
    assert (label == 1).any() and not (label == 2).any()
    meta = json.loads((out / folder.name / cache.META).read_text())
    assert meta["source_stat"]["seg"] == [seg.stat().st_size, seg.stat().st_mtime_ns]


def test_an_unchanged_cache_is_still_skipped(tmp_path):
    synthesize(tmp_path / "raw", 2, shape=SHAPE, seed=1)
    first = _prepare(tmp_path / "raw", tmp_path / "cache")
    assert _prepare(tmp_path / "raw", tmp_path / "cache").skipped == first.prepared


def test_a_second_run_on_a_locked_cache_stops_naming_the_holder(tmp_path):
    synthesize(tmp_path / "raw", 1, shape=SHAPE, seed=1)
    from smml_lightning.data.prepare import cache_lock

    out = tmp_path / "cache"
    with cache_lock(out):
        with pytest.raises(
            ValueError, match=rf"{out} is in use by another `smml prepare` \(pid {os.getpid()}\)"
        ):
            _prepare(tmp_path / "raw", out)
        assert not (out / SUMMARY).exists() and not cache.list_cases(out)
    assert len(_prepare(tmp_path / "raw", out).prepared) == 1  # released with the context


def test_prepare_command_exits_nonzero_on_a_failed_case_and_prints_a_table(tmp_path, capsys):
    folders = synthesize(tmp_path / "raw", 2, shape=SHAPE, seed=1)
    bad = folders[0] / f"{folders[0].name}_t2.nii.gz"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "cache"
    with pytest.raises(SystemExit) as info:
        main(["prepare", str(tmp_path / "raw"), str(out), f"--min_size={list(MIN)}"])
    captured = capsys.readouterr()
    message = str(info.value.code)
    assert info.value.code not in (0, None)
    assert "1 of 2 cases failed" in message and str(out / SUMMARY) in message
    assert "PrepareSummary(" not in captured.out and "Traceback" not in captured.err
    lines = captured.out.splitlines()
    assert any(folders[1].name in line and "prepared" in line for line in lines)
    assert any(folders[0].name in line and "failed" in line and str(bad) in line for line in lines)
    assert json.loads((out / SUMMARY).read_text())["prepared"] == [folders[1].name]


def test_prepare_command_exits_zero_when_every_case_is_ready(tmp_path, capsys):
    synthesize(tmp_path / "raw", 2, shape=SHAPE, seed=1)
    args = ["prepare", str(tmp_path / "raw"), str(tmp_path / "cache"), f"--min_size={list(MIN)}"]
    main(args)
    assert "prepared 2" in capsys.readouterr().out
    main(args)
    assert "already prepared 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option, value, allowed",
    [
        ("--workers", "0", ">= 1"),
        ("--workers", "-2", ">= 1"),
        ("--min_size", "[12,0,12]", ">= 1"),
        ("--min_size", "[-4,12,12]", ">= 1"),
    ],
)
def test_out_of_range_values_are_rejected_with_the_range(tmp_path, capsys, option, value, allowed):
    synthesize(tmp_path / "raw", 1, shape=SHAPE, seed=1)
    with pytest.raises(SystemExit) as info:
        main(["prepare", str(tmp_path / "raw"), str(tmp_path / "cache"), f"{option}={value}"])
    message = str(info.value.code) + capsys.readouterr().err
    assert option.lstrip("-") in message and allowed in message and "Traceback" not in message
    assert not (tmp_path / "cache").exists()


def test_a_cache_from_before_the_fingerprints_is_judged_by_modification_times(tmp_path):
    (folder,) = synthesize(tmp_path / "raw", 1, shape=SHAPE, seed=1)
    out = tmp_path / "cache"
    _prepare(tmp_path / "raw", out)
    meta_path = out / folder.name / cache.META
    meta = json.loads(meta_path.read_text())
    del meta["source_stat"]  # as an earlier version wrote it
    meta_path.write_text(json.dumps(meta))
    assert _prepare(tmp_path / "raw", out).skipped == [folder.name]  # sources older than the case
    flair = folder / f"{folder.name}_flair.nii.gz"
    later = meta_path.stat().st_mtime_ns + 2_000_000_000
    os.utime(flair, ns=(later, later))  # edited after the case was made
    assert _prepare(tmp_path / "raw", out).prepared == [folder.name]
