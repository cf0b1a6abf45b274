"""Which loss terms drive a trained run? The gradient norm of each term, on the run's own training batches.

    python benchmarks/loss_terms.py runs/quality-600/smml-seed0-steps600
    python benchmarks/loss_terms.py <run> --batches 16 -- --model.init_args.temperature=2

Reads ``<run>/config.yaml`` (as saved by ``smml fit``) and ``<run>/checkpoints/last.ckpt``, draws training
batches from the run's data module (its seed, masks and augmentation), switches the warm-up terms on,
and prints per term its mean value and the mean L2 norm of its gradient on the parameters of the
method's first inference network (SMML: branch 0), also relative to the fused segmentation term. A
term whose gradient is orders of magnitude below the segmentation losses does nothing at that scale;
one far above them dominates training. CLI overrides after ``--`` change the method before scoring
(e.g. a loss variant), the weights stay those of the checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import yaml



def build(run: Path, overrides: list[str], stage: str = "fit"):
    """The run's LightningModule (last weights), data module and a CPU trainer, through the package's CLI.

    The module is set up for ``stage`` as the trainer would before loading weights: without that its
    small bottleneck convolutions run unguarded in bf16 (models/numerics.py), with other numbers than
    the run's own fit and test.
    """
    from lightning.pytorch import Trainer

    from smml_lightning.cli import lightning_main

    config = yaml.safe_load((run / "config.yaml").read_text())
    # The subcommand's own arguments (ckpt_path, ...) are unknown to a CLI built without subcommands.
    for method in (Trainer.fit, Trainer.validate, Trainer.test):
        for key in set(inspect.signature(method).parameters) - {"model"}:
            config.pop(key, None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    args = ["--config", handle.name, "--data.num_workers=0", "--trainer.logger=false",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
            "--trainer.num_nodes=1", *overrides]
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = lightning_main(args, run=False)
    Path(handle.name).unlink()
    cli.model.setup(stage)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    cli.model.load_state_dict(checkpoint["state_dict"])
    return cli.model, cli.datamodule, cli.trainer


def gradient_norms(
    model, batches, step_context: Callable[[], AbstractContextManager]
) -> dict[str, tuple[float, float]]:
    """``{term: (mean value, mean gradient L2 norm on the first inference network)}``; the losses run
    under ``step_context`` (the trainer precision's training-step autocast, as in ``fit``)."""
    params = [p for p in model.inference_models()[0].parameters() if p.requires_grad]
    sums: dict[str, list[float]] = {}
    count = 0
    for batch in batches:
        batch = dict(batch, image=model._layout(batch["image"]))
        with step_context():
            terms = model.training_losses(batch)
        for name, value in terms.items():
            grads = torch.autograd.grad(value.float(), params, retain_graph=True, allow_unused=True)
            norm = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads if g is not None]
                                                        or [torch.zeros(())]))
            total = sums.setdefault(name, [0.0, 0.0])
            total[0] += float(value.detach())
            total[1] += float(norm)
        count += 1
    return {name: (v / count, g / count) for name, (v, g) in sums.items()}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a folder of `smml fit` (config.yaml, checkpoints/last.ckpt)")
    parser.add_argument("--batches", type=int, default=8, help="training batches to average over")
    args = parser.parse_args(own)

    model, data, trainer = build(args.run, overrides)
    model.train()
    if hasattr(model, "warmup_epochs"):
        model.warmup_epochs = 0  # score the terms that switch on after the warm-up too
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = (next(loader) for _ in range(args.batches))
    norms = gradient_norms(model, batches, trainer.precision_plugin.train_step_context)

    reference = norms.get("seg_fused", next(iter(norms.values())))[1]
    settings = [f"{args.batches} batches", str(trainer.precision), *overrides]
    print(f"{args.run} ({type(model).__name__}, {', '.join(settings)})")
    print("| term | value | gradient norm | / seg_fused |\n|---|---|---|---|")
    for name, (value, norm) in norms.items():
        print(f"| {name} | {value:.4f} | {norm:.4f} | {norm / reference:.3f} |")


if __name__ == "__main__":
    main()
