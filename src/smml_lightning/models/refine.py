"""SMML's semantic-prior refinement: reweighted SAM priors plus the fused logits -> refined logits.

Priors are per-modality class-probability volumes ``(B, M, C, *S)`` computed offline by the SAM prior
model. Each branch reweights them with learnt per-(modality, class) weights, zeroes the missing
modalities, and a small 3D U-Net refines the branch's fused prediction from them. Training-time only:
inference uses the fused decoder.
"""

from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.models.backbone import check_mask, use_group_instance_norms


class PriorReweighting(nn.Module):
    """Learnt weight per (modality, class) on the prior maps; missing modalities are zeroed.

    Weights start at 1 (priors taken as they are) and learn how far each modality's prior can be
    trusted for each class, e.g. T1ce for enhancing tumor.
    """

    def __init__(self, num_modalities: int = NUM_MODALITIES, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_modalities, num_classes))

    def forward(self, prior: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m, c = self.weight.shape
        if prior.ndim < 3 or prior.shape[1:3] != (m, c):
            raise ValueError(f"prior must be (B, {m}, {c}, *spatial), got {tuple(prior.shape)}")
        mask = check_mask(mask, prior.shape[0], m)
        spatial = [1] * (prior.ndim - 3)
        weight = self.weight.to(prior.dtype).view(1, m, c, *spatial)
        return prior * weight * mask.to(prior.dtype).view(*mask.shape, 1, *spatial)


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
        self.reweight = PriorReweighting(num_modalities, num_classes)
        self.unet = use_group_instance_norms(UNet(
            spatial_dims=3,
            in_channels=(num_modalities + 1) * num_classes,
            out_channels=width,
            channels=tuple(width * 2**i for i in range(depth)),
            strides=(2,) * (depth - 1),
            num_res_units=1,
            act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
            norm=("instance", {"affine": True}),
        ))
        self.correction = nn.Sequential(nn.LeakyReLU(0.2), nn.Conv3d(width, num_classes, 1))
        nn.init.zeros_(self.correction[1].weight)
        nn.init.zeros_(self.correction[1].bias)

    def forward(self, prior: torch.Tensor, mask: torch.Tensor, fused_logits: torch.Tensor) -> torch.Tensor:
        if fused_logits.shape[1] != self.num_classes or fused_logits.shape[2:] != prior.shape[3:]:
            raise ValueError(
                f"fused_logits must be (B, {self.num_classes}, *spatial of prior {tuple(prior.shape[3:])}), "
                f"got {tuple(fused_logits.shape)}"
            )
        priors = self.reweight(prior, mask).flatten(1, 2)
        fused_logits = fused_logits.to(priors.dtype)
        return fused_logits + self.correction(self.unet(torch.cat([priors, fused_logits], dim=1)))
