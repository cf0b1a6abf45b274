"""MAML: Modality-aware Mutual Learning (Zhang et al., MICCAI 2021).

One 3D U-Net per modality, each with deep supervision, fused by a modality-aware (MA) module. The four
U-Nets share the backbone's building blocks and run as one stack of grouped convolutions
(``groups=4``), which is four independent networks computed in one kernel launch per layer.

MA fusion (``decode``), as in the public MAML code: a fused feature is a conv over the concatenated
features of the available modalities (missing ones zeroed); each modality's MA module (conv, norm,
activation, conv, sigmoid, over its features concatenated with the fused feature) gives voxel- and
channel-wise gates in (0, 1), zero for missing modalities; the gated modality features are summed and a
1x1x1 conv turns the sum into the fused logits. (A softmax over the modalities of one score per voxel
let the shared head lean on one network's features; docs/quality-history.md has the measurement.)

With a single available modality there is nothing to fuse and, as in the paper, that modality's own
model predicts: the output is its ``aux_logits[k]``, not the fusion head read on one network's features
(the head is shared by the four networks and only learns to read their gated mix; read on
one network alone it lost every ET voxel at the quality benchmark's budget).

Outputs in training mode: ``logits`` fused; ``aux_logits`` the 4 modality-specific predictions in
canonical order; ``deep_logits`` the modality U-Nets' deep-supervision outputs, level-major and
coarsest first: ``[flair@1/8, t1ce@1/8, t1@1/8, t2@1/8, flair@1/4, ..., t2@1/2]``; ``aux_mask`` all
true. Each modality model only sees its own modality's image, which is always present in training
patches, so every output of every modality model is supervised on every sample, as the public MAML
code does (each modality model's deep-supervision series, every sample); the availability mask
simulates missing modalities for the fusion and the mutual term only. The fused path has no deep
supervision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.models.backbone import (
    GroupedEncoder,
    UNetDecoder,
    check_image,
    check_mask,
    conv_norm_act,
    group_cat,
    mask_modalities,
    stage_widths,
)
from smml_lightning.models.base import MaskedSegmenter, SegmentationOutput


@dataclass
class MAMLFeatures:
    """What ``MAML.encode`` returns; every tensor has modality-major channels.

    Attributes:
        features: last decoder level of each modality's U-Net, ``(B, M * w, *S)``.
        logits: each modality model's prediction, ``(B, M * C, *S)``.
        deep_logits: each modality model's deep outputs ``(B, M * C, *s)``, coarsest first (training only).
    """

    features: torch.Tensor
    logits: torch.Tensor
    deep_logits: list[torch.Tensor]


class MAML(MaskedSegmenter):
    """Modality-specific U-Nets (grouped) with modality-aware attention fusion.

    ``base_width`` defaults to 16, the paper's: its public trainer builds the modality models with half of
    nnU-Net's 32 base features. Much narrower (4) modality models lost the tumour core on some subsets
    (docs/quality-history.md).
    """

    def __init__(
        self, in_modalities: int = NUM_MODALITIES, num_classes: int = NUM_CLASSES, base_width: int = 16
    ) -> None:
        super().__init__()
        self.in_modalities = in_modalities
        self.num_classes = num_classes
        self.width = base_width
        widths = stage_widths(base_width)
        m, w = in_modalities, base_width
        self.encoder = GroupedEncoder(widths, groups=m)
        self.decoder = UNetDecoder(widths, num_classes, groups=m, deep_supervision=True)
        self.fuse = conv_norm_act(m * w, w)
        self.gate = nn.Sequential(  # the M modality-aware modules as one grouped stack
            conv_norm_act(m * 2 * w, m * w, groups=m),
            nn.Conv3d(m * w, m * w, 3, padding=1, groups=m),
            nn.Sigmoid(),
        )
        self.head = nn.Conv3d(w, num_classes, 1)

    def encode(self, image: torch.Tensor) -> MAMLFeatures:
        check_image(image, self.in_modalities)
        features = self.encoder(image)
        out = self.decoder(features[:-1], features[-1], deep=self.training)
        return MAMLFeatures(features=out.features, logits=out.logits, deep_logits=out.deep_logits)

    def _attend(self, encoded: MAMLFeatures, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``(B, M, w, *S)`` (zero on missing modalities) and the gated feature sum ``(B, w, *S)``."""
        feats = encoded.features
        m = self.in_modalities
        mask = check_mask(mask, feats.shape[0], m)
        masked = mask_modalities(feats, mask)
        fused = self.fuse(masked)
        paired = group_cat(masked, fused.repeat(1, m, *([1] * (fused.ndim - 2))), m)
        gates = self.gate(paired).unflatten(1, (m, -1))
        gates = gates * mask.to(gates.dtype).view(*mask.shape, *([1] * (gates.ndim - 2)))
        return gates, (gates * masked.unflatten(1, (m, -1))).sum(dim=1)

    def attention(self, encoded: MAMLFeatures, mask: torch.Tensor) -> torch.Tensor:
        """The MA modules' gates ``(B, M, w, *S)``: in (0, 1) for available modalities, 0 for missing ones."""
        return self._attend(encoded, mask)[0]

    def decode(self, encoded: MAMLFeatures, mask: torch.Tensor) -> SegmentationOutput:
        fused = self.head(self._attend(encoded, mask)[1])
        m = self.in_modalities
        mask = mask.bool()
        single = mask.sum(dim=1) == 1
        first = mask.int().argmax(dim=1)  # the only available modality where ``single``
        per_modality = encoded.logits.unflatten(1, (m, -1))  # (B, M, C, *S)
        own = per_modality[torch.arange(mask.shape[0], device=mask.device), first]
        logits = torch.where(single.view(-1, *([1] * (fused.ndim - 1))), own.to(fused.dtype), fused)
        if not self.training:
            return SegmentationOutput(logits=logits)
        deep = [x for level in encoded.deep_logits for x in level.unflatten(1, (m, -1)).unbind(1)]
        return SegmentationOutput(
            logits=logits,
            aux_logits=list(per_modality.unbind(1)),
            deep_logits=deep,
            aux_mask=torch.ones_like(mask),  # every modality model is supervised on every sample
        )
