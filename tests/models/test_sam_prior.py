from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from smml_lightning.models.sam_prior import (
    PriorDecoder3D,
    SliceEncoder,
    align_to_case,
    build_tiny_sam,
    load_sam_image_encoder,
    save_tiny_sam_checkpoint,
)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", seed=3, img_size=32)


def test_checkpoint_round_trip_through_the_real_loading_path(tiny_ckpt):
    encoder = load_sam_image_encoder(tiny_ckpt, "tiny")
    torch.manual_seed(3)
    built = build_tiny_sam(img_size=32).image_encoder.state_dict()
    loaded = encoder.state_dict()
    assert loaded.keys() == built.keys()
    assert all(torch.equal(loaded[k], built[k]) for k in built)
    assert encoder.img_size == 32 and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    other = load_sam_image_encoder(
        save_tiny_sam_checkpoint(tiny_ckpt.parent / "o.pth", seed=4, img_size=32), "tiny"
    )
    assert not torch.equal(other.patch_embed.proj.weight, encoder.patch_embed.proj.weight)
    # the file is a whole SAM state dict, as the official ones are
    keys = torch.load(tiny_ckpt, weights_only=True).keys()
    assert {k.split(".")[0] for k in keys} == {"image_encoder", "prompt_encoder", "mask_decoder"}


def test_missing_checkpoint_says_where_to_get_one(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"(?s)nope\.pth.*sam_vit_b_01ec64\.pth.*MedSAM.*--sam_checkpoint PATH"
    ):
        load_sam_image_encoder(tmp_path / "nope.pth", "vit_b")


def test_corrupt_checkpoint_and_bad_model_type(tmp_path, tiny_ckpt):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(tiny_ckpt.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"broken\.pth: not a readable SAM tiny checkpoint"):
        load_sam_image_encoder(bad, "tiny")
    with pytest.raises(ValueError, match="unknown SAM model_type 'vit_x'"):
        load_sam_image_encoder(tiny_ckpt, "vit_x")


def test_slice_encoder_shape_and_slice_independence(tiny_ckpt):
    enc = SliceEncoder(load_sam_image_encoder(tiny_ckpt, "tiny"), chunk_size=5)
    vol = torch.randn(2, 1, 32, 24, 6)
    out = enc(vol)
    # longest side 32 -> 32 px, other side 24 px; patch 8 -> 4 x 3 cells; one slice per k
    assert out.shape == (2, 32, 4, 3, 6)
    assert torch.equal(enc(vol[:, 0]), out)  # (B, D, H, K) input, e.g. a case's modalities
    bumped = vol.clone()
    bumped[0, 0, :, :, 2] += torch.randn(32, 24)
    new = enc(bumped)
    changed = (new - out).abs().amax(dim=(1, 2, 3))  # (B, K)
    assert changed[0, 2] > 1e-3
    mask = torch.ones_like(changed, dtype=torch.bool)
    mask[0, 2] = False
    assert torch.all(changed[mask] == 0)


def test_slice_encoder_prepares_slices_as_sam_does(tiny_ckpt):
    """Compare one slice with SAM's own ResizeLongestSide size and Sam.preprocess (normalise, then pad)."""
    sam = build_tiny_sam(img_size=32)
    sam.load_state_dict(torch.load(tiny_ckpt, weights_only=True))
    enc = SliceEncoder(load_sam_image_encoder(tiny_ckpt, "tiny"))
    vol = torch.randn(1, 1, 20, 13, 1)
    sl = vol[0, 0, :, :, 0]
    size = ResizeLongestSide.get_preprocess_shape(20, 13, 32)
    assert enc.resized_shape(20, 13) == size
    rgb = ((sl - sl.min()) / (sl.max() - sl.min()) * 255)[None, None].expand(1, 3, -1, -1)
    rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        ref = sam.image_encoder(sam.preprocess(rgb[0])[None])
    fd, fh = -(-size[0] // 8), -(-size[1] // 8)
    assert torch.allclose(enc(vol)[0, :, :, :, 0], ref[0, :, :fd, :fh], atol=1e-5)
    # a constant slice (missing modality, empty background) gives finite features
    assert torch.isfinite(enc(torch.zeros(1, 1, 20, 13, 2))).all()


def test_slice_encoder_bf16_close_to_float32(tiny_ckpt):
    encoder = load_sam_image_encoder(tiny_ckpt, "tiny")
    vol = torch.randn(1, 1, 16, 16, 3)
    full, half = SliceEncoder(encoder)(vol), SliceEncoder(encoder, bf16=True)(vol)
    assert half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.05 * full.abs().mean()


def test_align_to_case_is_the_exact_cell_map():
    # cells of 2 voxels along D, 5 cells over 9 voxels (the last cell is half outside the case)
    ramp = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 1, 5, 3, 2)
    got = align_to_case(ramp, (9, 3, 2), (2.0, 1.0))[0, 0, :, 0, 0]
    expected = ((torch.arange(9.0) + 0.5) / 2 - 0.5).clamp(0, 4)  # voxel centre in cell units
    assert torch.allclose(got, expected, atol=1e-5)
    # when the cells tile the case exactly it is plain trilinear interpolation
    feats = torch.randn(2, 3, 4, 5, 6)
    exact = align_to_case(feats, (8, 15, 6), (2.0, 3.0))
    assert torch.allclose(exact, F.interpolate(feats, size=(8, 15, 6), mode="trilinear"), atol=1e-5)


def test_prior_decoder_shapes_gradients_and_modality_embedding():
    torch.manual_seed(0)
    dec = PriorDecoder3D(32, num_classes=4, width=16)
    feats, image = torch.randn(2, 32, 3, 3, 5), torch.randn(2, 1, 12, 11, 5)
    logits = dec(feats, image, torch.tensor([0, 1]), (4.0, 4.0))
    assert logits.shape == (2, 4, 12, 11, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in dec.parameters())
    twice = (2, -1, -1, -1, -1)
    same = dec(feats[:1].expand(twice), image[:1].expand(twice), torch.tensor([0, 3]), (4.0, 4.0))
    assert not torch.allclose(same[0], same[1])  # the modality embedding changes the prediction
