import pytest
import torch
import torch.nn.functional as F

from smml_lightning.models.backbone import GroupedEncoder, MMFormer, mask_modalities

SHAPE = (32, 32, 48)  # non-cubic; bottleneck grid 2x2x3 differs from the 2x2x2 reference grid


def tiny(**kw) -> MMFormer:
    torch.manual_seed(0)
    return MMFormer(base_width=4, transformer_dim=32, num_heads=4, dropout=0.0, patch_size=32, **kw)


def image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, *SHAPE, generator=torch.Generator().manual_seed(seed))


MASK = torch.tensor([[True, False, True, True], [False, False, False, True]])


def test_shapes_train_and_eval():
    net = tiny().train()
    out = net(image(), MASK)
    assert out.logits.shape == (2, 4, *SHAPE)
    assert len(out.aux_logits) == 4 and all(a.shape == (2, 4, *SHAPE) for a in out.aux_logits)
    assert [tuple(d.shape[2:]) for d in out.deep_logits] == [(4, 4, 6), (8, 8, 12), (16, 16, 24)]
    assert out.bottleneck.shape == (2, 64, 2, 2, 3)
    net.eval()
    with torch.no_grad():
        out = net(image(), MASK)
    assert out.logits.shape == (2, 4, *SHAPE) and out.aux_logits == [] and out.deep_logits == []


def test_encode_decode_equals_forward_and_encode_keeps_modalities_apart():
    net = tiny().eval()
    x = image()
    with torch.no_grad():
        enc = net.encode(x)
        assert torch.equal(net.decode(enc, MASK).logits, net(x, MASK).logits)
        # 4 * stage widths, then 4 * transformer_dim
        assert [e.shape[1] for e in enc] == [16, 32, 64, 128, 128]
        y = x.clone()
        y[:, 2] = torch.randn_like(y[:, 2])
        enc_y = net.encode(y)
    for a, b in zip(enc, enc_y):
        a, b = a.unflatten(1, (4, -1)), b.unflatten(1, (4, -1))
        assert torch.equal(a[:, [0, 1, 3]], b[:, [0, 1, 3]])
        assert not torch.allclose(a[:, 2], b[:, 2])


def test_eval_skip_shares_equal_the_training_fusion_conv():
    """Eval decodes from per-modality shares of the skip-fusion conv; training runs the conv itself.

    Instance norm keeps no running statistics and dropout is 0, so the two modes must agree on the fused
    logits for every subset, to float rounding.
    """
    net = tiny()
    x = image()
    for mask in (MASK, torch.tensor([[True, True, True, True], [True, False, False, False]])):
        with torch.no_grad():
            trained_path = net.train()(x, mask).logits
            shares_path = net.eval()(x, mask).logits
        assert torch.allclose(trained_path, shares_path, atol=1e-5, rtol=1e-5)
        assert trained_path.abs().max() > 0.1


def test_missing_modality_input_has_no_effect_available_one_does():
    net = tiny().eval()
    x = image()
    with torch.no_grad():
        ref = net(x, MASK).logits
        y = x.clone()
        y[:, 1] = 5 * torch.randn_like(y[:, 1])  # missing in both samples
        assert torch.equal(net(y, MASK).logits, ref)
        z = x.clone()
        z[:, 3] = 5 * torch.randn_like(z[:, 3])  # available in both samples
        assert (net(z, MASK).logits - ref).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3
        # missing tokens are padding in the inter-modal attention: even their positions do not matter
        enc = net.encode(x)
        net.pos_embed[1].add_(1.0)
        assert torch.equal(net.decode(enc, MASK).logits, ref)
        net.pos_embed[3].add_(1.0)
        assert not torch.allclose(net.decode(enc, MASK).logits, ref)


def _modality_params(net: MMFormer, k: int) -> list[torch.Tensor]:
    """Gradients of everything that belongs to modality k only: grouped slices and its intra transformer."""
    grads = []
    for module in [*net.encoder.modules(), net.to_tokens]:
        if isinstance(module, (torch.nn.Conv3d, torch.nn.InstanceNorm3d)):
            for p in module.parameters(recurse=False):
                grads.append(p.grad.unflatten(0, (4, -1))[k])
    grads += [p.grad for p in net.intra[k].parameters()]
    return grads


def test_missing_modality_gets_exactly_zero_gradient():
    net = tiny().train()
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    out = net(image(), mask)
    (out.logits[0].float() ** 2).mean().backward()
    for k in (1, 3):  # missing in sample 0, present in sample 1
        grads = _modality_params(net, k)
        assert len(grads) > 30 and all(torch.count_nonzero(g) == 0 for g in grads)
    for k in (0, 2):  # available in sample 0: must learn
        assert sum(g.abs().sum() for g in _modality_params(net, k)) > 0


@pytest.mark.parametrize("all_modalities", [True, False])
def test_auxiliary_decoder_reads_every_modality_or_only_the_kept_ones(all_modalities):
    """Default (mmFormer/RFNet/SMML): every modality's own prediction is made and scored, so a masked
    modality's encoder learns through the auxiliary loss alone; otherwise masked pairs are absent."""
    net = tiny(aux_all_modalities=all_modalities).train()
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    out = net(image(), mask)
    expected = torch.ones_like(mask) if all_modalities else mask
    assert torch.equal(out.aux_mask, expected)
    for k in range(4):
        for b in range(2):
            assert bool(out.aux_logits[k][b].abs().sum() > 0) == bool(expected[b, k]), (b, k)
    # Own prediction of modality 1 for sample 0 (masked there): reaches modality 1's encoder iff scored.
    (out.aux_logits[1][0].float() ** 2).mean().backward()
    assert bool(sum(g.abs().sum() for g in _modality_params(net, 1)) > 0) == all_modalities
    assert all(torch.count_nonzero(g) == 0 for g in _modality_params(net, 3))


def _run_separately(block, x: torch.Tensor, k: int, groups: int) -> torch.Tensor:
    """One MONAI Convolution unit of the grouped stack, computed as an ordinary conv for modality k."""
    conv, norm = block.conv, block.adn.N
    weight = conv.weight.unflatten(0, (groups, -1))[k]
    bias = conv.bias.unflatten(0, (groups, -1))[k]
    y = F.conv3d(x, weight, bias, stride=conv.stride, padding=conv.padding)
    y = F.instance_norm(
        y,
        weight=norm.weight.unflatten(0, (groups, -1))[k],
        bias=norm.bias.unflatten(0, (groups, -1))[k],
        eps=norm.eps,
    )
    return F.leaky_relu(y, block.adn.A.negative_slope)


def test_grouped_encoder_equals_four_separate_encoders():
    torch.manual_seed(0)
    enc = GroupedEncoder([2, 4, 6, 8, 10], groups=4)
    x = torch.randn(1, 4, 32, 16, 32)
    with torch.no_grad():
        grouped = enc(x)
        for k in range(4):
            h = x[:, k : k + 1]
            for stage, out in zip(enc.stages, grouped):
                h = _run_separately(stage.down, h, k, 4)
                h = h + _run_separately(stage.body[1], _run_separately(stage.body[0], h, k, 4), k, 4)
                torch.testing.assert_close(out.unflatten(1, (4, -1))[:, k], h, atol=1e-5, rtol=1e-4)


def test_bf16_channels_last_matches_fp32():
    net = tiny().eval()
    x = image(batch=1)
    mask = MASK[:1]
    with torch.no_grad():
        ref = net(x, mask).logits
        net_cl = net.to(memory_format=torch.channels_last_3d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net_cl(x.to(memory_format=torch.channels_last_3d), mask).logits.float()
    rel = (out - ref).norm() / ref.norm()
    assert out.shape == ref.shape and rel < 0.05, rel


def test_mask_helper_and_errors():
    x = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1, 1, 1)
    masked = mask_modalities(x, MASK)
    expected = x.clone().view(2, 4, 2)
    expected[~MASK] = 0
    assert torch.equal(masked.view(2, 4, 2), expected)
    net = tiny().eval()
    with pytest.raises(ValueError, match="no available modality"):
        net(image(), torch.tensor([[True, False, False, False], [False] * 4]))
    with pytest.raises(ValueError, match="divisible by 16"):
        net.encode(torch.randn(1, 4, 32, 32, 40))
    with pytest.raises(ValueError, match="availability mask"):
        net(image(), torch.ones(2, 3, dtype=torch.bool))


def test_group_form_instance_norm_equals_torch_instance_norm():
    """instance_norm (GroupNorm, one group per channel) against F.instance_norm, in float64, with affine."""
    from smml_lightning.models.backbone import instance_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, 4, generator=g, dtype=torch.float64) * 3 + 2
    norm = instance_norm(6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(6, generator=g))
    expected = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=1e-5)
    torch.testing.assert_close(norm(x), expected)
    # the statistics are per sample and channel: each output channel has mean = bias, std = weight
    y = (norm(x) - norm.bias.view(1, -1, 1, 1, 1)) / norm.weight.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(y.mean(dim=(2, 3, 4)), torch.zeros(2, 6, dtype=torch.float64))


def test_use_group_instance_norms_swaps_monai_norms_keeping_parameters_and_outputs():
    from monai.networks.nets import BasicUNet

    from smml_lightning.models.backbone import use_group_instance_norms

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=2, out_channels=3, features=(4, 4, 8, 8, 16, 4)).eval()
    for m in net.modules():  # non-trivial affine parameters, so a swap that dropped them would show
        if isinstance(m, torch.nn.InstanceNorm3d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias)
    x = torch.randn(1, 2, 32, 32, 32)
    before, state = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    use_group_instance_norms(net)
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) > 0
    assert net.state_dict().keys() == state.keys()
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


def test_predicted_labels_equal_argmax_including_ties():
    from smml_lightning.models.base import predicted_labels

    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 4, 5, 6, 7), generator=g).float()  # many ties
    assert torch.equal(predicted_labels(logits), logits.argmax(dim=1))
    assert torch.equal(predicted_labels(logits[0], dim=0), logits[0].argmax(dim=0))
    assert torch.equal(predicted_labels(logits.bfloat16()), logits.argmax(dim=1))
