"""SMML's semantic-prior refinement: reweighted SAM priors plus the fused logits -> refined logits.

Priors are per-modality class-probability volumes ``(B, M, C, *S)`` computed offline by the SAM prior
model. Each branch reweights them (per sample, modality and class), zeroes the missing modalities,
and a small 3D U-Net refines the branch's fused prediction from them. Training-time only: inference
uses the fused decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.models.backbone import check_mask, use_group_instance_norms


class LabelGuidedPriorWeighting(nn.Module):
    """The public SMML code's prior weighting (``sam_weight_fuse``): a weight per sample, modality and class.

    For class ``c`` and modality ``m`` the input is how much probability the prior puts on ``c`` over the
    patch relative to how much of the patch truly is ``c`` (mean prior / (mean one-hot label + 1e-7)),
    next to that true share; a small MLP per class (1x1x1 convs 5 -> 64 -> 128 -> 64 -> M, LeakyReLU)
    and a sigmoid turn it into the modalities' weights. It reads the ground truth, which the refiner may
    (it is training-only): a prior that claims a class the patch lacks, e.g. enhancement from FLAIR on a
    tumour without it, can be turned down for that sample. Missing modalities are zeroed.
    """

    def __init__(
        self, num_modalities: int = NUM_MODALITIES, num_classes: int = NUM_CLASSES, eps: float = 1e-7
    ) -> None:
        super().__init__()
        self.num_modalities, self.num_classes, self.eps = num_modalities, num_classes, eps
        m = num_modalities
        self.mlps = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(m + 1, 64, 1),
                nn.LeakyReLU(0.2),
                nn.Conv3d(64, 128, 1),
                nn.LeakyReLU(0.2),
                nn.Conv3d(128, 64, 1),
                nn.LeakyReLU(0.2),
                nn.Conv3d(64, m, 1),
            )
            for _ in range(num_classes)
        )

    def weights(self, prior: torch.Tensor, mask: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Weights ``(B, M, C)`` in (0, 1), computed in float32 (the ratio reaches 1e7 on absent classes)."""
        b, m, c = prior.shape[:3]
        masked = prior.float() * mask.float().view(b, m, 1, *([1] * (prior.ndim - 3)))
        share = F.one_hot(label[:, 0].long(), c).float().flatten(1, -2).mean(dim=1) + self.eps  # (B, C)
        ratio = masked.flatten(3).mean(dim=3) / share[:, None, :]  # (B, M, C)
        with torch.autocast(prior.device.type, enabled=False):
            logits = [
                mlp(torch.cat([ratio[:, :, k], share[:, k : k + 1]], dim=1).view(b, m + 1, 1, 1, 1))
                for k, mlp in enumerate(self.mlps)
            ]
        return torch.sigmoid(torch.stack(logits, dim=2).view(b, m, c))

    def forward(self, prior: torch.Tensor, mask: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        m, c = self.num_modalities, self.num_classes
        if prior.ndim < 3 or prior.shape[1:3] != (m, c):
            raise ValueError(f"prior must be (B, {m}, {c}, *spatial), got {tuple(prior.shape)}")
        if label is None:
            raise ValueError("the label-guided prior weighting needs the label")
        if label.shape != (prior.shape[0], 1, *prior.shape[3:]):
            raise ValueError(f"label must be (B, 1, *spatial of prior), got {tuple(label.shape)}")
        mask = check_mask(mask, prior.shape[0], m)
        weight = self.weights(prior, mask, label) * mask.float()[:, :, None]
        return prior * weight.to(prior.dtype).view(*weight.shape, *([1] * (prior.ndim - 3)))


class SemanticRefiner(nn.Module):
    """Reweighted priors (flattened to ``M * C`` channels) + fused logits -> refined logits ``(B, C, *S)``.

    A MONAI ``UNet`` with ``depth`` levels of widths ``width * 2^i`` (spatial sizes must be divisible by
    ``2^(depth-1)``). The caller passes the fused logits *detached*: the refinement loss should train
    the refiner and the reweighting, not pull the segmentation network towards the priors (that is the
    prior-consistency KL's job).

    The refiner is residual: it predicts a correction added to the fused logits, through a head whose
    weights start at zero. So at initialisation the refined prediction *is* the fused one, and the
    prior-consistency KL (refined teaches fused) only ever passes on what the refiner has learnt to
    improve, never the output of a freshly initialised network.

    The priors are weighted by the public code's per-sample weighting from the priors and the ground
    truth (:class:`LabelGuidedPriorWeighting`), so ``forward`` needs ``label``.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        num_modalities: int = NUM_MODALITIES,
        width: int = 8,
        depth: int = 3,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"SemanticRefiner depth must be >= 2 (one downsampling at least), got {depth}")
        self.num_classes = num_classes
        self.reweight = LabelGuidedPriorWeighting(num_modalities, num_classes)
        self.unet = use_group_instance_norms(
            UNet(
                spatial_dims=3,
                in_channels=(num_modalities + 1) * num_classes,
                out_channels=width,
                channels=tuple(width * 2**i for i in range(depth)),
                strides=(2,) * (depth - 1),
                num_res_units=1,
                act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
                norm=("instance", {"affine": True}),
            )
        )
        head = nn.Conv3d(width, num_classes, 1)
        for parameter in head.parameters():
            nn.init.zeros_(parameter)
        self.correction = nn.Sequential(nn.LeakyReLU(0.2), head)

    def forward(
        self,
        prior: torch.Tensor,
        mask: torch.Tensor,
        fused_logits: torch.Tensor,
        label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if fused_logits.shape[1] != self.num_classes or fused_logits.shape[2:] != prior.shape[3:]:
            raise ValueError(
                f"fused_logits must be (B, {self.num_classes}, *spatial of prior {tuple(prior.shape[3:])}), "
                f"got {tuple(fused_logits.shape)}"
            )
        priors = self.reweight(prior, mask, label).flatten(1, 2)
        fused_logits = fused_logits.to(priors.dtype)
        return fused_logits + self.correction(self.unet(torch.cat([priors, fused_logits], dim=1)))
