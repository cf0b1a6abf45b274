"""The batched 15-subset paths give what the plain per-subset paths give, to float rounding."""

import pytest
import torch

from smml_lightning.data.modalities import SUBSETS
from smml_lightning.evaluation.inference import predict_subsets
from smml_lightning.models.backbone import (
    MMFormer,
    UNetDecoder,
    channels_last_cat,
    pointwise_conv,
    stage_widths,
    upsample_conv,
)

SHAPE = (32, 32, 48)  # bottleneck grid 2x2x3: positions resized from the 2x2x2 reference grid


def tiny() -> MMFormer:
    torch.manual_seed(0)
    return MMFormer(base_width=4, transformer_dim=32, num_heads=4, dropout=0.0, patch_size=32)


def image(batch: int = 2, shape: tuple[int, ...] = SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, *shape, generator=torch.Generator().manual_seed(seed))


def all_masks(batch: int) -> list[torch.Tensor]:
    return [torch.tensor(s).expand(batch, -1) for s in SUBSETS]


def test_eval_inter_modal_on_available_tokens_equals_the_padded_form():
    """Eval gathers each sample's available tokens (grouped by their count); training pads the missing
    ones. With dropout 0 both are the same function: compare them on mixed masks in one batch."""
    net = tiny()
    with torch.no_grad():
        tokens_map = net.encode(image(4))[-1]
    mask = torch.tensor(
        [[True, False, True, True], [False, False, False, True], [True] * 4, [False, True, False, True]]
    )
    with torch.no_grad():
        padded_feat, padded_out = net.train().inter_modal(tokens_map, mask)
        kept_feat, kept_out = net.eval().inter_modal(tokens_map, mask)
    torch.testing.assert_close(kept_feat, padded_feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept_out, padded_out, rtol=1e-5, atol=1e-5)
    assert padded_feat.abs().max() > 0.1
    # Samples really differ by mask (the comparison would be vacuous if masks were ignored).
    assert not torch.allclose(kept_feat[0], kept_feat[2])


def test_decode_subsets_equals_one_decode_per_subset():
    net = tiny().eval()
    x = image(2)
    with torch.no_grad():
        encoded = net.encode(x)
        plain = [net.decode(encoded, m).logits for m in all_masks(2)]
        batched = net.decode_subsets(encoded, all_masks(2))
    assert len(batched) == 15
    for a, b in zip(batched, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[0], plain[14])


def test_decode_subsets_in_training_mode_is_the_default_loop():
    net = tiny().train()
    x = image(1)
    masks = all_masks(1)[:3]
    with torch.no_grad():
        encoded = net.encode(x)
        batched = net.decode_subsets(encoded, masks)
        plain = [net.decode(encoded, m).logits for m in masks]
    for a, b in zip(batched, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("subset_batch", [4, 15])
def test_predict_subsets_batched_equals_subset_by_subset(subset_batch):
    models = [tiny(), tiny()]
    torch.manual_seed(3)
    with torch.no_grad():  # a second, different branch
        for p in models[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    case = image(1, (48, 40, 32), seed=2)
    run = dict(roi_size=32, overlap=0.5, sw_batch_size=2, accumulate_dtype=torch.float32)
    plain = predict_subsets(models, case, subset_batch=1, **run)
    batched = predict_subsets(models, case, subset_batch=subset_batch, **run)
    assert sorted(batched) == list(range(15))
    for k in plain:
        torch.testing.assert_close(batched[k], plain[k], rtol=1e-5, atol=1e-5)


def test_subset_batch_must_be_positive():
    with pytest.raises(ValueError, match="subset_batch"):
        predict_subsets([tiny()], image(1), roi_size=32, subset_batch=0)


def test_matrix_forms_equal_the_convolutions():
    """pointwise_conv and upsample_conv against torch's Conv3d and ConvTranspose3d, non-cubic grids."""
    torch.manual_seed(4)
    x = torch.randn(3, 6, 5, 4, 7)
    conv = torch.nn.Conv3d(6, 5, 1)
    up = torch.nn.ConvTranspose3d(6, 5, 2, stride=2)
    with torch.no_grad():
        torch.testing.assert_close(pointwise_conv(conv, x), conv(x), rtol=1e-5, atol=1e-5)
        expected = up(x)
        assert expected.shape == (3, 5, 10, 8, 14)
        torch.testing.assert_close(upsample_conv(up, x), expected, rtol=1e-5, atol=1e-5)
        # Written into the first channels of a channels-last tensor (the decoder's concatenation).
        merged = torch.full((3, 9, 10, 8, 14), 7.0).contiguous(memory_format=torch.channels_last_3d)
        assert upsample_conv(up, x, out=merged[:, :5]).data_ptr() == merged.data_ptr()
        torch.testing.assert_close(merged[:, :5], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(merged[:, 5:], torch.full((3, 4, 10, 8, 14), 7.0))  # the rest untouched
        up.bias = None
        torch.testing.assert_close(upsample_conv(up, x, out=merged[:, :5]), up(x), rtol=1e-5, atol=1e-5)
        # bias=False: the same product without the bias, for a convolution an instance norm follows.
        unbiased = pointwise_conv(conv, x, bias=False)
        torch.testing.assert_close(unbiased, conv(x) - conv.bias.view(1, -1, 1, 1, 1), rtol=1e-5, atol=1e-5)


def test_eval_network_leaves_out_the_biases_instance_norms_remove():
    """Eval (skip shares, matrix forms) adds neither the skip fusions' biases nor the decoder's 1x1x1
    biases: the instance norms after them remove per-channel constants. With large biases the eval
    network still gives the training network's logits (the convolution modules, biases included)."""
    net = tiny()
    torch.manual_seed(7)
    with torch.no_grad():
        for block in [*net.skip_fusion, *(merge[1] for merge in net.decoder.merges)]:
            block.conv.bias.copy_(5 * torch.randn_like(block.conv.bias))
        x, mask = image(2), torch.tensor([[True, False, True, True], [False, True, False, False]])
        trained = net.train()(x, mask).logits
        inferred = net.eval()(x, mask).logits
    torch.testing.assert_close(inferred, trained, rtol=1e-4, atol=1e-4)
    assert trained.abs().max() > 0.1


def test_channels_last_cat_holds_what_the_convolution_reads():
    """channels_last_cat: the concatenation in a channels-last layout, in the dtype the next convolution
    computes in: autocast's (bf16 values rounded as autocast rounds them), else the common type."""
    a, b = torch.randn(2, 3, 4, 5, 6).bfloat16(), torch.randn(2, 5, 4, 5, 6)
    plain = channels_last_cat(a, b)
    assert plain.dtype == torch.float32 and plain.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(plain, torch.cat([a, b], dim=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_ = channels_last_cat(a, b)
    assert cast_.dtype == torch.bfloat16 and cast_.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(cast_, torch.cat([a, b], dim=1).bfloat16())


def test_inference_decoder_equals_the_training_decoder_under_bf16_autocast():
    """Under the configs' bf16 autocast the eval decoder (channels-last 3x3x3 inputs, matrix forms) gives
    the training decoder's logits to bf16 rounding."""
    torch.manual_seed(6)
    widths = stage_widths(4)
    decoder = UNetDecoder(widths, 4)
    skips = [torch.randn(2, w, 32 // 2**i, 32 // 2**i, 16 // 2**i) for i, w in enumerate(widths[:-1])]
    bottom = torch.randn(2, widths[-1], 2, 2, 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = decoder.train()(skips, bottom).logits.float()
        inferred = decoder.eval()(skips, bottom).logits.float()
    assert inferred.shape == trained.shape == (2, 4, 32, 32, 16)
    torch.testing.assert_close(inferred, trained, rtol=0.05, atol=0.05)
    assert (inferred.argmax(1) == trained.argmax(1)).float().mean() > 0.99


def test_inference_decoder_equals_the_training_decoder():
    """The eval decoder (matrix forms) and the training one (convolution modules) are the same function:
    instance norms keep no running statistics."""
    torch.manual_seed(5)
    widths = stage_widths(4)
    decoder = UNetDecoder(widths, 4)
    skips = [torch.randn(2, w, 32 // 2**i, 32 // 2**i, 16 // 2**i) for i, w in enumerate(widths[:-1])]
    bottom = torch.randn(2, widths[-1], 2, 2, 1)
    with torch.no_grad():
        trained = decoder.train()(skips, bottom).logits
        inferred = decoder.eval()(skips, bottom).logits
    assert inferred.shape == (2, 4, 32, 32, 16)
    torch.testing.assert_close(inferred, trained, rtol=1e-5, atol=1e-5)
