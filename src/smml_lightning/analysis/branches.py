"""Does each branch of a multi-branch model learn each class? Per output, per tumour class, on the run's
own training patches with every modality available.

    smml analyze branches runs/quality-600/cmc-seed0-steps600 --batches 6

Reads ``<run>/config.yaml`` and ``<run>/checkpoints/last.ckpt`` (:func:`~.runs.build`), draws training
batches from the run's data module (its seed and augmentation; the batch's modality masks are replaced by
all four modalities), skips the unlabeled samples of a semi-supervised batch, and prints one row per
output:

- CMC: each modality branch's own prediction (named as in :mod:`smml_lightning.data.modalities`), and
  the averaged prediction the method infers with;
- any other method: each of its inference networks' fused prediction (SMML: each peer) and, with more
  than one, the mean of their logits, as inference averages them.

Columns, per class of the cache labels (:data:`~smml_lightning.data.labels.CLASS_NAMES`, background
left out): recall (the share of the class's true voxels predicted as the class), the mean probability of
the true class at its voxels, and predicted / true voxels (above 1: the class is over-predicted).
A branch that never predicts a class has recall 0 and pred/true 0 there.

CMC's network returns its branches' logits only in training mode, so it runs in training mode
under ``torch.no_grad``: their norms are instance norms without running statistics and CMC's network has
no dropout, so training mode changes nothing else in CMC's outputs. The other methods' networks run in
evaluation mode (their dropout off, as at inference). Both under the trainer's training-step precision.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from ..data.labels import CLASS_NAMES
from ..data.modalities import MODALITIES, MODALITY_LABELS
from ..models.base import predicted_labels
from ..models.cmc import CMCNet
from .runs import build, training_batches

CLASSES = tuple(range(1, len(CLASS_NAMES)))  # the tumour classes; background is not a question here
STATISTICS = ("recall", "mean p", "pred/true")


def class_counts(probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per tumour class (rows, :data:`CLASSES` order): true voxels, true voxels predicted as the class,
    the sum of the class's probability over its true voxels, and predicted voxels; float64 ``(K, 4)``.

    ``probs`` is ``(B, C, *spatial)`` (softmax over ``C``), ``label`` internal classes ``(B, *spatial)``
    or ``(B, 1, *spatial)``. The prediction is the argmax of ``probs``.
    """
    if label.dim() == probs.dim():
        label = label[:, 0]
    pred = predicted_labels(probs)
    rows = []
    for c in CLASSES:
        true = label == c
        rows.append(
            [
                true.sum(),
                (true & (pred == c)).sum(),
                probs[:, c].double()[true].sum(),
                (pred == c).sum(),
            ]
        )
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


def statistics(counts: torch.Tensor) -> list[tuple[float, float, float]]:
    """Per class, from :func:`class_counts` (summed over batches): recall, mean probability of the true
    class at its voxels and predicted / true voxels; NaN for a class without true voxels."""
    out = []
    for true, hit, prob, predicted in counts.tolist():
        if true == 0:
            out.append((math.nan, math.nan, math.nan))
        else:
            out.append((hit / true, prob / true, predicted / true))
    return out


def table(counts: dict[str, torch.Tensor]) -> str:
    """The Markdown table: one row per output, :data:`STATISTICS` per class; ``-`` where a class has no
    true voxels."""
    header = [f"{CLASS_NAMES[c]} {s}" for c in CLASSES for s in STATISTICS]
    lines = ["| output | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, sums in counts.items():
        cells = ["-" if math.isnan(v) else f"{v:.2f}" for row in statistics(sums) for v in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outputs(model: Any, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each output's probabilities ``(B, C, *spatial)`` on ``image`` with every modality available."""
    mask = torch.ones(image.shape[0], len(MODALITIES), dtype=torch.bool, device=image.device)
    nets = model.inference_models()
    if len(nets) == 1 and isinstance(nets[0], CMCNet):
        out = nets[0].train()(image, mask)
        probs = {MODALITY_LABELS[m]: out.aux_logits[k].float().softmax(1) for k, m in enumerate(MODALITIES)}
        return probs | {"mean of branches": out.logits.float().softmax(1)}
    logits = [net.eval()(image, mask).logits.float() for net in nets]
    if len(nets) == 1:
        return {"fused": logits[0].softmax(1)}
    probs = {f"network {k} fused": lg.softmax(1) for k, lg in enumerate(logits)}
    return probs | {"mean of networks' logits": torch.stack(logits).mean(0).softmax(1)}


def labeled_part(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and label of a batch's labeled samples (all of them when it carries no ``labeled``)."""
    keep = batch.get("labeled")
    if keep is None:
        return batch["image"], batch["label"]
    keep = keep.bool()
    return batch["image"][keep], batch["label"][keep]


def branch_counts(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], step_context: Callable[[], AbstractContextManager]
) -> dict[str, torch.Tensor]:
    """``{output: class_counts summed over the batches' labeled samples}``, the outputs run under
    ``step_context`` (the trainer precision's training-step autocast)."""
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            image, label = labeled_part(batch)
            if not len(image):
                continue
            with step_context():
                probs = outputs(model, model._layout(image))
            for name, p in probs.items():
                counts = class_counts(p, label)
                sums[name] = sums[name] + counts if name in sums else counts
    return sums


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a folder of `smml fit` (config.yaml, checkpoints/last.ckpt)")
    parser.add_argument("--batches", type=_positive, default=6, help="training batches to count over")


def run(args: argparse.Namespace) -> None:
    model, data, trainer = build(args.run, [])
    batches = training_batches(data, args.batches)
    counts = branch_counts(model, batches, trainer.precision_plugin.train_step_context)
    if not counts:
        raise ValueError(f"{args.run}: no labeled sample in {args.batches} training batches")
    print(f"{args.run} ({type(model).__name__}, {args.batches} batches, {trainer.precision}, all modalities)")
    print(table(counts))
