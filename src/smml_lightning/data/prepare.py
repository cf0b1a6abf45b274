"""Raw release -> preprocessed cache: validate, crop to the brain, z-score, remap labels, write.

Preprocessing follows the community's (RFNet, mmFormer): crop to the bounding box of non-zero voxels
over all modalities, widened to at least the training patch size, and z-score each modality over the
brain voxels (non-zero in any modality), zero outside. By default there is no resampling; with a
target ``spacing`` each case is resampled after cropping and z-scoring (images linearly, labels by
nearest neighbour; :mod:`smml_lightning.data.resample`), as nnU-Net's target spacing, and the crop box
is widened so that the resampled grid still reaches the minimum size. The crop box (and the native
spacing and resampled shape) go into the cache's metadata so predictions can be put back into the
original grid. Runs are idempotent and
survive interruption: finished cases are skipped, half-written ones redone, and one bad case is
reported rather than stopping the rest. A case counts as finished only while its source files are the
ones it was made from (same paths, sizes and modification times), so an edited or replaced download
is prepared again; a case cached before sizes and times were recorded counts while its sources are
older than its ``meta.json``. One run at a time holds the cache folder (a lock file); a second one stops with the
first one's process id. Ctrl-C stops a parallel run at once: the workers are terminated, and a case
they were writing has no ``meta.json`` yet, so the next run redoes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from smml_lightning.data import cache
from smml_lightning.data.labels import to_internal
from smml_lightning.data.layouts import Case, discover
from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.resample import grid_shape, native_min_size, resample_image, resample_labels
from smml_lightning.data.validate import validate_case
from smml_lightning.io import atomic_write_text

SUMMARY = "prepare_summary.json"
LOCK = ".prepare.lock"


@dataclass
class PrepareSummary:
    """Outcome of a run: cases written now, cases already done, and failures with their reasons."""

    root: str
    out: str
    layout: str
    prepared: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class NothingPrepared(ValueError, RuntimeError):
    """No case of a run ended up usable (a bad input: ``ValueError``); ``summary`` says why each failed."""

    def __init__(self, message: str, summary: PrepareSummary) -> None:
        super().__init__(message)
        self.summary = summary


def format_summary(summary: PrepareSummary, max_rows: int = 30) -> str:
    """A run's outcome as text: one line of counts, then a table of the cases (every failed case; the
    others too while there are at most ``max_rows`` cases in all)."""
    total = len(summary.prepared) + len(summary.skipped) + len(summary.failed)
    counts = (
        f"prepared {len(summary.prepared)}, already prepared {len(summary.skipped)}, "
        f"failed {len(summary.failed)} of {total} cases in {summary.out}"
    )
    lines = [counts]
    rows = [(name, "failed", reason) for name, reason in summary.failed.items()]
    if total <= max_rows:
        rows += [(name, "prepared", "") for name in summary.prepared]
        rows += [(name, "already prepared", "") for name in summary.skipped]
    if rows:
        rows.sort()
        width = max(len("case"), *(len(name) for name, _, _ in rows))
        status_width = max(len(status) for _, status, _ in rows)
        lines.append(f"{'case':<{width}}  {'status':<{status_width}}  problem")
        lines += [
            f"{name:<{width}}  {status:<{status_width}}  {reason}".rstrip() for name, status, reason in rows
        ]
    return "\n".join(lines)


@contextlib.contextmanager
def cache_lock(out: Path | str, command: str = "smml prepare") -> Iterator[None]:
    """Hold the cache folder ``out`` for one run (an exclusive ``flock`` on ``out/.prepare.lock``, which
    holds the holder's process id and ``command``); a second run, of any command that writes the cache
    (``prepare``, ``priors``, ``predict``), raises ``ValueError`` naming the holder. The kernel drops the
    lock when the holder exits, however it exits, so a killed run never leaves the cache locked."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cache folder {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, holder = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
            raise ValueError(
                f"{out} is in use by another `{holder.strip() or 'smml prepare'}` (pid {pid or 'unknown'}); "
                "wait for it to finish or stop it, then run again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def crop_box(mask: np.ndarray, min_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` per axis of ``mask``'s bounding box, each axis widened to ``min_size``.

    Widening is symmetric (an odd surplus goes after the box) and may reach outside the volume,
    where the cropped arrays are zero-padded; see ``cache.CaseMeta.crop_box``.
    """
    if len(min_size) != mask.ndim:
        raise ValueError(f"min_size {tuple(min_size)} needs one entry per axis of a {mask.ndim}-D mask")
    found = ndimage.find_objects(np.asarray(mask, dtype=bool).astype(np.uint8))
    if not found or found[0] is None:
        raise ValueError("cannot crop: the mask has no non-zero voxel")
    box = []
    for sl, least in zip(found[0], min_size):
        start, stop = sl.start, sl.stop
        short = int(least) - (stop - start)
        if short > 0:
            start -= short // 2
            stop += short - short // 2
        box.append((int(start), int(stop)))
    return tuple(box)


def crop(volume: np.ndarray, box: Sequence[tuple[int, int]]) -> np.ndarray:
    """The part of ``volume`` (last three axes) inside ``box``, zero-padded where the box leaves it."""
    spatial = volume.shape[-3:]
    pad = [(0, 0)] * (volume.ndim - 3) + [(max(0, -a), max(0, b - n)) for (a, b), n in zip(box, spatial)]
    inner = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(box, spatial))
    return np.pad(volume[(Ellipsis,) + inner], pad)


def z_score(volume: np.ndarray, brain_mask: np.ndarray) -> np.ndarray:
    """``volume`` standardised to mean 0, std 1 over ``brain_mask`` voxels, zero outside (float32)."""
    values = volume[brain_mask].astype(np.float64)
    if values.size == 0:
        raise ValueError("cannot z-score over an empty brain mask")
    std = values.std()
    out = np.zeros(volume.shape, dtype=np.float32)
    out[brain_mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def source_stats(case: Case) -> dict[str, list[int]]:
    """``[size, mtime_ns]`` of each of ``case``'s files, keyed as :attr:`Case.sources`: what tells an
    edited or replaced file from the one a cached case was made from (reading every file again to hash
    it would cost as much as preparing the case)."""
    stats = {}
    for key, path in case.sources.items():
        st = os.stat(path)
        stats[key] = [int(st.st_size), int(st.st_mtime_ns)]
    return stats


def _is_done(
    out: Path,
    case: Case,
    min_size: Sequence[int],
    require_label: bool,
    spacing: tuple[float, float, float] | None = None,
) -> bool:
    """Whether ``case`` sits complete in the cache, from these very files (unchanged since), at the
    requested spacing (None: native), with readable arrays."""
    if not cache.is_complete(out, case.name):
        return False
    try:
        meta = cache.load_meta(out, case.name)
        if meta.source != case.sources or any(s < m for s, m in zip(meta.cropped_shape, min_size)):
            return False
        stats = source_stats(case)
        if meta.source_stat and meta.source_stat != stats:  # an edited or replaced file
            return False
        if not meta.source_stat:  # a case from before the record: its sources must predate it
            made = (cache.case_dir(out, case.name) / cache.META).stat().st_mtime_ns
            if any(mtime >= made for _, mtime in stats.values()):
                return False
        if (meta.native_spacing is None) != (spacing is None) or (
            spacing is not None and not np.allclose(meta.spacing, spacing)
        ):
            return False
        if cache.load_image(out, case.name).shape != (len(MODALITIES), *meta.cropped_shape):
            return False
        if require_label or meta.has_label:
            label = cache.load_label(out, case.name)
            return label is not None and label.shape == meta.cropped_shape
        return True
    except (OSError, ValueError):
        return False


def _clear_temporaries(folder: Path) -> None:
    """Remove temp files an interrupted atomic write left behind."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def target_spacing(spacing: float | Sequence[float] | None) -> tuple[float, float, float] | None:
    """A target spacing as three positive millimetre values (one number stands for all three), or None."""
    if spacing is None:
        return None
    values = tuple(float(v) for v in (spacing if isinstance(spacing, Sequence) else (spacing,) * 3))
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be a positive number of mm or three of them, got {spacing}")
    return values[0], values[1], values[2]


def prepare_case(
    case: Case,
    out: Path | str,
    min_size: Sequence[int] = (128, 128, 128),
    require_all: bool = True,
    require_label: bool = True,
    spacing: float | Sequence[float] | None = None,
) -> cache.CaseMeta:
    """Validate one case and write its cropped, z-scored (and, given a target ``spacing`` in mm,
    resampled) arrays to the cache."""
    target = target_spacing(spacing)
    stats = source_stats(case)  # before reading: a file changed while being read is redone next time
    v = validate_case(case, require_all=require_all, require_label=require_label)
    present = [img for img in v.images.values() if img is not None]
    brain = np.logical_or.reduce([img != 0 for img in present])
    # The label joins the box so that no annotated voxel can be cropped away.
    native_min = min_size if target is None else native_min_size(min_size, v.spacing, target)
    box = crop_box(brain if v.label is None else brain | (v.label > 0), native_min)
    cropped_brain = crop(brain, box)
    image = np.zeros((len(MODALITIES), *cropped_brain.shape), dtype=np.float32)
    for i, m in enumerate(MODALITIES):
        img = v.images[m]
        if img is not None:
            image[i] = z_score(crop(img, box), cropped_brain)
    label = None if v.label is None else crop(to_internal(v.label, case.convention), box)
    cached_spacing, native_spacing, shape = v.spacing, None, None
    if target is not None:
        shape = grid_shape(image.shape[1:], v.spacing, target)
        image = resample_image(image, shape)
        label = None if label is None else resample_labels(label, shape)
        cached_spacing, native_spacing = target, v.spacing
    meta = cache.CaseMeta(
        name=case.name,
        layout=case.layout,
        convention=case.convention,
        available=v.available,
        original_shape=v.shape,
        affine=v.affine.tolist(),
        spacing=cached_spacing,
        crop_box=box,
        source=case.sources,
        source_stat=stats,
        has_label=label is not None,
        native_spacing=native_spacing,
        grid_shape=shape,
    )
    _clear_temporaries(cache.case_dir(out, case.name))
    cache.write_case(out, meta, image, label)
    return meta


def _run_one(
    case: Case,
    out: Path,
    min_size: tuple[int, ...],
    require_all: bool,
    require_label: bool,
    overwrite: bool,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[str, str, str]:
    """``(status, name, reason)`` for one case; never raises, so one failure cannot stop the pool."""
    try:
        if not overwrite and _is_done(out, case, min_size, require_label, spacing):
            return "skipped", case.name, ""
        prepare_case(case, out, min_size, require_all, require_label, spacing)
        return "prepared", case.name, ""
    except Exception as err:  # noqa: BLE001 - every failure is reported in the summary
        return (
            "failed",
            case.name,
            str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}",
        )


def _run_job(job: tuple) -> tuple[str, str, str]:
    return _run_one(*job)


def ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which terminates them (a terminal sends it to all)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _SpawnPool(ProcessPoolExecutor):
    """A process pool whose workers never see Ctrl-C, not even while they start.

    A spawned worker imports the package (seconds) before its initializer can ignore SIGINT; a Ctrl-C in
    that time printed its traceback under the parent's one-line message. The pool starts its workers
    inside ``submit``, so SIGINT is blocked in the parent while ``submit`` runs: the workers inherit the
    blocked signal, and a Ctrl-C that reaches the parent then is delivered when ``submit`` returns.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(signal, "pthread_sigmask"):  # not POSIX
            return super().submit(fn, *args, **kwargs)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().submit(fn, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` fresh processes that leave Ctrl-C to the parent (:class:`_SpawnPool`).

    The workers are spawned, not forked: a process forked after PyTorch has run an OpenMP-parallel op
    (a prior, a resampling, a test) inherits its thread pool in a locked state and hangs at its first
    parallel op, as ``prepare`` did after ``priors`` in one process.
    """
    return _SpawnPool(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=ignore_sigint
    )


def terminate_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers now: their cases stay unfinished (no ``meta.json``), and the pool fails the
    cases not started (``BrokenProcessPool``), so none of them runs. (Cancelling the futures first would
    race the pool's own clean-up in Python 3.11.) Python 3.14 has ``terminate_workers``; before it, the
    pool's process table."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.terminate()


def prepare(
    root: Path | str,
    out: Path | str,
    layout: str = "auto",
    min_size: Sequence[int] = (128, 128, 128),
    workers: int = 1,
    require_label: bool = True,
    overwrite: bool = False,
    require_all: bool = True,
    progress: bool = True,
    spacing: float | Sequence[float] | None = None,
) -> PrepareSummary:
    """Preprocess every case of the release under ``root`` into the cache ``out``.

    ``spacing`` (mm, one number or three) resamples every case to that voxel size; None keeps each
    case's own grid. ``workers > 1`` runs cases in parallel processes. Writes ``prepare_summary.json`` into ``out``
    and raises :class:`NothingPrepared` only if no case ended up usable (neither prepared now nor
    already done); ``ValueError`` for bad arguments or when another run holds ``out``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1 (the number of parallel processes), got {workers}")
    size = tuple(int(s) for s in min_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"min_size must be three sizes >= 1 (voxels per axis), got {tuple(min_size)}")
    target = target_spacing(spacing)
    cases = discover(root, layout)
    out = Path(out)
    with cache_lock(out):
        summary = PrepareSummary(
            root=str(Path(root).resolve()), out=str(out.resolve()), layout=cases[0].layout
        )
        jobs = [(case, out, size, require_all, require_label, overwrite, target) for case in cases]
        results = []
        with tqdm(total=len(cases), desc="prepare", unit="case", disable=not progress) as bar:
            if workers > 1:
                with worker_pool(min(workers, len(jobs))) as pool:
                    futures = [pool.submit(_run_job, job) for job in jobs]
                    try:
                        for future in as_completed(futures):
                            results.append(future.result())
                            bar.update()
                    except BaseException:  # Ctrl-C (or a worker lost): stop now, not after the queue
                        terminate_workers(pool)
                        raise
            else:
                for job in jobs:
                    results.append(_run_job(job))
                    bar.update()
        _record(summary, results, root, out)
    return summary


def _record(
    summary: PrepareSummary, results: list[tuple[str, str, str]], root: Path | str, out: Path
) -> None:
    """Fill in ``summary`` from the cases' results and write it to ``out``."""
    for status, name, reason in sorted(results, key=lambda r: r[1]):
        if status == "failed":
            summary.failed[name] = reason
        else:
            getattr(summary, status).append(name)
    atomic_write_text(out / SUMMARY, json.dumps(asdict(summary), indent=1))
    if not summary.prepared and not summary.skipped:
        reasons = "; ".join(f"{n}: {r}" for n, r in list(summary.failed.items())[:3])
        raise NothingPrepared(
            f"no case of {root} could be prepared ({len(summary.failed)} failed; "
            f"see {out / SUMMARY}): {reasons}",
            summary,
        )
