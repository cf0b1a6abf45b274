"""A benchmark's current-result folder: its files and a PROVENANCE.md, replaced as a whole by the next run.

``benchmarks/results/<benchmark>/`` holds the current result of each benchmark only; earlier results
live in git history. A new run writes its files into a temporary sibling folder and swaps it in, so the
folder never mixes two runs and an interrupted run leaves the previous result whole. A folder that does
not look like a result (files but no PROVENANCE.md) is never replaced.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..io import process_umask
from .timing import cpu_description

PROVENANCE = "PROVENANCE.md"


def git_commit(repo: Path) -> str:
    """``git rev-parse --short HEAD`` of ``repo``, with " dirty" when tracked files have uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} dirty" if changes else head


def provenance(title: str, command: str, repo: Path, notes: tuple[str, ...] = ()) -> str:
    """PROVENANCE.md of a result: the command, the commit, the host CPU, the date, and ``notes``."""
    lines = [
        f"# Provenance: {title}",
        "",
        f"- Command: `{command}`",
        f"- Commit: {git_commit(repo)}",
        f"- Host CPU: {cpu_description()}",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        *(f"- {note}" for note in notes),
    ]
    return "\n".join(lines) + "\n"


def check_result_folder(out: Path) -> None:
    """Raise before a run when ``out`` could not take its result: a file, or a folder with files that is
    not a previous result (no PROVENANCE.md)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise FileExistsError(
            f"{out}: has files but no {PROVENANCE}, so it is not a benchmark result to replace; "
            "choose another --out"
        )


def write_result_folder(out: Path, files: dict[str, str | bytes]) -> None:
    """Make ``out`` hold exactly ``files`` (name: text or bytes), replacing a previous result there."""
    check_result_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    os.chmod(new, 0o777 & ~process_umask())  # as mkdir would make it (mkdtemp's folder is its owner's only)
    try:
        for name, content in files.items():
            (new / name).write_bytes(content.encode() if isinstance(content, str) else content)
        if not out.exists():
            new.rename(out)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        new.rename(out)
        shutil.rmtree(old)
    finally:
        if new.exists():
            shutil.rmtree(new)
