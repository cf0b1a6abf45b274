"""MAML mutual loss: two-way KL over available (sample, modality) pairs only."""

from __future__ import annotations

import math

import pytest
import torch

from smml_lightning.losses.mutual import modality_mutual_loss


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Voxel-mean KL(softmax(p) || softmax(q)) for (C, V) logits, in plain Python."""
    total = 0.0
    for v in range(p_logits.shape[1]):
        p = [math.exp(x) for x in p_logits[:, v].tolist()]
        q = [math.exp(x) for x in q_logits[:, v].tolist()]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        total += sum(a * math.log(a / b) for a, b in zip(p, q))
    return total / p_logits.shape[1]


def test_mutual_loss_averages_two_way_kl_over_available_pairs() -> None:
    torch.manual_seed(1)
    fused = torch.randn(2, 3, 2, 1, 1)
    modality = [torch.randn(2, 3, 2, 1, 1) for _ in range(4)]
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    pairs = [(0, 0), (0, 2), (1, 3)]
    expected = 0.0
    for b, m in pairs:
        f, x = fused[b].reshape(3, 2), modality[m][b].reshape(3, 2)
        expected += _kl(f, x) + _kl(x, f)
    expected /= len(pairs)
    assert modality_mutual_loss(fused, modality, mask).item() == pytest.approx(expected, rel=1e-5)


def test_mutual_loss_gives_no_gradient_to_missing_modalities() -> None:
    fused = torch.randn(2, 3, 2, 2, 2, requires_grad=True)
    modality = [torch.randn(2, 3, 2, 2, 2, requires_grad=True) for _ in range(4)]
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    modality_mutual_loss(fused, modality, mask).backward()
    for m in range(4):
        for b in range(2):
            moved = modality[m].grad[b].abs().sum().item() > 0
            assert moved == bool(mask[b, m]), (
                f"sample {b}, modality {m}: gradient {moved}, available {bool(mask[b, m])}"
            )
    assert (fused.grad.flatten(1).abs().sum(dim=1) > 0).all()


def test_mutual_loss_temperature_scaling() -> None:
    fused = torch.randn(1, 3, 2, 2, 2)
    modality = [torch.randn(1, 3, 2, 2, 2) for _ in range(4)]
    mask = torch.tensor([[True, True, False, False]])
    # T^2 * KL of softened logits equals T^2 * KL of the logits divided by T.
    scaled = modality_mutual_loss(fused / 2.0, [x / 2.0 for x in modality], mask)
    assert modality_mutual_loss(fused, modality, mask, temperature=2.0).item() == pytest.approx(
        4 * scaled.item(), rel=1e-5
    )
