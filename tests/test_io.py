"""Atomic writes: content lands whole under the final name, a failed write leaves nothing behind, and
finished files carry the permissions the user's umask gives ordinary files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from smml_lightning.io import (
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_text,
    process_umask,
)


def test_writers_round_trip(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", lambda f: f.write(b"\x00\x01"))
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)[:, ::-1]  # not C-contiguous
    atomic_save_npy(tmp_path / "c.npy", array)
    assert (tmp_path / "a" / "t.txt").read_text() == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.npy"]  # no temporaries left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "finished")

    def boom(f) -> None:
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write_bytes(target, boom)
    assert target.read_text() == "finished"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_path_keeps_the_suffix_for_writers_that_choose_format_by_extension(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "case_seg.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".case_seg")
        tmp.write_bytes(b"x")
    assert (tmp_path / "case_seg.nii.gz").read_bytes() == b"x"


def test_umask_is_read_without_changing_it() -> None:
    before = os.umask(0o022)
    os.umask(before)
    assert process_umask() == before
    after = os.umask(0o022)
    os.umask(after)
    assert after == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_of_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    # A fresh interpreter per umask: the module reads the umask once per process.
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        os.umask({umask:#o})
        from smml_lightning.io import atomic_path, atomic_save_npy, atomic_write_bytes, atomic_write_text
        from smml_lightning.lit.callbacks import AtomicCheckpointIO
        out = sys.argv[1]
        atomic_write_text(out + "/t.txt", "x")
        atomic_write_bytes(out + "/b.bin", lambda f: f.write(b"x"))
        atomic_save_npy(out + "/a.npy", np.zeros(3))
        with atomic_path(out + "/p.nii.gz", suffix=".nii.gz") as tmp:
            tmp.write_bytes(b"x")
        AtomicCheckpointIO().save_checkpoint({{"state_dict": {{}}}}, out + "/last.ckpt")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {name: mode for name in ("t.txt", "b.bin", "a.npy", "p.nii.gz", "last.ckpt")}
