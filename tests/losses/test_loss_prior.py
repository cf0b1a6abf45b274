"""Prior consistency: value by hand, gradient into the fused prediction only."""

from __future__ import annotations

import math

import pytest
import torch

from smml_lightning.losses.prior import prior_consistency


def _probs(logits: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in logits]
    return [v / sum(e) for v in e]


FUSED = [[0.5, -0.2, 1.0], [2.0, 0.1, -1.0]]  # two voxels, three classes
REFINED = [[1.0, 0.0, 0.0], [0.0, 1.5, 0.2]]


def _vol(voxels: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(voxels).T.reshape(1, 3, 2, 1, 1).clone().requires_grad_(requires_grad)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_prior_consistency_is_kl_refined_to_fused_by_hand(t: float) -> None:
    expected = 0.0
    for f, r in zip(FUSED, REFINED):
        p_r, p_f = _probs(r, t), _probs(f, t)
        expected += t * t * sum(a * math.log(a / b) for a, b in zip(p_r, p_f))
    expected /= 2
    assert prior_consistency(_vol(FUSED), _vol(REFINED), temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_prior_consistency_gradient_goes_to_fused_only() -> None:
    fused, refined = _vol(FUSED, requires_grad=True), _vol(REFINED, requires_grad=True)
    prior_consistency(fused, refined).backward()
    assert refined.grad is None
    assert fused.grad.abs().sum() > 0


def test_prior_consistency_is_zero_for_equal_predictions() -> None:
    assert prior_consistency(_vol(FUSED), _vol(FUSED)).item() == pytest.approx(0.0, abs=1e-7)
