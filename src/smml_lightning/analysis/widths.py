"""Network training-step time against base width, bf16 on CPU: which widths are cheap to run.

    smml analyze widths                     # 32^3 patches, batch 2, one thread
    smml analyze widths --threads 2 --reps 5

Parameter count grows with the square of the base width, but time need not: oneDNN's CPU 3D
convolutions are fast for some channel counts and slow for others (an odd base width gives channels
11, 22, 44, ...), so a model resized to match another's parameter count should take the nearest fast
width. Each network (the SMML branch of experiments/synthetic.yaml and MAML's modality models) runs a
forward and backward pass with all four modalities under bf16 autocast, the widths alternating every
repetition (:func:`~smml_lightning.analysis.timing.interleaved`); the table gives medians, parameters
and the ratio to the config's width.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..data.labels import NUM_CLASSES
from ..models.maml import MAML
from ..models.numerics import guard_small_bf16_convs
from .timing import cpu_description, interleaved, med, synthetic_branch

NETWORKS: dict[str, tuple[Callable[[int, int], torch.nn.Module], int]] = {
    # name: ((width, patch) -> network, the synthetic config's width)
    "SMML branch (MMFormer)": (lambda w, patch: synthetic_branch(patch)(base_width=w), 8),
    "MAML": (lambda w, patch: MAML(base_width=w), 16),
}


def step(net: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    """One forward and backward pass over every output the training losses read."""

    def run_once() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, mask)
        outputs = [out.logits, *out.aux_logits, *out.deep_logits]
        sum(o.float().mean() for o in outputs).backward()

    return run_once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 11, 12, 16])
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 4, *(args.patch,) * 3, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(args.batch, 4, dtype=torch.bool)
    print(
        f"{cpu_description()}; {args.threads} thread(s), patch {args.patch}^3, batch {args.batch}, "
        f"{NUM_CLASSES} classes, bf16 autocast, median of {args.reps}\n"
    )
    print("| network | base width | parameters | s/step | vs config width |\n|---|---|---|---|---|")
    for name, (make, config_width) in NETWORKS.items():
        widths = sorted({*args.widths, config_width})
        nets = {}
        for w in widths:
            torch.manual_seed(0)
            nets[w] = guard_small_bf16_convs(make(w, args.patch)).train()
        times = interleaved({w: step(nets[w], x, mask) for w in widths}, args.reps)
        for w in widths:
            size = sum(p.numel() for p in nets[w].parameters()) / 1e6
            ratio = med(times[w]) / med(times[config_width])
            print(
                f"| {name} | {w}{' (config)' if w == config_width else ''} | {size:.1f} M | "
                f"{med(times[w]):.2f} | {ratio:.2f}x |",
                flush=True,
            )
