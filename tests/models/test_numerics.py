"""The float32 guard for 3D convolutions whose input is smaller than their kernel, under CPU bf16."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.numerics import SmallInputSafeConv3d, guard_small_bf16_convs


def _weight_grad(conv: nn.Conv3d, x: torch.Tensor, grad_out: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    y.backward(grad_out.to(y.dtype))
    return conv.weight.grad.clone()


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 4, 4), (2, 2, 1)])
def test_guarded_weight_gradient_matches_float32_on_inputs_smaller_than_the_kernel(shape):
    """The shapes where oneDNN's bf16 weight gradient went wrong on the development CPU (1e36, inf, NaN)."""
    g = torch.Generator().manual_seed(0)
    conv = guard_small_bf16_convs(nn.Sequential(nn.Conv3d(64, 64, 3, padding=1)))[0]
    x = torch.randn(2, 64, *shape, generator=g)
    grad_out = torch.randn(2, 64, *shape, generator=g)
    reference = _weight_grad(conv, x, grad_out, bf16=False)
    guarded = _weight_grad(conv, x, grad_out, bf16=True)
    assert torch.isfinite(guarded).all()
    torch.testing.assert_close(guarded, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_large_inputs_take_the_plain_bf16_path():
    conv = nn.Conv3d(8, 8, 3, padding=1)
    guarded = guard_small_bf16_convs(nn.Sequential(nn.Conv3d(8, 8, 3, padding=1)))[0]
    guarded.load_state_dict(conv.state_dict())
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_out, guarded_out = conv(x), guarded(x)
        small_out = guarded(x[:, :, :2, :2, :2])
    assert guarded_out.dtype == torch.bfloat16 and torch.equal(guarded_out, plain_out)
    assert small_out.dtype == torch.float32  # the guarded path: float32 out, autocast casts downstream
    torch.testing.assert_close(small_out, F.conv3d(x[:, :, :2, :2, :2], conv.weight, conv.bias, padding=1))


def test_guard_keeps_parameters_keys_and_is_idempotent():
    net = MMFormer(base_width=4, transformer_dim=16, num_heads=2, dropout=0.0, patch_size=32)
    params_before = {name: id(p) for name, p in net.named_parameters()}
    keys_before = list(net.state_dict())
    guard_small_bf16_convs(net)
    guard_small_bf16_convs(net)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(type(m) is SmallInputSafeConv3d for m in convs)
    assert {name: id(p) for name, p in net.named_parameters()} == params_before
    assert list(net.state_dict()) == keys_before


def test_mmformer_bottleneck_gradients_under_bf16_follow_float32():
    """A 32^3 patch has a 2x2x2 bottleneck: the encoder's last stage trains on correct gradients.

    bf16 against float32 over the whole network: cosine 0.95-0.97 on every encoder stage (measured, two
    seeds); unguarded, the bottleneck's 3x3x3 convs came out at 0.0-0.57 (or inf).
    """
    torch.manual_seed(0)
    net = guard_small_bf16_convs(
        MMFormer(base_width=8, transformer_dim=32, num_heads=2, dropout=0.0, patch_size=32)
    ).train()
    image = torch.randn(2, 4, 32, 32, 32)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    grads = {}
    for bf16 in (False, True):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(image, mask)
            loss = out.logits.float().square().mean()
        loss.backward()
        grads[bf16] = {n: p.grad.float().flatten() for n, p in net.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads[True].values())
    for name in ("encoder.stages.4.body.0.conv.weight", "encoder.stages.4.body.1.conv.weight"):
        cosine = F.cosine_similarity(grads[True][name], grads[False][name], dim=0)
        ratio = grads[True][name].norm() / grads[False][name].norm()
        assert cosine > 0.9 and 0.9 < ratio < 1.1, (name, float(cosine), float(ratio))


def test_every_method_module_guards_its_convolutions_at_setup():
    from smml_lightning.lit.smml import SMML
    from smml_lightning.models.refine import SemanticRefiner

    module = SMML(
        network=lambda: MMFormer(base_width=4, transformer_dim=16, num_heads=2, dropout=0.0, patch_size=32),
        refiner=lambda: SemanticRefiner(width=4),
        roi_size=32,
    )
    assert any(type(m) is nn.Conv3d for m in module.modules())
    module.setup("fit")
    assert not any(type(m) is nn.Conv3d for m in module.modules())


def test_guarded_path_keeps_the_padding_mode():
    conv = nn.Conv3d(4, 4, 3, padding=1, padding_mode="replicate")
    x = torch.randn(1, 4, 2, 2, 2)
    reference = conv(x).detach()
    guard_small_bf16_convs(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded = conv(x).detach()
    torch.testing.assert_close(guarded, reference)
