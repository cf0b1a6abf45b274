"""Plain 3D U-Net baseline with input-level modality dropout.

The simplest way to cope with missing modalities: zero the missing input channels and let one network
learn from whatever is left. ``encode`` is the identity (nothing per-modality to precompute), so
``decode`` does all the work under the mask.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.models.backbone import check_image, check_mask, mask_modalities, use_group_instance_norms
from smml_lightning.models.base import MaskedSegmenter, SegmentationOutput


class UNetBaseline(MaskedSegmenter):
    """MONAI ``BasicUNet`` (4 downsamplings, instance norm, LeakyReLU) on the masked image.

    ``base_width`` sets features ``(w, w, 2w, 4w, 8w, w)``; 16 gives about the parameter count of the
    default :class:`~smml_lightning.models.backbone.MMFormer` encoders.
    """

    def __init__(
        self, in_modalities: int = NUM_MODALITIES, num_classes: int = NUM_CLASSES, base_width: int = 16
    ) -> None:
        super().__init__()
        self.in_modalities = in_modalities
        w = base_width
        self.net = use_group_instance_norms(
            BasicUNet(
                spatial_dims=3,
                in_channels=in_modalities,
                out_channels=num_classes,
                features=(w, w, 2 * w, 4 * w, 8 * w, w),
            )
        )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        check_image(image, self.in_modalities)
        return image

    def decode(self, encoded: torch.Tensor, mask: torch.Tensor) -> SegmentationOutput:
        mask = check_mask(mask, encoded.shape[0], self.in_modalities)
        return SegmentationOutput(logits=self.net(mask_modalities(encoded, mask)))
