"""Atomic file writes: every output goes to a temporary file beside its target, is flushed to disk and
renamed into place, so a crash or kill never leaves a half-written file under a final name. A failed
write (a full disk) removes its temporary file and raises an ``OSError`` that names the target file.

Temporary files are named ``.<name>.<random>.tmp<suffix>`` in the target's folder (same file system, so
the rename is atomic); ``smml prepare`` removes ones an interrupted run left behind. The finished file
gets the permissions an ordinary ``open(path, "w")`` would give (``0o666`` less the process umask):
``tempfile.mkstemp`` creates files readable by their owner only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

_UMASK_LOCK = threading.Lock()


@functools.cache
def process_umask() -> int:
    """The process umask, read once.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting and restoring it under a
    lock, since ``os.umask`` has no read-only form.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entry list so a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, the file written there
    is synced, given umask permissions and renamed to ``path``. On error it is removed.

    ``suffix`` ends the temporary name, for writers that choose a format by extension (``.nii.gz``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as err:  # a read-only or full disk: name the file meant, not the temporary
        err.filename = str(path)
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # An OS error (errno set) names the file meant; setting a filename on one raised with a bare
        # message would replace that message in its text.
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, name):
            err.filename = str(path)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(fileobj)`` on a binary temp file beside ``path`` and rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_save_npy(path: Path | str, array: np.ndarray) -> None:
    """Save ``array`` as ``.npy`` (C order, no pickles) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
