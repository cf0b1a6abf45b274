"""Training augmentation, as torchio transforms over a subject of ``image``, ``label`` and ``prior``.

The recipe follows the methods (RFNet, mmFormer, SMML): flips on the three axes, a rotation of up to
10 degrees, and a per-channel intensity scale (0.9-1.1) and shift (+-0.1). Geometric transforms act on
every image of the subject (so priors stay aligned with the image and the label); the intensity
transform touches only the keys it is given (the MRI image, never the priors or the label).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform


class RandomChannelScaleShift(RandomTransform, IntensityTransform):
    """``x * s_c + t_c`` with ``s_c`` and ``t_c`` drawn per channel.

    torchio's own intensity transforms draw one parameter per image, but the methods scale and shift
    each modality independently, so this draws one pair per channel. Randomness comes from torch's
    RNG, which the DataLoader seeds per worker.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.9, 1.1),
        shift: tuple[float, float] = (-0.1, 0.1),
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.scale_range = self._parse_range(scale, "scale", min_constraint=0)
        self.shift_range = self._parse_range(shift, "shift")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            data = image.data.float()
            view = (data.shape[0],) + (1,) * (data.dim() - 1)
            scale = torch.empty(view).uniform_(*self.scale_range)
            shift = torch.empty(view).uniform_(*self.shift_range)
            image.set_data(data * scale + shift)
        return subject


class CompactDtypes(tio.Transform):
    """Store label maps as uint8 and the named images as float16 once augmentation is done.

    Resampling turns everything into float32; patches then wait in the queue, where a 16-channel
    prior in float32 would dominate memory. Casting back costs nothing measurable and halves it.
    """

    def __init__(self, half_keys: Sequence[str] = ("prior",), **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.half_keys = tuple(half_keys)
        self.args_names = ["half_keys"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for name, image in subject.get_images_dict(intensity_only=False).items():
            if isinstance(image, tio.LabelMap):
                image.set_data(image.data.round().to(torch.uint8))
            elif name in self.half_keys:
                image.set_data(image.data.to(torch.float16))
        return subject


def train_transforms(
    augment: bool,
    intensity_keys: Sequence[str] = ("image",),
    half_keys: Sequence[str] = ("prior",),
    flip_axes: Sequence[int] = (0, 1, 2),
    degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shift: float = 0.1,
) -> tio.Compose:
    """The augmentation applied to a whole case before patches are drawn from it.

    Rotating the whole case (rather than a patch) keeps the padded corners out of most patches.
    Padding is 0, the background value of the z-scored cache, for images and priors alike, and
    labels are resampled with nearest-neighbour interpolation. The last step (the only one when
    ``augment=False``) is :class:`CompactDtypes`.
    """
    steps: list[tio.Transform] = []
    if augment and flip_axes:
        steps.append(tio.RandomFlip(axes=tuple(flip_axes), flip_probability=0.5))
    if augment and degrees > 0:
        steps.append(
            tio.RandomAffine(
                scales=0,
                degrees=degrees,
                translation=0,
                default_pad_value=0,
                image_interpolation="linear",
                label_interpolation="nearest",
            )
        )
    if augment and intensity_keys and (tuple(scale) != (1.0, 1.0) or shift > 0):
        steps.append(RandomChannelScaleShift(scale=scale, shift=(-shift, shift), include=list(intensity_keys)))
    steps.append(CompactDtypes(half_keys))
    return tio.Compose(steps)
