"""``smml analyze <what> ...``: one subcommand per analysis module, with its one-line help."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

ANALYSES = {  # subcommand: (module, one-line help)
    "agreement": (
        "agreement",
        "Dice between the two peers' own predictions, and each peer's against the labels",
    ),
    "volumes": ("volumes", "predicted / true volume, precision and recall: over- or under-segmentation"),
    "et-breakdown": ("et_breakdown", "ET Dice split by cases with and without enhancement and by T1ce"),
    "loss-terms": (
        "loss_terms",
        "each loss term's value, gradient norm and cosine with segmentation's gradient on a run's training batches",
    ),
    "branches": ("branches", "each branch's recall and true-class probability per class (CMC: per modality)"),
    "priors": ("priors", "Dice of the cached SAM priors, or a work folder whose priors are the labels"),
    "widths": ("widths", "training-step time against the networks' base width (bf16 on CPU)"),
}


def parser() -> argparse.ArgumentParser:
    """The command line of every analysis; each subcommand's ``run`` is its ``handler``."""
    top = argparse.ArgumentParser(
        prog="smml analyze",
        description="Analyses of trained runs and of the "
        "quality benchmark's work folders (smml_lightning.analysis).",
    )
    sub = top.add_subparsers(dest="what", required=True, metavar="what")
    for name, (module_name, summary) in ANALYSES.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        part = sub.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(part)
        part.set_defaults(handler=module.run)
    return top


def main(argv: Sequence[str]) -> None:
    """Parse ``argv`` (after ``smml analyze``) and run that analysis. Arguments after ``--`` are CLI
    overrides, for ``loss-terms`` only (they change the method before its terms are scored)."""
    argv = list(argv)
    own, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    commands = parser()
    args = commands.parse_args(own)
    if "--" in argv:
        if args.what != "loss-terms":
            commands.error(f"arguments after -- are CLI overrides for loss-terms, not for {args.what}")
        args.overrides = overrides
    args.handler(args)
