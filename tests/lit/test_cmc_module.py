"""The CMC LightningModule: which samples each term reads, its schedules, and the unlabeled gradient."""

import math
from types import SimpleNamespace

import pytest
import torch

from smml_lightning.lit.cmc import CMC
from smml_lightning.losses.cmc import cac_loss, csc_loss
from smml_lightning.models.cmc import CMCNet

P = 16


def module(**kwargs) -> CMC:
    torch.manual_seed(0)
    kwargs.setdefault("warmup_epochs", 0)
    kwargs.setdefault("ramp_epochs", 10)
    return CMC(network=lambda: CMCNet(base_width=2, num_stages=3), roi_size=P, **kwargs)


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (3, 1, P, P, P), generator=g)
    label[2] = -1  # an unlabeled sample's placeholder: reading it would fail in the loss
    masks = torch.tensor(
        [[[True, True, False, True]], [[True, False, False, False]], [[True, True, True, True]]]
    )
    return {
        "image": torch.randn(3, 4, P, P, P, generator=g),
        "label": label,
        "masks": masks,
        "labeled": torch.tensor([True, True, False]),
    }


def test_terms_read_the_right_samples():
    model = module()
    b = batch()
    terms = model.training_losses(b)
    assert set(terms) == {"seg", "csc", "cac"}
    out = model.net(b["image"], b["masks"][:, 0])
    mask = b["masks"][:, 0]
    lab_losses = [
        model.seg_loss(out.aux_logits[m][s : s + 1], b["label"][s : s + 1])
        for s, m in [(0, 0), (0, 1), (0, 3)]
    ]
    # per-modality batch Dice over the labeled samples having it, weighted by their share, / mean branches
    flair = model.seg_loss(out.aux_logits[0][:2], b["label"][:2])
    expected_seg = (flair + (lab_losses[1] + lab_losses[2]) / 2) * 2 / 4
    assert terms["seg"].item() == pytest.approx(expected_seg.item(), rel=1e-4)
    w_csc, w_cac = math.exp(-5), 1.0  # epoch 0 of a 10-epoch ramp
    expected_csc = w_csc * csc_loss(out.modality_features[2:], mask[2:])
    expected_cac = w_cac * cac_loss(torch.stack(out.aux_logits, dim=1)[2:], mask[2:])
    assert terms["csc"].item() == pytest.approx(expected_csc.item(), rel=1e-4)
    assert terms["cac"].item() == pytest.approx(expected_cac.item(), rel=1e-4)


def test_unlabeled_samples_train_the_encoder_only_after_the_warmup():
    b = batch()
    b["labeled"] = torch.tensor([False, False, False])
    model = module(warmup_epochs=0)
    total = torch.stack(list(model.training_losses(b).values())).sum()
    total.backward()
    grad = model.net.encoder.stages[0].down.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0

    warm = module(warmup_epochs=3)
    terms = warm.training_losses(b)
    assert set(terms) == {"seg"} and terms["seg"].item() == 0.0


def test_schedules_follow_the_config():
    model = module(warmup_epochs=4, ramp_epochs=10)
    assert model.consistency_weights(3) == (0.0, 0.0)
    csc, cac = model.consistency_weights(7)
    assert csc == pytest.approx(math.exp(-5 * 0.3**2)) and cac == pytest.approx(
        0.5 * (math.cos(0.7 * math.pi) + 1)
    )
    assert model.consistency_weights(12) == pytest.approx((1.0, 0.0))
    with pytest.raises(ValueError, match="ramp_epochs"):
        module(ramp_epochs=None).ramp_length()
    by_epochs = module(ramp_epochs=None)
    by_epochs._trainer = SimpleNamespace(max_epochs=12, max_steps=-1)
    assert by_epochs.ramp_length() == 12
    by_steps = module(ramp_epochs=None)  # a run bounded by steps: 10 steps of 4 batches, 2 per step
    by_steps._trainer = SimpleNamespace(
        max_epochs=-1, max_steps=10, num_training_batches=4, accumulate_grad_batches=2
    )
    assert by_steps.ramp_length() == 5
    with pytest.raises(ValueError, match="w_csc"):
        module(w_csc=-1.0)


def test_consistency_on_labeled_uses_every_sample():
    b = batch()
    model = module(consistency_on_labeled=True)
    out = model.net(b["image"], b["masks"][:, 0])
    expected = math.exp(-5) * csc_loss(out.modality_features, b["masks"][:, 0])
    assert model.training_losses(b)["csc"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_loss_terms_analysis_shows_csc_and_cac_passing_gradient():
    """The per-term gradient check (`smml analyze loss-terms`) on a CMC model: with every term on, CSC and
    CAC reach the network from the unlabeled sample, each with a non-zero gradient norm and a cosine with
    the segmentation gradient that matches one computed by hand; during the warm-up (as trained) they
    are absent."""
    from contextlib import nullcontext

    from smml_lightning.analysis.loss_terms import all_terms_on, gradient_stats

    model = module(warmup_epochs=5, ramp_epochs=10)
    assert set(gradient_stats(model, [batch()], nullcontext)) == {"seg"}
    all_terms_on(model)
    stats = gradient_stats(model, [batch()], nullcontext)
    assert set(stats) == {"seg", "csc", "cac"}
    b = batch()
    out = model.net(b["image"], b["masks"][:, 0])
    mask = b["masks"][:, 0]
    assert stats["csc"][0] == pytest.approx(csc_loss(out.modality_features[2:], mask[2:]).item(), rel=1e-4)
    assert stats["cac"][0] == pytest.approx(
        cac_loss(torch.stack(out.aux_logits, dim=1)[2:], mask[2:]).item(), rel=1e-4
    )
    assert all(norm > 0 for _, norm, _ in stats.values())
    # The cosine by hand, over the parameter tensors both gradients reach (non-zero in both).
    terms = model.training_losses(batch())
    params = [p for p in model.net.parameters() if p.requires_grad]

    def grads(term: str) -> list[torch.Tensor]:
        found = torch.autograd.grad(terms[term], params, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]

    assert stats["seg"][2] == pytest.approx(1.0, abs=1e-5)
    seg = grads("seg")
    for term in ("csc", "cac"):
        pairs = [(a, b) for a, b in zip(grads(term), seg) if a.abs().sum() > 0 and b.abs().sum() > 0]
        assert pairs  # they meet somewhere (the encoder)
        x, y = torch.cat([a.reshape(-1) for a, _ in pairs]), torch.cat([b.reshape(-1) for _, b in pairs])
        expected = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
        assert stats[term][2] == pytest.approx(expected, abs=1e-4)
