"""Companion methods on the same infrastructure: one network trained with modality-drop (the
mmFormer-style single branch or a plain U-Net), and MAML's modality-aware mutual learning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..losses.mutual import modality_mutual_loss
from ..losses.segmentation import deep_supervision_loss, halving_weights, masked_aux_loss
from ..models.backbone import MMFormer
from ..models.base import MaskedSegmenter
from ..models.maml import MAML
from .base import MissingModalityModule, check_weights


class SingleBranch(MissingModalityModule):
    """One network, one random modality mask per sample: the backbone without SMML's second branch,
    HCC or priors (with ``network`` = MMFormer), or a plain U-Net with input-level dropout.

    Args:
        network: builds the network (default: :class:`MMFormer` with its defaults).
        w_fused, w_aux, w_deep: weights of the segmentation terms (aux and deep are skipped for networks
            that do not produce them).
    """

    n_masks = 1

    def __init__(
        self,
        network: Callable[[], MaskedSegmenter] | None = None,
        w_fused: float = 1.0,
        w_aux: float = 1.0,
        w_deep: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(w_fused=w_fused, w_aux=w_aux, w_deep=w_deep)
        self.net = (network or MMFormer)()
        self.w = dict(fused=w_fused, aux=w_aux, deep=w_deep)

    def inference_models(self) -> list[MaskedSegmenter]:
        return [self.net]

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        mask, label = batch["masks"][:, 0], batch["label"]
        out = self.net(batch["image"], mask)
        terms = {"seg_fused": self.w["fused"] * self.seg_loss(out.logits, label)}
        if out.aux_logits:
            terms["seg_aux"] = self.w["aux"] * masked_aux_loss(
                self.seg_loss, out.aux_logits, label, out.aux_mask
            )
        if out.deep_logits:
            terms["seg_deep"] = self.w["deep"] * deep_supervision_loss(self.seg_loss, out.deep_logits, label)
        return terms


class MAMLModule(MissingModalityModule):
    """MAML (Zhang et al., MICCAI 2021): modality-specific U-Nets fused by modality-aware attention,
    with mutual learning between each available modality's prediction and the fused one.

    The availability mask applies to the fusion and to the mutual term (a missing modality's model
    neither teaches nor is taught for that sample). Each modality model reads only its own image, which
    a training patch always has, so its segmentation losses, full-resolution and deep-supervision
    outputs alike, are taken on every sample: the public MAML code supervises every modality model's
    deep-supervision series on every sample (it drops no modality in training).

    Args:
        network: builds the MAML network (default: :class:`MAML` with its defaults).
        w_fused, w_modality, w_deep, w_mutual: weights of the fused, modality-specific, deep-supervision
            and mutual-learning terms.
        temperature: softening of the mutual KL.
        warmup_epochs: epochs before the mutual term switches on.
    """

    n_masks = 1

    def __init__(
        self,
        network: Callable[[], MaskedSegmenter] | None = None,
        w_fused: float = 1.0,
        w_modality: float = 1.0,
        w_deep: float = 1.0,
        w_mutual: float = 1.0,
        temperature: float = 1.0,
        warmup_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(w_fused=w_fused, w_modality=w_modality, w_deep=w_deep, w_mutual=w_mutual)
        self.net = (network or MAML)()
        self.w = dict(fused=w_fused, modality=w_modality, deep=w_deep, mutual=w_mutual)
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs

    def inference_models(self) -> list[MaskedSegmenter]:
        return [self.net]

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        mask, label = batch["masks"][:, 0], batch["label"]
        out = self.net(batch["image"], mask)
        # Each modality model's loss is nnU-Net's deep-supervision loss (its full-resolution output and
        # its deep outputs, halving weights summing to 1), as in MAML's nnU-Net setup. Summed with weight
        # 1 per output instead, the twelve deep outputs pulled 14 times the fused loss's gradient.
        m = len(out.aux_logits)
        levels = len(out.deep_logits) // m
        weights = halving_weights(levels + 1)
        terms = {
            "seg_fused": self.w["fused"] * self.seg_loss(out.logits, label),
            "seg_modality": self.w["modality"]
            * weights[0]
            * masked_aux_loss(self.seg_loss, out.aux_logits, label, out.aux_mask),
        }
        if out.deep_logits:  # level-major, coarsest first
            per_output = [weights[levels - i // m] for i in range(len(out.deep_logits))]
            terms["seg_deep"] = self.w["deep"] * deep_supervision_loss(
                self.seg_loss, out.deep_logits, label, per_output
            )
        if not self.in_warmup():
            terms["mutual"] = self.w["mutual"] * modality_mutual_loss(
                out.logits, out.aux_logits, mask, self.temperature
            )
        return terms
