"""Supervised segmentation losses: CE + soft Dice on the fused, deep-supervision and auxiliary outputs.

All three take integer labels ``(B, 1, *spatial)`` with internal classes 0..C-1 and raw logits
``(B, C, *spatial)``; softmax happens inside.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SegmentationLoss(nn.Module):
    """Cross-entropy plus soft multi-class Dice over softmax probabilities (MONAI's ``DiceLoss``).

    The defaults are chosen for 128^3 BraTS patches where tumor classes are often absent:

    - ``include_background=False``: the background Dice is ~1 on every patch (it covers >95 % of the
      voxels) and only dilutes the tumor terms; cross-entropy still supervises background voxels.
    - ``smooth=1.0`` in numerator and denominator: for a class absent from the batch the Dice term is
      ``1 - 1 / (1 + sum p_c)``, which is 0 when the prediction is empty too and gives a gradient that
      pushes spurious probability mass down. With MONAI's default 1e-5 it would sit at a flat ~1 with
      a vanishing gradient. On present classes (hundreds of voxels or more) a smoothing of 1 is negligible.
    - ``batch=True``: intersections and sums are pooled over the batch before the ratio, so a class
      missing from one sample but present in another yields one proper Dice instead of an absent-class
      term per sample (the nnU-Net "batch Dice" choice for 3D patches).
    - ``class_weighted_ce=False``: every voxel's cross-entropy counts alike. ``True`` is the public
      SMML/mmFormer weighting (``softmax_weighted_loss``): a voxel of class ``c`` in sample ``b`` weighs
      ``1 - (share of class c in sample b)``, so background (~95 % of a patch) weighs ~0.05 and the
      small tumour classes ~1; still averaged over all voxels. (The public code also clamps the
      probability at 0.005 inside the log, which zeroes the gradient of the worst voxels; not done here.)
      Together with ``include_background=True`` this is the public code's segmentation loss, up to the
      Dice smoothing.
    """

    def __init__(
        self,
        include_background: bool = False,
        smooth: float = 1.0,
        batch: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        class_weighted_ce: bool = False,
    ) -> None:
        super().__init__()
        if smooth < 0 or lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(
                f"SegmentationLoss: smooth, lambda_dice and lambda_ce must be >= 0, "
                f"got {smooth}, {lambda_dice}, {lambda_ce}"
            )
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            smooth_nr=smooth,
            smooth_dr=smooth,
            batch=batch,
        )
        # Every constructor argument is kept under its name, so the loss can be recorded and rebuilt.
        self.include_background, self.smooth, self.batch = include_background, smooth, batch
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.class_weighted_ce = class_weighted_ce

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.dim() != logits.dim() or label.shape[1] != 1 or label.shape[2:] != logits.shape[2:]:
            raise ValueError(
                f"SegmentationLoss: label must be (B, 1, *spatial) matching logits {tuple(logits.shape)}, "
                f"got {tuple(label.shape)}"
            )
        label = label.long()
        ce = F.cross_entropy(logits, label[:, 0], reduction="none")  # (B, *spatial)
        if self.class_weighted_ce:
            flat = label.flatten(1)  # (B, N)
            counts = torch.zeros(flat.shape[0], logits.shape[1], device=flat.device).scatter_add_(
                1, flat, torch.ones_like(flat, dtype=torch.float)
            )
            weight = 1.0 - counts / flat.shape[1]  # (B, C): one minus each class's share of the sample
            ce = ce * weight.gather(1, flat).view_as(ce)
        return self.lambda_dice * self.dice(logits, label) + self.lambda_ce * ce.mean()


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of an integer label map ``(B, 1, *S)`` to ``size``.

    ``nearest-exact`` samples at voxel centres (for a factor-2 reduction it keeps voxels 1, 3, 5, ...),
    the same rule as MONAI's ``DeepSupervisionLoss``; labels are never interpolated between classes.
    """
    if tuple(label.shape[2:]) == tuple(size):
        return label
    return F.interpolate(label.float(), size=tuple(size), mode="nearest-exact").long()


def halving_weights(outputs: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``outputs`` outputs, full resolution first: each coarser
    output weighs half the previous one, normalised to sum 1 (so a model's loss keeps the scale of one
    segmentation loss however many outputs it supervises)."""
    if outputs < 1:
        raise ValueError(f"halving_weights: need at least one output, got {outputs}")
    raw = [0.5**i for i in range(outputs)]
    return [w / sum(raw) for w in raw]


def deep_supervision_loss(
    loss_fn: LossFn,
    logits_list: Sequence[torch.Tensor],
    label: torch.Tensor,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` over deep-supervision outputs, each against the label resampled to
    its grid.

    By default a plain sum, as the public SMML and mmFormer code (``prm_loss``): each output weighs as
    much as the fused prediction's loss, so the decoder's coarse stages are trained as hard as in the
    paper. ``weights`` (one per output) gives other schemes, e.g. nnU-Net's :func:`halving_weights`.
    """
    if len(logits_list) == 0:
        raise ValueError("deep_supervision_loss: logits_list is empty (the network returned no deep outputs)")
    if weights is not None and len(weights) != len(logits_list):
        raise ValueError(f"deep_supervision_loss: {len(weights)} weights for {len(logits_list)} outputs")
    losses = torch.stack([loss_fn(logits, resize_label(label, logits.shape[2:])) for logits in logits_list])
    return losses.sum() if weights is None else (losses * losses.new_tensor(list(weights))).sum()


def masked_aux_loss(
    loss_fn: LossFn, aux_logits: Sequence[torch.Tensor], label: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sum over modalities of each auxiliary output's loss on the samples where it is scored.

    Modality ``m``'s loss is taken over the samples with ``mask[:, m]`` (one batch Dice, like the fused
    loss) and weighted by their fraction of the batch, so a modality scored on every sample weighs as
    much as the fused loss: with all four scored this is the public code's sum of four per-modality losses
    (mmFormer's ``sep_loss``). An output for a sample where its modality is not scored enters neither the
    value nor the gradient. With nothing scored the result is a zero that still depends on the logits
    (so ``backward`` works everywhere).
    """
    if not aux_logits or mask.dim() != 2 or mask.shape[1] != len(aux_logits):
        raise ValueError(
            f"masked_aux_loss: mask must be (B, {len(aux_logits)}) for {len(aux_logits)} auxiliary outputs, "
            f"got {tuple(mask.shape)}"
        )
    batch = mask.shape[0]
    losses = []
    for m, logits in enumerate(aux_logits):
        keep = mask[:, m].nonzero()[:, 0]
        if len(keep):
            losses.append(loss_fn(logits[keep], label[keep]) * (len(keep) / batch))
    if not losses:
        return torch.stack([logits.sum() for logits in aux_logits]).sum() * 0.0
    return torch.stack(losses).sum()
