"""The MAML LightningModule's loss composition."""

import pytest
import torch
import torch.nn.functional as F

from smml_lightning.lit.baselines import MAMLModule
from smml_lightning.models.maml import MAML

P = 32


def test_each_modality_model_gets_nnunets_deep_supervision_loss():
    """Per modality model: full-resolution output and the 1/2, 1/4, 1/8 outputs weighted 8:4:2:1 / 15."""
    torch.manual_seed(0)
    model = MAMLModule(network=lambda: MAML(base_width=2), roi_size=P, channels_last=False, warmup_epochs=0)
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (2, 1, P, P, P), generator=g)
    batch = {
        "image": torch.randn(2, 4, P, P, P, generator=g),
        "label": label,
        "masks": torch.ones(2, 1, 4, dtype=torch.bool),
    }
    terms = model.training_losses(batch)
    assert set(terms) == {"seg_fused", "seg_modality", "seg_deep", "mutual"}

    model.net.train()
    with torch.no_grad():
        enc = model.net.encode(batch["image"])
    own = enc.logits.unflatten(1, (4, -1))
    expected = 0.0
    for m in range(4):
        expected += 8 / 15 * model.seg_loss(own[:, m], label)
        for level, weight in zip(enc.deep_logits, (1 / 15, 2 / 15, 4 / 15)):  # coarsest first
            logits = level.unflatten(1, (4, -1))[:, m]
            target = F.interpolate(label.float(), size=logits.shape[2:], mode="nearest-exact").long()
            expected += weight * model.seg_loss(logits, target)
    total = terms["seg_modality"] + terms["seg_deep"]
    assert total.item() == pytest.approx(float(expected), rel=1e-5)


def test_modality_models_are_supervised_on_every_sample_whatever_the_mask():
    """The mask simulates missing modalities for the fusion and the mutual term only: each modality
    model's losses (full resolution and deep supervision) are the same under any mask, while the fused
    and mutual terms change; a masked modality's full-resolution head still learns."""
    torch.manual_seed(0)
    model = MAMLModule(network=lambda: MAML(base_width=2), roi_size=P, channels_last=False, warmup_epochs=0)
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(2, 4, P, P, P, generator=g),
        "label": torch.randint(0, 4, (2, 1, P, P, P), generator=g),
        "masks": torch.ones(2, 1, 4, dtype=torch.bool),
    }
    full = model.training_losses(batch)
    batch["masks"] = torch.tensor([[[True, False, False, True]], [[False, True, False, False]]])
    partial = model.training_losses(batch)
    for term in ("seg_modality", "seg_deep"):
        torch.testing.assert_close(partial[term], full[term])
    for term in ("seg_fused", "mutual"):
        assert abs(partial[term].item() - full[term].item()) > 1e-4, term
    partial["seg_modality"].backward()
    head = model.net.decoder.head.weight.grad.unflatten(0, (4, -1))  # grouped 1x1x1 conv, modality-major
    assert head[2].abs().sum() > 0  # T1: masked in both samples
