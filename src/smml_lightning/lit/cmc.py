"""CMC: Robust Semi-supervised Multimodal Segmentation via Cross Modality Collaboration (Zhou et al.,
MICCAI 2024) as one LightningModule.

One network (:class:`~smml_lightning.models.cmc.CMCNet`), one modality mask per sample. Every available
branch is supervised on the labeled samples of a batch; after a supervised warm-up, the branches of the
unlabeled samples are made to agree: their bottleneck channels (CSC) and their predictions (CAC). Labeled
and unlabeled samples go through one forward pass, so both unsupervised terms train the network.

Loss terms (logged as ``train/<name>``), each in :mod:`smml_lightning.losses`:

========= ================================================================ ===========================
name      paper term                                                       function
========= ================================================================ ===========================
``seg``   supervised Dice + CE, mean over the available branches           ``masked_aux_loss``
``csc``   channel-wise semantic consistency (NT-Xent), sigmoid ramp-up      ``csc_loss``
``cac``   cross-modality agreement (1 - soft Dice), cosine ramp-down        ``cac_loss``
========= ================================================================ ===========================

Fixes to the public code (``trainer.py``): its unlabeled forward runs under ``torch.no_grad()`` and
``model.eval()``, so CSC and CAC pass no gradient and training is supervised only; here the unlabeled
samples share the training forward. CAC is a loss on probabilities (see :mod:`smml_lightning.losses.cmc`).
The schedules are the public code's: both ramps run over ``ramp_epochs`` counted from epoch 0 (the whole
run by default), so at its switch-on (epoch 350 of 500) CSC starts at weight 0.64 and CAC at 0.21.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..losses.cmc import cac_loss, csc_loss
from ..losses.schedules import after_warmup, cosine_rampdown, sigmoid_rampup
from ..losses.segmentation import masked_aux_loss
from ..models.base import MaskedSegmenter
from ..models.cmc import CMCNet
from .base import MissingModalityModule, check_weights


class CMC(MissingModalityModule):
    """CMC with per-modality branches and any subset of modalities missing.

    Training batches may carry ``labeled`` (bool ``(B,)``; absent = every sample labeled). Labels of
    unlabeled samples are never read.

    Args:
        network: builds the network (default: :class:`CMCNet` with its defaults).
        w_seg, w_csc, w_cac: weights of the supervised, CSC and CAC terms (1 in the public code).
        temperature: NT-Xent temperature of CSC (0.5 in the public code).
        warmup_epochs: supervised epochs before CSC and CAC switch on (350 of 500 in the public code).
        ramp_epochs: length of both ramps, counted from epoch 0 (``None``: the run's ``max_epochs``, as
            in the public code).
        cac_include_background: CAC's Dice includes the background class (the public code's).
        consistency_on_labeled: also apply CSC and CAC to labeled samples (off: unlabeled only, as in
            the public code; with no unlabeled cases CMC is then supervised only).
        **kwargs: see :class:`MissingModalityModule`.
    """

    n_masks = 1
    uses_unlabeled = True

    def __init__(
        self,
        network: Callable[[], MaskedSegmenter] | None = None,
        w_seg: float = 1.0,
        w_csc: float = 1.0,
        w_cac: float = 1.0,
        temperature: float = 0.5,
        warmup_epochs: int = 350,
        ramp_epochs: int | None = None,
        cac_include_background: bool = True,
        consistency_on_labeled: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_weights(w_seg=w_seg, w_csc=w_csc, w_cac=w_cac)
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if warmup_epochs < 0 or (ramp_epochs is not None and ramp_epochs < 0):
            raise ValueError(
                f"model.warmup_epochs and model.ramp_epochs must be >= 0, got {warmup_epochs}, {ramp_epochs}"
            )
        self.net = (network or CMCNet)()
        self.w = {"seg": w_seg, "csc": w_csc, "cac": w_cac}
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs
        self.ramp_epochs = ramp_epochs
        self.cac_include_background = cac_include_background
        self.consistency_on_labeled = consistency_on_labeled

    def inference_models(self) -> list[MaskedSegmenter]:
        return [self.net]

    def ramp_length(self) -> int:
        """``ramp_epochs``; when it is ``None``, the run's length in epochs: the trainer's ``max_epochs``, or
        for a run bounded by ``max_steps`` alone, the epochs those steps take."""
        if self.ramp_epochs is not None:
            return self.ramp_epochs
        trainer = self._trainer
        if trainer is not None and trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return int(trainer.max_epochs)
        if trainer is not None and trainer.max_steps > 0 and 0 < trainer.num_training_batches < math.inf:
            per_epoch = trainer.num_training_batches / trainer.accumulate_grad_batches
            return max(1, math.ceil(trainer.max_steps / per_epoch))
        raise ValueError(
            "CMC: set model.ramp_epochs (the trainer has no max_epochs or max_steps to ramp over)"
        )

    def consistency_weights(self, epoch: int) -> tuple[float, float]:
        """Schedule factors ``(csc, cac)`` at ``epoch`` (0 during the warm-up), before ``w_csc``/``w_cac``."""
        on = after_warmup(epoch, self.warmup_epochs)
        length = self.ramp_length()
        return on * sigmoid_rampup(epoch, length), on * cosine_rampdown(epoch, length)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image, mask = batch["image"], batch["masks"][:, 0]
        labeled = batch.get("labeled")
        labeled = (
            torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
            if labeled is None
            else labeled.bool()
        )
        out = self.net(image, mask)
        aux_mask = out.aux_mask if out.aux_mask is not None else mask
        terms: dict[str, torch.Tensor] = {}
        lab = labeled.nonzero()[:, 0]
        if len(lab):
            sup = masked_aux_loss(
                self.seg_loss, [a[lab] for a in out.aux_logits], batch["label"][lab], aux_mask[lab]
            )
            # masked_aux_loss sums the branches' losses; divided by the mean number of available branches
            # it is their mean (the public code averages its two modalities' losses)
            terms["seg"] = self.w["seg"] * sup * len(lab) / aux_mask[lab].sum()
        else:
            terms["seg"] = torch.stack([a.sum() for a in out.aux_logits]).sum() * 0.0
        w_csc, w_cac = self.consistency_weights(self.current_epoch)
        if w_csc or w_cac:
            chosen = torch.ones_like(labeled) if self.consistency_on_labeled else ~labeled
            idx = chosen.nonzero()[:, 0]
            if out.modality_features is None:
                raise ValueError(
                    f"{type(self.net).__name__} returns no modality_features: CMC needs a CMCNet"
                )
            terms["csc"] = (
                self.w["csc"] * w_csc * csc_loss(out.modality_features[idx], aux_mask[idx], self.temperature)
            )
            branch_logits = torch.stack(out.aux_logits, dim=1)[idx]
            terms["cac"] = (
                self.w["cac"]
                * w_cac
                * cac_loss(branch_logits, aux_mask[idx], include_background=self.cac_include_background)
            )
        return terms
