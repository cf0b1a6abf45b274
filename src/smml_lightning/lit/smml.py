"""SMML: Semantic-guided Masked Mutual Learning (Liang et al., AAAI 2025) as one LightningModule.

Two peer branches of the same network see the same patch under two different modality masks
(``batch["masks"][:, 0]`` and ``[:, 1]``). Per branch: segmentation losses on the fused, auxiliary and
deep-supervision outputs, and a semantic refiner fed the SAM priors. Between branches: the
Hierarchical Consistency Constraints (pixel level and feature level). At inference both branches'
logits are averaged; the refiners and priors are training-time only.

Loss terms (logged as ``train/<name>``), each in :mod:`smml_lightning.losses`:

=================== ==================================================== =====================
name                paper term                                           function
=================== ==================================================== =====================
``seg_fused``       fused segmentation (CE + Dice)                       ``SegmentationLoss``
``seg_aux``         modality-specific auxiliary decoder, every modality  ``masked_aux_loss``
``seg_deep``        deep supervision                                     ``deep_supervision_loss``
``seg_refine``      semantic-guided refinement (CE + Dice)               ``SegmentationLoss``
``prior_consist``   refined teaches fused on its reliable voxels (KL)    ``prior_consistency``
``hcc_pixel``       HCC pixel level: reliable-voxel KL, both directions  ``bidirectional_pixel_consistency``
``hcc_sample``      HCC feature level: inter-sample relations            ``inter_sample_relation``
``hcc_class``       HCC feature level: inter-class relations             ``inter_class_relation``
=================== ==================================================== =====================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from ..losses.hcc import bidirectional_pixel_consistency, inter_class_relation, inter_sample_relation
from ..losses.prior import prior_consistency
from ..losses.segmentation import deep_supervision_loss, masked_aux_loss
from ..models.backbone import MMFormer
from ..models.base import MaskedSegmenter, SegmentationOutput
from ..models.peers import FusedPeers
from ..models.refine import SemanticRefiner
from .base import MissingModalityModule, check_weights


class SMML(MissingModalityModule):
    """Dual-branch SMML.

    Args:
        network: builds one branch (called twice, so the peers start from different weights).
        refiner: builds one semantic refiner per branch; ``None`` disables the SAM-prior refinement
            (ablation "w/o prior": then the data need no priors).
        w_fused, w_aux, w_deep, w_refine, w_prior, w_pixel, w_sample, w_class: loss weights (1 in the paper).
        temperature: softening of the KL terms.
        warmup_epochs: epochs before the pixel-level HCC and prior-consistency terms switch on (100 of
            1000 in the public code). Feature-level HCC is on from the start.
        share_mask: ablation: both branches use the first mask (``masks[:, 0]``).
        sample_relation_across_ranks: under DDP, relate the samples of the global batch (all ranks')
            in the inter-sample HCC, not only this rank's: with SMML's one volume per GPU a rank alone
            has no pair of samples to relate and the term would be zero. No effect in one process.
        fuse_peers: run the two branches' convolutional layers as one grouped kernel each in training
            (:class:`~smml_lightning.models.peers.FusedPeers`): the same losses and gradients to float
            rounding. Needs MMFormer branches.
        inference_branches: the peers whose logits are averaged by ``validate``, ``test`` and
            ``predict``: both (default, the method) or one, ``[0]`` or ``[1]``, to score a peer alone
            (separates what averaging two networks gives from what mutual learning gives each one).
        **kwargs: see :class:`MissingModalityModule`.
    """

    n_masks = 2

    def __init__(
        self,
        network: Callable[[], MaskedSegmenter] | None = None,
        refiner: Callable[[], torch.nn.Module] | None = None,
        use_prior: bool = True,
        w_fused: float = 1.0,
        w_aux: float = 1.0,
        w_deep: float = 1.0,
        w_refine: float = 1.0,
        w_prior: float = 1.0,
        w_pixel: float = 1.0,
        w_sample: float = 1.0,
        w_class: float = 1.0,
        temperature: float = 1.0,
        warmup_epochs: int = 100,
        share_mask: bool = False,
        sample_relation_across_ranks: bool = True,
        inference_branches: list[int] | None = None,
        fuse_peers: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(
            w_fused=w_fused,
            w_aux=w_aux,
            w_deep=w_deep,
            w_refine=w_refine,
            w_prior=w_prior,
            w_pixel=w_pixel,
            w_sample=w_sample,
            w_class=w_class,
        )
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        branches = [0, 1] if inference_branches is None else list(inference_branches)
        if not branches or len(set(branches)) != len(branches) or not set(branches) <= {0, 1}:
            raise ValueError(f"model.inference_branches must be [0], [1] or [0, 1], got {inference_branches}")
        build = network or MMFormer
        self.branches = torch.nn.ModuleList([build(), build()])
        make_refiner = refiner or SemanticRefiner
        self.use_prior = use_prior
        self.refiners = torch.nn.ModuleList([make_refiner(), make_refiner()]) if use_prior else None
        self.w = dict(
            fused=w_fused,
            aux=w_aux,
            deep=w_deep,
            refine=w_refine,
            prior=w_prior,
            pixel=w_pixel,
            sample=w_sample,
            cls=w_class,
        )
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.share_mask = share_mask
        self.sample_relation_across_ranks = sample_relation_across_ranks
        self.inference_branches = branches
        self.fused_peers = FusedPeers(cast(MMFormer, self.branches[0])) if fuse_peers else None

    def inference_models(self) -> list[MaskedSegmenter]:
        return [cast(MaskedSegmenter, self.branches[k]) for k in self.inference_branches]

    def _branch_terms(
        self, k: int, out: SegmentationOutput, batch: dict[str, Any], mask: torch.Tensor, warm: bool
    ) -> dict[str, torch.Tensor]:
        if out.aux_mask is None:
            raise ValueError(
                f"SMML needs a network with an auxiliary decoder; {type(self.branches[k]).__name__} "
                "returned no auxiliary outputs"
            )
        label = batch["label"]
        terms = {
            "seg_fused": self.w["fused"] * self.seg_loss(out.logits, label),
            "seg_aux": self.w["aux"] * masked_aux_loss(self.seg_loss, out.aux_logits, label, out.aux_mask),
            "seg_deep": self.w["deep"] * deep_supervision_loss(self.seg_loss, out.deep_logits, label),
        }
        if self.refiners is not None:
            if "prior" not in batch:
                raise KeyError(
                    "SMML with use_prior=true needs priors in the batch: set data.use_prior=true "
                    "and run `smml priors` (or set model.init_args.use_prior=false)"
                )
            prior = batch["prior"].to(out.logits.dtype)
            refined = self.refiners[k](prior, mask, out.logits.detach(), label)
            terms["seg_refine"] = self.w["refine"] * self.seg_loss(refined, label)
            if warm:
                terms["prior_consist"] = self.w["prior"] * prior_consistency(
                    out.logits, refined, label, self.temperature
                )
        return terms

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        masks = batch["masks"]
        if masks.shape[1] < 2 and not self.share_mask:
            raise ValueError("SMML needs two masks per sample: set data.n_masks=2 (or model.share_mask=true)")
        branch_masks = [masks[:, 0], masks[:, 0] if self.share_mask else masks[:, 1]]
        warm = not self.in_warmup()
        outs: list[Any]  # as the plain path's nn.Module calls
        if self.fused_peers is not None:
            outs = cast(
                list[Any],
                self.fused_peers(cast(list[MMFormer], list(self.branches)), batch["image"], branch_masks),
            )
        else:
            outs = [branch(batch["image"], m) for branch, m in zip(self.branches, branch_masks)]
        terms: dict[str, torch.Tensor] = {}
        for k, (out, m) in enumerate(zip(outs, branch_masks)):
            for name, value in self._branch_terms(k, out, batch, m, warm).items():
                terms[name] = terms.get(name, 0) + value
        label = batch["label"]
        feat_a, feat_b = outs[0].bottleneck, outs[1].bottleneck
        if self.w["sample"] > 0:
            terms["hcc_sample"] = self.w["sample"] * inter_sample_relation(
                feat_a, feat_b, self.sample_relation_across_ranks
            )
        if self.w["cls"] > 0:
            terms["hcc_class"] = self.w["cls"] * inter_class_relation(feat_a, feat_b, label)
        if warm and self.w["pixel"] > 0:
            terms["hcc_pixel"] = self.w["pixel"] * bidirectional_pixel_consistency(
                outs[0].logits, outs[1].logits, label, self.temperature
            )
        return terms
