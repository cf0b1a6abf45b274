import itertools

import numpy as np
import pytest
import torch
import torchio as tio

from smml_lightning.data.transforms import RandomChannelScaleShift, train_transforms


def _subject(shape=(12, 10, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(4, *shape, generator=g)
    label = torch.randint(0, 4, (1, *shape), generator=g, dtype=torch.uint8)
    prior = torch.cat([image, -image])  # two "classes" per modality, flattened as the datamodule does
    return tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label),
                       prior=tio.ScalarImage(tensor=prior))


def _fit(x, y):
    """Least-squares y = a x + c and the largest residual."""
    a, c = np.polyfit(x.flatten().double().numpy(), y.flatten().double().numpy(), 1)
    return a, c, (y.double() - (a * x.double() + c)).abs().max().item()


def test_no_augment_is_identity_up_to_storage_dtypes():
    s = _subject()
    out = train_transforms(False)(s)
    assert torch.equal(out["image"].data, s["image"].data)
    assert out["label"].data.dtype == torch.uint8 and torch.equal(out["label"].data, s["label"].data)
    assert out["prior"].data.dtype == torch.float16
    assert torch.allclose(out["prior"].data.float(), s["prior"].data, atol=5e-3)


def test_intensity_per_channel_on_image_only():
    s = _subject()
    torch.manual_seed(0)
    out = RandomChannelScaleShift(include=["image"])(s)
    assert torch.equal(out["prior"].data, s["prior"].data)
    params = []
    for m in range(4):
        a, c, resid = _fit(s["image"].data[m], out["image"].data[m])
        assert resid < 1e-4 and 0.9 <= a <= 1.1 and -0.1 <= c <= 0.1
        params.append((a, c))
    assert len({round(a, 6) for a, _ in params}) == 4, "each channel draws its own scale"


def test_flips_on_all_three_axes_and_nothing_else():
    s = _subject()
    transform = train_transforms(True, degrees=0, scale=(1.0, 1.0), shift=0.0)
    image = s["image"].data
    flipped_axes = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = transform(s)
        matches = [axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r)
                   if torch.equal(out["image"].data, image.flip(axes) if axes else image)]
        assert len(matches) == 1, "output must be exactly one of the 8 flips of the input"
        axes = matches[0]
        assert torch.equal(out["label"].data, s["label"].data.flip(axes) if axes else s["label"].data)
        assert torch.allclose(out["prior"].data.float(), s["prior"].data.flip(axes) if axes else s["prior"].data,
                              atol=5e-3)
        flipped_axes |= set(axes)
    assert flipped_axes == {1, 2, 3}


def test_rotation_within_ten_degrees_moves_image_prior_and_label_together():
    shape = (16, 16, 16)
    s = _subject(shape=shape)
    # a smooth channel (distance from a corner) and a label thresholded from it: a rotation that moves
    # both alike keeps "label == (image > t)" except on voxels next to the threshold surface
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    ramp = grid.norm(dim=0) / 4 + 1
    s["image"].set_data(torch.cat([ramp[None], s["image"].data[1:]]))
    s["prior"].set_data(torch.cat([s["image"].data, -s["image"].data]))
    s["label"].set_data((ramp > 4)[None].to(torch.uint8))
    transform = train_transforms(True, flip_axes=(), scale=(1.0, 1.0), shift=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        out = transform(s)
        (affine,) = [t for t in out.history if isinstance(t, tio.Affine)]
        degrees = np.asarray(affine.degrees)
        assert (np.abs(degrees) <= 10).all() and (np.abs(degrees) > 1).any()
        assert not torch.allclose(out["image"].data, s["image"].data, atol=1e-2)
        for m in range(4):
            assert torch.allclose(out["prior"].data[m].float(), out["image"].data[m], atol=5e-3)
            assert torch.allclose(out["prior"].data[4 + m].float(), -out["image"].data[m], atol=5e-3)
        label = out["label"].data[0].bool()
        assert not torch.equal(label, s["label"].data[0].bool())
        agree = (label == (out["image"].data[0] > 4)).float().mean().item()
        assert agree > 0.97, agree


@pytest.mark.parametrize("augment", [True, False])
def test_full_pipeline_keeps_prior_an_affine_copy_of_image(augment):
    s = _subject(shape=(14, 12, 10), seed=3)
    torch.manual_seed(1)
    out = train_transforms(augment)(s)
    for m in range(4):
        a, c, resid = _fit(out["prior"].data[m].float(), out["image"].data[m])
        assert resid < 0.02 and 0.9 - 1e-3 <= a <= 1.1 + 1e-3 and abs(c) <= 0.1 + 1e-3
    assert out["image"].data.dtype == torch.float32 and out["label"].data.dtype == torch.uint8
