import pytest
import torch

from smml_lightning.models.maml import MAML

SHAPE = (32, 32, 48)
MASK = torch.tensor([[True, False, True, True], [False, False, False, True]])


def tiny() -> MAML:
    torch.manual_seed(0)
    return MAML(base_width=2)


def image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, *SHAPE, generator=torch.Generator().manual_seed(1))


def test_shapes_train_and_eval():
    net = tiny().train()
    out = net(image(), MASK)
    assert out.logits.shape == (2, 4, *SHAPE)
    assert len(out.aux_logits) == 4 and all(a.shape == (2, 4, *SHAPE) for a in out.aux_logits)
    # level-major, coarsest first: 4 modalities at 1/8, then 1/4, then 1/2
    expected = [(4, 4, 6)] * 4 + [(8, 8, 12)] * 4 + [(16, 16, 24)] * 4
    assert [tuple(d.shape[2:]) for d in out.deep_logits] == expected
    net.eval()
    with torch.no_grad():
        out = net(image(), MASK)
    assert out.logits.shape == (2, 4, *SHAPE) and not out.aux_logits and not out.deep_logits


def test_modality_models_are_independent_and_masking_removes_missing():
    net = tiny().eval()
    x = image()
    with torch.no_grad():
        enc = net.encode(x)
        ref = net.decode(enc, MASK).logits
        assert torch.equal(ref, net(x, MASK).logits)
        y = x.clone()
        y[:, 1] = 5 * torch.randn_like(y[:, 1])  # missing in both samples
        enc_y = net.encode(y)
        assert torch.equal(net.decode(enc_y, MASK).logits, ref)
        # the grouped U-Nets keep modalities apart down to their predictions
        own, own_y = enc.logits.unflatten(1, (4, -1)), enc_y.logits.unflatten(1, (4, -1))
        assert torch.equal(own[:, [0, 2, 3]], own_y[:, [0, 2, 3]])
        assert not torch.allclose(own[:, 1], own_y[:, 1])
        z = x.clone()
        z[:, 3] = 5 * torch.randn_like(z[:, 3])  # available in both samples
        assert (net(z, MASK).logits - ref).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4


def test_gates_are_in_unit_interval_on_available_and_zero_on_missing():
    net = tiny().eval()
    with torch.no_grad():
        enc = net.encode(image())
        gates = net.attention(enc, MASK)
        assert gates.shape == (2, 4, 2, *SHAPE)  # (B, M, w, *S): per voxel and channel
        assert torch.count_nonzero(gates[~MASK]) == 0
        assert ((gates[MASK] > 0) & (gates[MASK] < 1)).all()
        # the fused output is the head on the gated sum, so a gate of zero removes a modality entirely
        gated = (gates[:1] * enc.features.unflatten(1, (4, -1))[:1]).sum(dim=1)
        torch.testing.assert_close(net.decode(enc, MASK).logits[:1], net.head(gated))


@pytest.mark.parametrize("training", [False, True])
def test_one_available_modality_is_predicted_by_its_own_model(training: bool):
    """As in the paper: with one modality there is nothing to fuse; its own U-Net predicts. With more,
    the output is the fusion head's (checked against the gated sum in the test above)."""
    net = tiny().train(training)
    with torch.no_grad():
        enc = net.encode(image())
        out = net.decode(enc, MASK)
        own = enc.logits.unflatten(1, (4, -1))
        assert torch.equal(out.logits[1], own[1, 3])  # sample 1: T2 only
        assert not torch.allclose(out.logits[:1], own[:1, 0])


def test_missing_mask_rejected():
    net = tiny().eval()
    with pytest.raises(ValueError, match="no available modality"):
        net(image(), torch.tensor([[True, True, False, False], [False] * 4]))
