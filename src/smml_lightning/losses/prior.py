"""Prior consistency: the SAM-prior refinement branch teaches the fused decoder where it is right."""

from __future__ import annotations

import torch

from smml_lightning.losses.hcc import pixel_level_consistency


def prior_consistency(
    fused_logits: torch.Tensor,
    refined_logits: torch.Tensor,
    label: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T^2 * KL(p_refined || p_fused)`` averaged over the refiner's reliable voxels, refined detached.

    The refinement net (and SAM) exist only at training time; inference uses the fused decoder. So the
    prior knowledge must flow into the fused logits: the refined side is the fixed target, and its own
    training comes from its CE + Dice against the labels.

    Reliable voxels are those where the refined argmax equals the label, the rule SMML's pixel-level
    HCC applies to a peer branch (:func:`~smml_lightning.losses.hcc.pixel_level_consistency`, reused
    here): a teacher passes on only what it gets right, so a refiner that lags behind the network it
    teaches (early in training, or on a class its priors say little about) cannot pull the fused
    prediction towards its mistakes. Averaged over the reliable voxels, as the paper's KL.
    """
    return pixel_level_consistency(fused_logits, refined_logits, label, temperature)
