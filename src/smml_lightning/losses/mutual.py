"""MAML's mutual learning between the fused model and the modality-specific models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smml_lightning.losses.hcc import softened_kl


def modality_mutual_loss(
    fused_logits: torch.Tensor,
    modality_logits: Sequence[torch.Tensor],
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over available (sample, modality) pairs of the two-way softened KL between fused and modality.

    Per pair: ``KL(fused.detach() || modality) + KL(modality.detach() || fused)``, each a voxel mean
    times ``T^2``. The fused model teaches each modality model and each available modality model
    teaches the fused one; a missing modality's model is neither taught nor teaches for that sample.
    Zero with the graph intact when nothing is available.
    """
    if not modality_logits or mask.dim() != 2 or mask.shape[1] != len(modality_logits):
        raise ValueError(
            f"modality_mutual_loss: mask must be (B, {len(modality_logits)}) for {len(modality_logits)} "
            f"modality outputs, got {tuple(mask.shape)}"
        )
    fused_target = fused_logits.detach()
    losses = []
    for b, m in mask.nonzero().tolist():
        modality = modality_logits[m][b : b + 1]
        fused = fused_logits[b : b + 1]
        losses.append(
            softened_kl(fused_target[b : b + 1], modality, temperature).mean()
            + softened_kl(modality.detach(), fused, temperature).mean()
        )
    if not losses:
        return torch.stack([fused_logits.sum(), *(x.sum() for x in modality_logits)]).sum() * 0.0
    return torch.stack(losses).mean()
