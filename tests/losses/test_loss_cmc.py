import math

import pytest
import torch
from monai.losses import ContrastiveLoss

from smml_lightning.losses.cmc import (
    cac_loss,
    channel_nt_xent,
    csc_loss,
    soft_dice_agreement,
)
from smml_lightning.losses.schedules import (
    after_warmup,
    cosine_rampdown,
    sigmoid_rampup,
)
from smml_lightning.models.cmc import CMCNet


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nt_xent_loop(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """NT-Xent written out view by view, for one sample ``(C, L)``."""
    views = [v / v.norm() for v in [*a, *b]]
    c = a.shape[0]
    total = 0.0
    for i in range(2 * c):
        partner = (i + c) % (2 * c)
        num = math.exp(float(views[i] @ views[partner]) / t)
        den = sum(math.exp(float(views[i] @ views[k]) / t) for k in range(2 * c) if k != i)
        total += -math.log(num / den)
    return total / (2 * c)


def test_channel_nt_xent_matches_a_loop_and_monai():
    a = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, generator=_gen(0))
    b = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, generator=_gen(1))
    got = channel_nt_xent(a, b, temperature=0.5)
    assert got.shape == (2,)
    for n in range(2):
        expected = _nt_xent_loop(a[n].flatten(1), b[n].flatten(1), 0.5)
        assert got[n].item() == pytest.approx(expected, rel=1e-5)
        monai = ContrastiveLoss(temperature=0.5)(a[n].flatten(1).float(), b[n].flatten(1).float())
        assert got[n].item() == pytest.approx(monai.item(), rel=1e-5)
    # identical, orthogonal channels: each positive has cosine 1, every negative 0
    eye = torch.eye(4).view(1, 4, 4, 1, 1)
    ideal = math.log(math.exp(2) + 6) - 2  # -log(e^{1/T} / (e^{1/T} + 6 e^0)), T = 0.5
    assert channel_nt_xent(eye, eye).item() == pytest.approx(ideal, rel=1e-6)


def test_csc_averages_over_available_pairs_only():
    f = torch.randn(2, 4, 3, 2, 2, 2, generator=_gen(2))
    mask = torch.tensor([[True, True, False, True], [False, True, False, False]])
    expected = torch.stack(
        [channel_nt_xent(f[:1, i], f[:1, j])[0] for i, j in [(0, 1), (0, 3), (1, 3)]]
    ).mean()
    torch.testing.assert_close(csc_loss(f, mask), expected)
    g = f.clone()
    g[0, 2] = torch.randn_like(g[0, 2])  # missing modality
    g[1] = torch.randn_like(g[1])  # one modality only: no pair
    torch.testing.assert_close(csc_loss(g, mask), expected)
    single = csc_loss(f.requires_grad_(), mask[1:].expand(2, -1))
    assert single.item() == 0.0
    single.backward()


def test_soft_dice_agreement_by_hand():
    p = torch.tensor([[[0.2, 0.6], [0.8, 0.4]]])  # (N=1, K=2, S=2)
    q = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    d0 = 2 * (0.1 + 0.3) / (0.04 + 0.36 + 0.5)
    d1 = 2 * (0.4 + 0.2) / (0.64 + 0.16 + 0.5)
    assert soft_dice_agreement(p, q, smooth=0).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    assert soft_dice_agreement(p, q, smooth=0, include_background=False).item() == pytest.approx(
        1 - d1, rel=1e-6
    )
    assert soft_dice_agreement(p, p).abs().item() < 1e-6


def test_cac_is_a_loss_on_probabilities_over_available_pairs():
    logits = torch.randn(2, 4, 3, 4, 4, 4, generator=_gen(3))
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    probs = logits.softmax(dim=2)
    pairs = [soft_dice_agreement(probs[:1, 0], probs[:1, 2])]
    pairs += [soft_dice_agreement(probs[1:, i], probs[1:, j]) for i in range(4) for j in range(i + 1, 4)]
    torch.testing.assert_close(cac_loss(logits, mask), torch.cat(pairs).mean())
    other = logits.clone()
    other[0, 1] = 100 * torch.randn_like(other[0, 1])  # a missing branch's output changes nothing
    torch.testing.assert_close(cac_loss(other, mask), cac_loss(logits, mask))
    # agreeing branches give 0 and a gradient step lowers the loss (it pulls branches together)
    same = logits[:, :1].expand(-1, 4, -1, -1, -1, -1)
    assert cac_loss(same, mask).abs().item() < 1e-5
    x = logits.clone().requires_grad_()
    loss = cac_loss(x, mask)
    loss.backward()
    assert cac_loss(x.detach() - 5.0 * x.grad, mask) < loss.detach()


def test_ramps_and_warmup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(7, 10) == pytest.approx(math.exp(-5 * 0.09))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(15, 10) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    assert cosine_rampdown(0, 10) == 1.0
    assert cosine_rampdown(5, 10) == pytest.approx(0.5)
    assert cosine_rampdown(7, 10) == pytest.approx(0.5 * (math.cos(0.7 * math.pi) + 1))
    assert cosine_rampdown(10, 10) == pytest.approx(0.0) and cosine_rampdown(12, 10) == pytest.approx(0.0)
    assert [after_warmup(e, 3) for e in range(5)] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=">= 0"):
        sigmoid_rampup(-1, 10)


def test_unlabeled_terms_send_gradient_into_the_encoder():
    """The public code's unlabeled pass ran under no_grad; here CSC and CAC alone train the encoder."""
    torch.manual_seed(0)
    net = CMCNet(base_width=2, num_stages=3).train()
    with torch.no_grad():
        net.mia[0].gamma.fill_(0.1)
    out = net(torch.randn(2, 4, 8, 8, 8, generator=_gen(4)), torch.tensor([[True, True, False, True]] * 2))
    for term in (
        csc_loss(out.modality_features, out.aux_mask),
        cac_loss(torch.stack(out.aux_logits, dim=1), out.aux_mask),
    ):
        net.zero_grad()
        term.backward(retain_graph=True)
        first = net.encoder.stages[0].down.conv.weight.grad
        assert first is not None and first.abs().sum() > 0
    assert net.mia[0].gamma.grad is not None and net.mia[0].gamma.grad.abs() > 0
