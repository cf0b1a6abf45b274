"""Prior consistency: the SAM-prior refinement branch teaches the fused decoder."""

from __future__ import annotations

import torch

from smml_lightning.losses.hcc import softened_kl


def prior_consistency(fused_logits: torch.Tensor, refined_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_refined || p_fused)``, mean over voxels, with the refined prediction detached.

    The refinement net (and SAM) exist only at training time; inference uses the fused decoder. So the
    prior knowledge must flow into the fused logits: the refined side is the fixed target, and its own
    training comes from its CE + Dice against the labels.
    """
    return softened_kl(refined_logits.detach(), fused_logits, temperature).mean()
