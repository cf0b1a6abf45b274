"""Which loss terms drive a trained run, and which way? Each term's gradient on the run's own training batches.

    smml analyze loss-terms runs/quality-600/smml-seed0-steps600
    smml analyze loss-terms <run> --batches 16 -- --model.init_args.temperature=2.0

Reads ``<run>/config.yaml`` (as saved by ``smml fit``) and ``<run>/checkpoints/last.ckpt``, draws training
batches from the run's data module (its seed, masks and augmentation), switches every term on
(:func:`all_terms_on`), and prints per term its mean value, the mean L2 norm of its gradient on the
parameters of the method's first inference network (SMML: branch 0), that norm relative to the fused
segmentation term's (CMC: its one segmentation term), and the cosine between the two gradients over the
parameters both reach. A term whose gradient is orders of magnitude below the segmentation losses does
nothing at that scale; one far above them dominates training; one with a cosine near 0 spends its steps
on something else, below 0 against segmentation. CLI overrides after ``--`` change the method before
scoring (e.g. a loss setting), the weights stay those of the checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from .runs import build, training_batches


def reference_term(names: Iterable[str]) -> str:
    """The term the others are compared with: the fused segmentation loss, else the first (CMC: ``seg``)."""
    names = list(names)
    return "seg_fused" if "seg_fused" in names else names[0]


def shared_cosine(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """Cosine between two gradients (flattened per parameter, ``None`` where zero) over the parameters
    both reach: a term that trains parts the other does not touch (an auxiliary decoder, a refiner) is
    compared where the two meet. 0 when they share none."""
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not both:
        return 0.0
    x, y = torch.cat([x for x, _ in both]), torch.cat([y for _, y in both])
    return float(torch.dot(x, y) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)))


def gradient_stats(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], step_context: Callable[[], AbstractContextManager]
) -> dict[str, tuple[float, float, float]]:
    """``{term: (mean value, mean gradient L2 norm, mean cosine with the reference term's gradient)}`` on
    the parameters of the first inference network (reference: :func:`reference_term`; the cosine over
    the parameters both reach, :func:`shared_cosine`); the losses run
    under ``step_context`` (the trainer precision's training-step autocast, as in ``fit``). A cosine
    near 1 means the term pulls the network where segmentation does, near 0 elsewhere, below 0 against
    it (a conflict: the two terms undo each other's steps)."""
    params = [p for p in model.inference_models()[0].parameters() if p.requires_grad]
    sums: dict[str, list[float]] = {}
    count = 0
    for batch in batches:
        batch = dict(batch, image=model._layout(batch["image"]))
        with step_context():
            terms = model.training_losses(batch)
        grads: dict[str, list[torch.Tensor | None]] = {}
        for name, value in terms.items():
            found = torch.autograd.grad(value.float(), params, retain_graph=True, allow_unused=True)
            grads[name] = [None if g is None or not g.any() else g.float().flatten() for g in found]
        reference = grads[reference_term(grads)]
        for name, value in terms.items():
            norm = torch.linalg.vector_norm(
                torch.cat([g for g in grads[name] if g is not None] or [torch.zeros(1)])
            )
            total = sums.setdefault(name, [0.0, 0.0, 0.0])
            total[0] += float(value.detach())
            total[1] += float(norm)
            total[2] += shared_cosine(grads[name], reference)
        count += 1
    return {name: (v / count, g / count, c / count) for name, (v, g, c) in sums.items()}


def all_terms_on(model: Any) -> None:
    """Every term of ``model`` on at its configured weight: no warm-up, and terms on a schedule (CMC's
    CSC ramp-up and CAC ramp-down) at schedule factor 1, since a trainer outside a fit has no epoch to
    ramp over."""
    if hasattr(model, "warmup_epochs"):
        model.warmup_epochs = 0
    if hasattr(model, "consistency_weights"):
        model.consistency_weights = lambda epoch: (1.0, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "smml analyze loss-terms [-h] [--batches BATCHES] run [-- CLI overrides ...]"
    parser.add_argument("run", type=Path, help="a folder of `smml fit` (config.yaml, checkpoints/last.ckpt)")
    parser.add_argument("--batches", type=int, default=8, help="training batches to average over")
    parser.set_defaults(overrides=[])  # the arguments after ``--`` (see smml_lightning.analysis.commands)


def run(args: argparse.Namespace) -> None:
    model, data, trainer = build(args.run, args.overrides)
    model.train()
    all_terms_on(model)
    batches = training_batches(data, args.batches)
    stats = gradient_stats(model, batches, trainer.precision_plugin.train_step_context)

    name_ref = reference_term(stats)
    settings = [f"{args.batches} batches", str(trainer.precision), *args.overrides]
    print(f"{args.run} ({type(model).__name__}, {', '.join(settings)})")
    print(
        f"| term | value | gradient norm | / {name_ref} | cosine with {name_ref} (shared parameters) |\n|---|---|---|---|---|"
    )
    for name, (value, norm, cosine) in stats.items():
        print(f"| {name} | {value:.4f} | {norm:.4f} | {norm / stats[name_ref][1]:.3f} | {cosine:+.3f} |")
