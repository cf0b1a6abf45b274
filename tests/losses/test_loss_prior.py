"""Prior consistency: value by hand on the refiner's reliable voxels, gradient into the fused prediction only."""

from __future__ import annotations

import math

import pytest
import torch

from smml_lightning.losses.prior import prior_consistency


def _probs(logits: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in logits]
    return [v / sum(e) for v in e]


FUSED = [[0.5, -0.2, 1.0], [2.0, 0.1, -1.0]]  # two voxels, three classes
REFINED = [[1.0, 0.0, 0.0], [0.0, 1.5, 0.2]]  # argmax: class 0, class 1
BOTH_RIGHT = torch.tensor([0, 1]).reshape(1, 1, 2, 1, 1)


def _vol(voxels: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(voxels).T.reshape(1, 3, 2, 1, 1).clone().requires_grad_(requires_grad)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_prior_consistency_is_kl_refined_to_fused_by_hand(t: float) -> None:
    expected = 0.0
    for f, r in zip(FUSED, REFINED):
        p_r, p_f = _probs(r, t), _probs(f, t)
        expected += t * t * sum(a * math.log(a / b) for a, b in zip(p_r, p_f))
    expected /= 2
    got = prior_consistency(_vol(FUSED), _vol(REFINED), BOTH_RIGHT, temperature=t).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_prior_consistency_skips_voxels_the_refiner_gets_wrong() -> None:
    """Only the first voxel is reliable when the label says class 2 at the second."""
    f, r = FUSED[0], REFINED[0]
    p_r, p_f = _probs(r, 1.0), _probs(f, 1.0)
    expected = sum(a * math.log(a / b) for a, b in zip(p_r, p_f))
    label = torch.tensor([0, 2]).reshape(1, 1, 2, 1, 1)
    assert prior_consistency(_vol(FUSED), _vol(REFINED), label).item() == pytest.approx(expected, rel=1e-5)
    nowhere = torch.tensor([2, 2]).reshape(1, 1, 2, 1, 1)
    fused = _vol(FUSED, requires_grad=True)
    loss = prior_consistency(fused, _vol(REFINED), nowhere)
    loss.backward()
    assert loss.item() == 0.0 and fused.grad.abs().sum() == 0


def test_prior_consistency_gradient_goes_to_fused_only() -> None:
    fused, refined = _vol(FUSED, requires_grad=True), _vol(REFINED, requires_grad=True)
    prior_consistency(fused, refined, BOTH_RIGHT).backward()
    assert refined.grad is None
    assert fused.grad.abs().sum() > 0


def test_prior_consistency_is_zero_for_equal_predictions() -> None:
    assert prior_consistency(
        _vol(FUSED), _vol(FUSED), torch.zeros(1, 1, 2, 1, 1, dtype=torch.long)
    ).item() == pytest.approx(0.0, abs=1e-7)


def test_prior_consistency_averages_over_reliable_voxels_by_hand() -> None:
    """Three reliable voxels, two of class 0 and one of class 1: one mean over the three voxels."""
    fused = [[0.5, -0.2, 1.0], [2.0, 0.1, -1.0], [0.3, 0.3, 0.0]]
    refined = [[1.0, 0.0, 0.0], [0.0, 1.5, 0.2], [2.0, 0.0, 0.5]]  # argmax 0, 1, 0
    label = torch.tensor([0, 1, 0]).reshape(1, 1, 3, 1, 1)
    kl = [
        sum(a * math.log(a / b) for a, b in zip(_probs(r, 1.0), _probs(f, 1.0)))
        for f, r in zip(fused, refined)
    ]

    def vol(voxels):
        return torch.tensor(voxels).T.reshape(1, 3, 3, 1, 1)

    assert prior_consistency(vol(fused), vol(refined), label).item() == pytest.approx(sum(kl) / 3, rel=1e-5)
