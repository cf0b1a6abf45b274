import pytest
import torch

from smml_lightning.models.cmc import MIA, CMCNet

SHAPE = (16, 16, 24)
MASK = torch.tensor([[True, False, True, True], [False, False, False, True]])


def tiny(shared: bool = True, num_classes: int = 4) -> CMCNet:
    torch.manual_seed(0)
    return CMCNet(num_classes=num_classes, base_width=2, num_stages=4, shared_encoder=shared)


def image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, *SHAPE, generator=torch.Generator().manual_seed(1))


def test_mia_attention_matches_a_hand_computation():
    x = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mia = MIA()
    got = mia.attention(x)
    for b in range(2):
        flat = x[b].reshape(3, -1)
        for i in range(3):
            energy = [float((flat[i] * flat[j]).sum()) for j in range(3)]
            new = [max(energy) - e for e in energy]
            z = sum(torch.exp(torch.tensor(v)) for v in new)
            for j in range(3):
                assert got[b, i, j].item() == pytest.approx(
                    float(torch.exp(torch.tensor(new[j])) / z), rel=1e-5
                )
    # gamma starts at 0: the identity; with gamma set, gamma * A X + X
    assert torch.equal(mia(x.float()), x.float())
    with torch.no_grad():
        mia.gamma.fill_(0.7)
    expected = (
        0.7 * torch.einsum("bij,bjn->bin", got, x.reshape(2, 3, -1).float()).reshape(x.shape) + x.float()
    )
    torch.testing.assert_close(mia(x.float()), expected.float())


@pytest.mark.parametrize("shared", [True, False])
def test_shapes_and_prediction_is_the_mean_of_available_branch_probabilities(shared: bool):
    net = tiny(shared).train()
    out = net(image(), MASK)
    assert out.logits.shape == (2, 4, *SHAPE)
    assert len(out.aux_logits) == 4 and torch.equal(out.aux_mask, MASK)
    assert out.modality_features.shape == (2, 4, 16, 2, 2, 3)  # widths 2, 4, 8, 16; 1/8 resolution
    probs = torch.stack([a.softmax(dim=1) for a in out.aux_logits], dim=1)  # (B, M, K, *S)
    for b in range(2):
        expected = probs[b, MASK[b]].mean(dim=0)
        torch.testing.assert_close(out.logits[b].exp(), expected, rtol=1e-5, atol=1e-6)
    for b, m in (~MASK).nonzero().tolist():  # missing branches are not computed
        assert torch.count_nonzero(out.aux_logits[m][b]) == 0
    net.eval()
    with torch.no_grad():
        ev = net(image(), MASK)
    assert ev.logits.shape == (2, 4, *SHAPE) and not ev.aux_logits and ev.modality_features is None


def test_num_classes_is_a_parameter():
    net = tiny(num_classes=3).eval()
    with torch.no_grad():
        assert net(image(1), MASK[:1]).logits.shape == (1, 3, *SHAPE)


@pytest.mark.parametrize("shared", [True, False])
def test_missing_modalities_take_no_part_and_encode_keeps_modalities_apart(shared: bool):
    net = tiny(shared).eval()
    x = image()
    with torch.no_grad():
        enc = net.encode(x)
        ref = net.decode(enc, MASK).logits
        torch.testing.assert_close(net(x, MASK).logits, ref)
        y = x.clone()
        y[:, 1] = 5 * torch.randn_like(y[:, 1])  # modality 1 (T1ce) is missing in both samples
        enc_y = net.encode(y)
        torch.testing.assert_close(net.fuse(enc_y, MASK), net.fuse(enc, MASK), rtol=0, atol=0)
        torch.testing.assert_close(net.decode(enc_y, MASK).logits, ref, rtol=0, atol=0)
        # per-modality work only in encode: modality 1's features changed, the others' did not
        for new, old in zip(
            [*enc_y.skips, enc_y.bottleneck, enc_y.mia], [*enc.skips, enc.bottleneck, enc.mia]
        ):
            new, old = new.unflatten(1, (4, -1)), old.unflatten(1, (4, -1))
            assert torch.equal(new[:, [0, 2, 3]], old[:, [0, 2, 3]]) and not torch.allclose(
                new[:, 1], old[:, 1]
            )
        z = x.clone()
        z[:, 3] = 5 * torch.randn_like(z[:, 3])  # available in both samples
        assert (net(z, MASK).logits - ref).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4
        # an available modality changes the fusion, hence another available branch's prediction
        with torch.no_grad():
            net.mia[0].gamma.fill_(0.5)
        z = x.clone()
        z[:, 2] = 5 * torch.randn_like(z[:, 2])
        net.train()
        a, c = net(x, MASK), net(z, MASK)
        assert not torch.allclose(a.aux_logits[0][0], c.aux_logits[0][0])


def test_single_modality_prediction_is_its_branch():
    net = tiny().train()
    out = net(image(), MASK)
    torch.testing.assert_close(out.logits[1], out.aux_logits[3][1].log_softmax(dim=0), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    net = tiny()
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 4, 12, 16, 16), MASK[:1])
    with pytest.raises(ValueError, match="at least one True"):
        net(torch.zeros(1, 4, *SHAPE), torch.zeros(1, 4, dtype=torch.bool))
