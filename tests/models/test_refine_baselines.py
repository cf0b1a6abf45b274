import pytest
import torch

from smml_lightning.models.baselines import UNetBaseline
from smml_lightning.models.refine import LabelGuidedPriorWeighting, SemanticRefiner

MASK = torch.tensor([[True, False, True, True], [False, False, False, True]])
SHAPE = (32, 32, 48)


def test_label_guided_weighting_matches_hand_computation():
    """The public code's weights: per class k, MLP_k([mean prior_m,k / (share_k + eps) for m] + [share_k]),
    sigmoid; the shares and means are counted by hand here with numpy."""
    torch.manual_seed(0)
    lg = LabelGuidedPriorWeighting()
    prior = torch.rand(2, 4, 4, 2, 3, 4)
    label = torch.zeros(2, 1, 2, 3, 4, dtype=torch.long)
    label[0, 0, 0] = 1  # sample 0: NCR in half the patch, no ED, no ET
    label[1, 0, :, :, 0] = 3  # sample 1: ET in a quarter
    out = lg(prior, MASK, label)
    voxels = 2 * 3 * 4
    for b in range(2):
        lab = label[b, 0].numpy()
        for k in range(4):
            share = (lab == k).sum() / voxels + 1e-7
            ratios = [float(prior[b, m, k].numpy().mean()) * MASK[b, m].item() / share for m in range(4)]
            x = torch.tensor([*ratios, share], dtype=torch.float32).view(1, 5, 1, 1, 1)
            with torch.no_grad():
                w = torch.sigmoid(lg.mlps[k](x)).flatten()
            for m in range(4):
                expected = prior[b, m, k] * w[m] * MASK[b, m]
                assert torch.allclose(out[b, m, k], expected, rtol=1e-5, atol=1e-6), (b, m, k)
    assert torch.count_nonzero(out[~MASK]) == 0
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lg.mlps[1].parameters())
    with pytest.raises(ValueError, match="label must be"):
        lg(prior, MASK, label[:, :, :1])


def test_refiner_with_label_guided_weighting_needs_the_label():
    torch.manual_seed(0)
    ref = SemanticRefiner(width=4)
    prior = torch.rand(2, 4, 4, 16, 16, 24)
    logits = torch.randn(2, 4, 16, 16, 24)
    label = torch.randint(0, 4, (2, 1, 16, 16, 24))
    assert torch.equal(ref(prior, MASK, logits, label), logits)  # residual: identity at initialisation
    with pytest.raises(ValueError, match="needs the label"):
        ref(prior, MASK, logits)


def test_refiner_starts_as_the_identity_on_the_fused_logits():
    """A fresh refiner returns the fused logits unchanged, so it never teaches worse than it learnt."""
    torch.manual_seed(0)
    ref = SemanticRefiner(width=4)
    prior = torch.rand(2, 4, 4, 16, 16, 24)
    logits = torch.randn(2, 4, 16, 16, 24)
    label = torch.randint(0, 4, (2, 1, 16, 16, 24))
    assert torch.equal(ref(prior, MASK, logits, label), logits)
    torch.nn.functional.cross_entropy(ref(prior, MASK, logits, label), label[:, 0]).backward()
    assert ref.correction[1].weight.grad.abs().sum() > 0  # the correction head learns from the first step


def test_refiner_shape_and_ignores_missing_priors():
    torch.manual_seed(0)
    ref = SemanticRefiner(width=4).eval()
    torch.nn.init.normal_(ref.correction[1].weight)  # a trained refiner: its correction depends on the priors
    shape = (16, 16, 24)
    prior = torch.rand(2, 4, 4, *shape)
    logits = torch.randn(2, 4, *shape)
    label = torch.randint(0, 4, (2, 1, *shape))
    with torch.no_grad():
        out = ref(prior, MASK, logits, label)
        assert out.shape == (2, 4, *shape)
        changed = prior.clone()
        changed[~MASK] = torch.rand_like(changed[~MASK])
        assert torch.equal(ref(changed, MASK, logits, label), out)
        changed[:, 3] = torch.rand_like(changed[:, 3])  # T2 is available in both samples
        assert (ref(changed, MASK, logits, label) - out).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4
    with pytest.raises(ValueError, match="fused_logits"):
        ref(prior, MASK, torch.randn(2, 4, 8, 16, 24), label)


def test_unet_baseline_shapes_split_and_masking():
    torch.manual_seed(0)
    net = UNetBaseline(base_width=4)
    x = torch.randn(2, 4, *SHAPE)
    out = net.train()(x, MASK)
    assert out.logits.shape == (2, 4, *SHAPE) and not out.aux_logits and out.bottleneck is None
    net.eval()
    with torch.no_grad():
        ref = net.decode(net.encode(x), MASK).logits
        assert torch.equal(ref, net(x, MASK).logits)
        y = x.clone()
        y[:, 1] = torch.randn_like(y[:, 1])
        assert torch.equal(net(y, MASK).logits, ref)
        y[:, 3] = torch.randn_like(y[:, 3])
        assert (net(y, MASK).logits - ref).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4
