"""The ``smml`` command: one table of subcommands, each a function run by jsonargparse or the Lightning
CLI. ``smml --help`` lists them with their one-line summaries; ``smml <command> --help`` details one.

``smml predict -i INPUT -o OUTPUT -c CKPT`` is predict's short form (only a checkpoint: no cache, no
config). Experiment configs are named (``smml fit --config brats2018``) or given by path; see
:mod:`smml_lightning.experiments`. Runs land in ``runs/<experiment>/<run name>/``; see
:mod:`smml_lightning.lit.lightning_cli`.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import CLI

from . import __version__


def lightning_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Run the Lightning CLI (``fit``/``validate``/``test``/``predict``) with ``args`` (default: argv)."""
    from .lit.lightning_cli import lightning_main as run_cli

    return run_cli(args, run)


def synth(
    out: str,
    cases: int = 8,
    layout: str = "brats2020",
    generator: str | None = None,
    shape: tuple[int, int, int] | None = None,
    seed: int = 0,
    first: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> None:
    """Write synthetic BraTS cases as NIfTI in a real layout.

    Args:
        out: output folder (the dataset root, as a BraTS download would be).
        cases: number of cases.
        layout: brats2018, brats2020, brats2021 or brats2023.
        generator: ``anatomy`` (default): 240x240x155 1 mm cases on the MNI brain template; ``tiny``:
            ellipsoid heads of any ``--shape``, for quick tests. ``--shape`` alone selects ``tiny``.
        shape: volume shape of the tiny generator in voxels (default 240x240x155); smaller stands for a
            downsampled head.
        seed: the data are a pure function of the seed (and of each case's number).
        first: number of the first case (0-based); e.g. ``--cases 40 --first 32`` after a 32-case set of
            the same seed gives 40 new cases, disjoint from it, for a held-out test.
        workers: parallel processes (anatomy generator).
        overwrite: replace files of these cases that are already in ``out`` (otherwise an existing file
            stops the run before anything is written).
    """
    from .data.synthetic import synthesize, synthesize_anatomy

    generator = generator or ("tiny" if shape is not None else "anatomy")
    if generator == "tiny":
        paths = synthesize(
            out,
            cases,
            layout=layout,
            shape=tuple(shape or (240, 240, 155)),
            seed=seed,
            first=first,
            overwrite=overwrite,
        )
    elif generator == "anatomy":
        if shape is not None:
            raise ValueError("--shape applies to --generator tiny; the anatomy generator writes 240x240x155")
        paths = synthesize_anatomy(
            out, cases, layout=layout, seed=seed, first=first, workers=workers, overwrite=overwrite
        )
    else:
        raise ValueError(f"unknown --generator {generator!r}; expected anatomy or tiny")
    print(f"wrote {len(paths)} synthetic {layout} cases ({generator} generator) to {out}")


def prepare(
    root: str,
    out: str,
    layout: str = "auto",
    min_size: tuple[int, int, int] = (128, 128, 128),
    workers: int = 1,
    require_label: bool = True,
    overwrite: bool = False,
    spacing: float | None = None,
) -> None:
    """Validate, crop, z-score and cache a BraTS folder for training (re-runs skip finished cases).

    Args:
        root: BraTS folder (2018 HGG/LGG, 2020, 2021 or 2023 GLI layout) or a single case folder.
        out: cache folder.
        layout: the layout, or ``auto`` to detect it.
        min_size: each axis of the crop box is widened to at least this (use the training patch size).
        workers: parallel processes.
        require_label: training and test data need labels; prediction inputs do not.
        overwrite: redo cases that are already cached.
        spacing: resample each case to this voxel size in mm after cropping (e.g. 2.0 to train on CPU);
            ``min_size`` then counts resampled voxels. Default: keep each case's own grid.
    """
    from .data.prepare import SUMMARY, NothingPrepared, format_summary
    from .data.prepare import prepare as run_prepare

    try:
        summary = run_prepare(
            root,
            out,
            layout=layout,
            min_size=tuple(min_size),
            workers=workers,
            require_label=require_label,
            overwrite=overwrite,
            spacing=spacing,
        )
    except NothingPrepared as err:
        print(format_summary(err.summary))
        raise SystemExit(f"smml: error: {err}") from None
    print(format_summary(summary))
    if summary.failed:
        total = len(summary.failed) + len(summary.prepared) + len(summary.skipped)
        raise SystemExit(
            f"smml: error: {len(summary.failed)} of {total} cases failed (see the table above "
            f"and {Path(out) / SUMMARY}); the others are ready"
        )


def priors(
    cache_dir: str,
    sam_checkpoint: str | None = None,
    model_type: str = "vit_b",
    epochs: int = 20,
    split: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    labeled_fraction: float = 1.0,
    labeled_cases: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> None:
    """Fit the SAM prior decoder on the training cases and export priors for all cached cases.

    The decoder sees only the labels training may read, chosen exactly as the datamodule will choose them:
    pass the same ``split`` file, or the same ``val_fraction``/``test_fraction``/``seed`` as ``data.*``, and
    in semi-supervised training the same ``labeled_fraction`` or ``labeled_cases``. Priors are still
    exported for every case (SAM sees images only). One run at a time holds the cache (as ``prepare``).

    Args:
        cache_dir: the prepared cache.
        sam_checkpoint: SAM or MedSAM checkpoint (e.g. sam_vit_b_01ec64.pth).
        model_type: vit_b, vit_l, vit_h (MedSAM is vit_b), or tiny (tests and the offline demo).
        epochs: training epochs of the 3D prior decoder.
        split: split JSON or folder of train/val/test.txt (as ``data.split``).
        val_fraction: as ``data.val_fraction`` when no split file is given.
        test_fraction: as ``data.test_fraction`` when no split file is given.
        seed: as ``data.seed`` (draws the split when no split file is given, and the labeled cases).
        labeled_fraction: as ``data.labeled_fraction``: the decoder sees only this share of the training
            cases' labels.
        labeled_cases: as ``data.labeled_cases``: a file naming the labeled training cases.
        device: cpu or cuda.
        overwrite: recompute priors that exist.
    """
    from .priors import run_priors

    if sam_checkpoint is None:
        raise SystemExit(
            "smml priors needs --sam_checkpoint PATH: download sam_vit_b_01ec64.pth from the "
            "segment-anything release (or a MedSAM vit_b checkpoint) and pass --model_type vit_b"
        )
    train = training_names(cache_dir, split, val_fraction, test_fraction, seed)
    run_priors(
        cache_dir,
        checkpoint=sam_checkpoint,
        model_type=model_type,
        epochs=epochs,
        train_names=train,
        labeled_fraction=labeled_fraction,
        labeled_cases=labeled_cases,
        data_seed=seed,
        device=device,
        overwrite=overwrite,
    )


def training_names(
    cache_dir: str | Path, split: str | None, val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """The training split of a cache, as :class:`BratsDataModule` draws it (:func:`splits.choose_split`)."""
    from .data import cache, splits

    return splits.choose_split(cache.list_cases(cache_dir), split, val_fraction, test_fraction, seed)["train"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line summary (``smml --help``) and what runs it with the remaining arguments."""

    summary: str
    run: Callable[[list[str]], Any]


def function_command(target: str) -> Callable[[list[str]], Any]:
    """Runs ``module:function`` through jsonargparse (its signature and docstring are its options and help)."""
    module, name = target.split(":")

    def run(args: list[str]) -> Any:
        return CLI(getattr(importlib.import_module(module, __package__), name), args=args)

    return run


def lightning_command(subcommand: str) -> Callable[[list[str]], Any]:
    def run(args: list[str]) -> Any:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            return lightning_main([subcommand, *args])
        except SIGTERMException as stop:
            # Lightning stops with a bare SystemExit (status 0); schedulers must see the job was killed.
            raise SystemExit(143) from stop
        except SystemExit as stop:
            # Lightning answers Ctrl-C with sys.exit(1) from inside its KeyboardInterrupt handler.
            if isinstance(stop.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise

    return run


def predict_command(args: list[str]) -> Any:
    """``smml predict``: the short form ``-i INPUT -o OUTPUT -c CKPT``, else the Lightning CLI's predict."""
    from .lit.predict import is_short_form
    from .lit.predict import predict_command as short_form

    if is_short_form(args):
        return short_form(args)
    return lightning_command("predict")(args)


def analyze_command(args: list[str]) -> Any:
    """``smml analyze <what> ...``: the analyses of :mod:`smml_lightning.analysis`."""
    from .analysis.commands import main as run_analysis

    return run_analysis(args)


# The subcommands, in the order `smml --help` lists them. A new one is one entry here.
COMMANDS: dict[str, Command] = {
    "synth": Command("write synthetic BraTS cases as NIfTI in a real layout", function_command(".cli:synth")),
    "prepare": Command(
        "validate, crop, z-score and cache a BraTS folder for training", function_command(".cli:prepare")
    ),
    "priors": Command(
        "fit the SAM prior decoder and export semantic priors into a cache", function_command(".cli:priors")
    ),
    "fit": Command("train a model: --config NAME|PATH (see `smml fit --help`)", lightning_command("fit")),
    "validate": Command("score a checkpoint on the validation split", lightning_command("validate")),
    "test": Command(
        "score a checkpoint on all 15 modality subsets of the test split and write the report",
        lightning_command("test"),
    ),
    "predict": Command(
        "segment new cases with a checkpoint, back into their original grid (-i IN -o OUT -c CKPT)",
        predict_command,
    ),
    "demo": Command(
        "the whole pipeline on synthetic data: synth, prepare, priors, fit, test",
        function_command(".demo:demo"),
    ),
    "sweep": Command(
        "run a W&B sweep file locally, one fit per run, and rank the runs", function_command(".sweep:sweep")
    ),
    "evaluate": Command(
        "score a folder of predictions against BraTS labels (challenge lesion-wise and legacy)",
        function_command(".evaluation.evaluate:evaluate"),
    ),
    "analyze": Command(
        "analyses of trained runs and quality-benchmark work folders (`smml analyze --help`)", analyze_command
    ),
}


# Disk errors a user can cause (or meet), and how to say them.
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where a file is needed",
}
_WHILE_WRITING = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def check_configs(argv: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the file, line and column when a ``--config`` file is not valid YAML, or
    not a mapping of options (jsonargparse would name neither the file nor, for some errors, the line)."""
    import yaml

    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    paths += [b for a, b in itertools.pairwise(argv) if a == "--config"]
    for path in map(Path, paths):
        if not path.is_file():
            continue  # jsonargparse names a missing file; a named experiment is ours
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config {path}: YAML syntax error{where}: {problem}") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"config {path} is not a text (YAML) file") from err
        if content is not None and not isinstance(content, dict):
            raise ValueError(
                f"config {path} must be a mapping of options (section: values), "
                f"got a {type(content).__name__}"
            )


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: smml [--version] [--help] <command> [options]  (smml-lightning {__version__})",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += [
        "",
        (
            "`smml <command> --help` lists a command's options. Experiment configs are named "
            "(`--config brats2018`) or given by path."
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``smml``. Input and config errors (``ValueError``, ``FileNotFoundError`` raised by our
    checks, whose messages name the file or key), a full, read-only or forbidden disk and Ctrl-C end with
    one line instead of a traceback (Ctrl-C with status 130); set ``SMML_TRACEBACK=1`` to see the
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(f"smml-lightning {__version__}")
        return
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"smml: error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    hint = "\n(set SMML_TRACEBACK=1 for the traceback)"
    try:
        check_configs(argv[1:])
        command.run(argv[1:])
    except KeyboardInterrupt:
        if os.environ.get("SMML_TRACEBACK"):
            raise
        print(
            "smml: interrupted (Ctrl-C); finished work is kept: run the same command again to go on",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        if os.environ.get("SMML_TRACEBACK"):
            raise
        raise SystemExit(f"smml: error: {err}{hint}") from err
    except OSError as err:  # after FileNotFoundError, whose messages here come from our checks
        if err.errno not in _DISK_ERRORS or os.environ.get("SMML_TRACEBACK"):
            raise
        if not err.filename:
            where = ""
        elif err.errno in _WHILE_WRITING:
            where = f" while writing {err.filename}"
        else:
            where = f": {err.filename}"
        raise SystemExit(f"smml: error: {_DISK_ERRORS[err.errno]}{where}{hint}") from err


if __name__ == "__main__":
    main()
