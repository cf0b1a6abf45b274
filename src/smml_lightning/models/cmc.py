"""CMC: cross-modality collaboration (Zhou et al., MICCAI 2024), adapted to four MRI modalities with any
subset missing.

Each modality is a branch: a 3D U-Net encoder (one encoder shared by the modalities by default, as in the
public code; ``shared_encoder=False`` gives each modality its own, as in the paper's figure), a
modality-independent aware (MIA) channel-attention module on the branch's bottleneck, a fusion of the
available branches' MIA features that goes back into every branch, and a decoder (shared) fed the branch's
own skips. The prediction averages the available branches' probabilities.

``encode`` runs everything that depends on one modality alone (encoders and MIA) for all four, so the
15 subsets decode from one ``encode`` (:mod:`smml_lightning.evaluation.inference`). ``decode`` does the
mask-aware fusion and decodes each available branch: the fusion reads the concatenated MIA features with
missing modalities' zeroed, so a missing modality's input changes nothing, and missing branches are
neither combined, decoded nor averaged.

Choices that differ from the public code (``model/Semi_SM_model_MIA.py``), each for a reason:

* The blocks are the package's (:func:`~smml_lightning.models.backbone.conv_norm_act`: instance norm
  and LeakyReLU instead of BatchNorm and ReLU; strided convs instead of max pooling;
  :class:`~smml_lightning.models.backbone.UNetDecoder`), so statistics never mix samples or modalities.
  The depth is the public code's (``num_stages=4``: three downsamplings, a 128^3 patch gives a 16^3
  bottleneck) and ``base_width=64`` gives its widths 64-512.
* The output layer has ``num_classes`` channels (the public decoder's head is fixed at 14).
* The combination of the fusion with a branch's own MIA features is the public code's (concatenate,
  norm, activation, 1x1x1 conv), shared by the branches; the decoder is shared too.
* ``logits`` is the log of the mean of the available branches' softmax probabilities, so that its
  argmax is the averaged prediction and the rest of the package (inference, metrics) reads it as any
  network's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.models.backbone import (
    GroupedEncoder,
    UNetDecoder,
    check_mask,
    conv_norm_act,
    instance_norm,
    mask_modalities,
)
from smml_lightning.models.base import MaskedSegmenter, SegmentationOutput


class MIA(nn.Module):
    """Modality-independent aware module: DANet's channel attention (Fu et al., CVPR 2019).

    For features ``X`` ``(C, N)`` (channels by voxels) of one sample: ``E = X X^T`` (C x C),
    ``A = softmax(rowmax(E) - E)`` over each row, output ``gamma * A X + X`` with ``gamma`` a learnt
    scalar initialised to 0 (so the module starts as the identity). The Gram matrix and the softmax are
    computed in float32 also under autocast: ``E`` sums over all bottleneck voxels, and bf16's three
    significant digits on values in the thousands would make the softmax noise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def attention(x: torch.Tensor) -> torch.Tensor:
        """Channel attention ``(B, C, C)`` of features ``(B, C, *s)``, float32."""
        with torch.autocast(x.device.type, enabled=False):
            flat = x.flatten(2).float()
            energy = torch.bmm(flat, flat.transpose(1, 2))
            return torch.softmax(energy.amax(dim=-1, keepdim=True) - energy, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = torch.bmm(self.attention(x), x.flatten(2).float()).view(x.shape)
        return (self.gamma * attended).to(x.dtype) + x


@dataclass
class CMCFeatures:
    """What :meth:`CMCNet.encode` returns; channels modality-major (``[k * C, (k + 1) * C)`` is modality k).

    Attributes:
        skips: the encoder's stages above the bottleneck, finest first, ``(B, M * w_i, *S / 2^i)``.
        bottleneck: the encoders' bottleneck features ``(B, M * C, *s)`` (what CSC compares).
        mia: the MIA modules' output on them, ``(B, M * C, *s)``.
    """

    skips: list[torch.Tensor]
    bottleneck: torch.Tensor
    mia: torch.Tensor


class CMCNet(MaskedSegmenter):
    """Per-modality branches with MIA attention and mask-aware fusion; the mean of the available
    branches' probabilities predicts.

    ``decode`` in training mode also returns ``aux_logits`` (each branch's logits, canonical modality
    order; zeros for missing branches, which ``aux_mask`` = the availability mask marks as not scored)
    and ``modality_features`` (the encoders' bottlenecks ``(B, M, C, *s)``, for CSC).

    Args:
        in_modalities: number of modalities (branches).
        num_classes: output classes.
        base_width: width of the first stage; stage ``i`` has ``base_width * 2^i`` channels.
        num_stages: encoder stages (the first at full resolution, each further one halves it).
        shared_encoder: one encoder (and MIA) for all modalities (public code) or one per modality
            (paper figure; computed as grouped convolutions).
    """

    def __init__(
        self,
        in_modalities: int = NUM_MODALITIES,
        num_classes: int = NUM_CLASSES,
        base_width: int = 64,
        num_stages: int = 4,
        shared_encoder: bool = True,
    ) -> None:
        super().__init__()
        if num_stages < 2 or base_width < 1 or num_classes < 2:
            raise ValueError(
                f"CMCNet: need num_stages >= 2, base_width >= 1 and num_classes >= 2, got "
                f"{num_stages}, {base_width}, {num_classes}"
            )
        self.in_modalities = in_modalities
        self.num_classes = num_classes
        self.shared_encoder = shared_encoder
        self.downsampling = 2 ** (num_stages - 1)
        widths = [base_width * 2**i for i in range(num_stages)]
        m, c = in_modalities, widths[-1]
        self.encoder = GroupedEncoder(widths, groups=1 if shared_encoder else m)
        self.mia = nn.ModuleList(MIA() for _ in range(1 if shared_encoder else m))
        self.fusion = nn.Sequential(conv_norm_act(m * c, c), conv_norm_act(c, c), nn.Sigmoid())
        self.combine = nn.Sequential(
            instance_norm(2 * c), nn.LeakyReLU(0.2, inplace=True), nn.Conv3d(2 * c, c, kernel_size=1)
        )
        self.decoder = UNetDecoder(widths, num_classes, deep_supervision=False)

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != 5 or image.shape[1] != self.in_modalities:
            raise ValueError(f"image must be (B, {self.in_modalities}, D, H, W), got {tuple(image.shape)}")
        if any(s % self.downsampling for s in image.shape[2:]):
            raise ValueError(
                f"every spatial size must be divisible by {self.downsampling}, got {tuple(image.shape[2:])}"
            )

    def encode(self, image: torch.Tensor) -> CMCFeatures:
        self._check_image(image)
        b, m = image.shape[:2]
        if self.shared_encoder:  # modalities folded into the batch: (B * M, 1, *S)
            stages = [
                f.reshape(b, -1, *f.shape[2:])
                for f in self.encoder(image.reshape(b * m, 1, *image.shape[2:]))
            ]
        else:
            stages = self.encoder(image)
        bottleneck = stages[-1]
        per_modality = bottleneck.unflatten(1, (m, -1))  # (B, M, C, *s)
        if self.shared_encoder:
            mia = self.mia[0](per_modality.flatten(0, 1)).reshape(bottleneck.shape)
        else:
            mia = torch.stack([mod(per_modality[:, k]) for k, mod in enumerate(self.mia)], dim=1).flatten(
                1, 2
            )
        return CMCFeatures(skips=stages[:-1], bottleneck=bottleneck, mia=mia)

    def fuse(self, encoded: CMCFeatures, mask: torch.Tensor) -> torch.Tensor:
        """The fusion layer's output ``(B, C, *s)`` over the available branches' MIA features."""
        return self.fusion(mask_modalities(encoded.mia, mask))

    def decode(self, encoded: CMCFeatures, mask: torch.Tensor) -> SegmentationOutput:
        b, m = encoded.mia.shape[0], self.in_modalities
        mask = check_mask(mask, b, m)
        fused = self.fuse(encoded, mask)
        pairs = mask.flatten().nonzero()[:, 0]  # available (sample, modality) pairs, sample-major
        sample = pairs // m

        def branch(x: torch.Tensor) -> torch.Tensor:  # (B, M * C, *s) -> (P, C, *s), available pairs only
            return x.unflatten(1, (m, -1)).flatten(0, 1)[pairs]

        own = branch(encoded.mia)
        bottom = self.combine(torch.cat([fused[sample], own.to(fused.dtype)], dim=1))
        logits = self.decoder([branch(s) for s in encoded.skips], bottom).logits  # (P, K, *S)

        # log of the mean probability over each sample's available branches, via logsumexp (stable)
        log_probs = torch.full(
            (b * m, *logits.shape[1:]), -math.inf, dtype=torch.float32, device=logits.device
        )
        log_probs = log_probs.index_copy(0, pairs, F.log_softmax(logits.float(), dim=1)).unflatten(0, (b, m))
        count = mask.sum(dim=1).to(torch.float32).log().view(b, *([1] * (logits.ndim - 1)))
        mean_logits = torch.logsumexp(log_probs, dim=1) - count
        if not self.training:
            return SegmentationOutput(logits=mean_logits)
        per_branch = (
            logits.new_zeros(b * m, *logits.shape[1:]).index_copy(0, pairs, logits).unflatten(0, (b, m))
        )
        return SegmentationOutput(
            logits=mean_logits,
            aux_logits=list(per_branch.unbind(1)),
            aux_mask=mask,
            modality_features=encoded.bottleneck.unflatten(1, (m, -1)),
        )
