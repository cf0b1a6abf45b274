"""Dice + CE, deep supervision and masked auxiliary losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from smml_lightning.losses.segmentation import (
    SegmentationLoss,
    deep_supervision_loss,
    halving_weights,
    masked_aux_loss,
)


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_dice_ce_matches_manual_formula_on_two_voxels() -> None:
    # Three classes, two voxels with labels 1 and 2; logits per voxel (class-major below).
    voxel_logits = [[0.2, 1.5, -0.3], [1.0, -0.5, 0.7]]
    labels = [1, 2]
    logits = torch.tensor(voxel_logits).T.reshape(1, 3, 2, 1, 1)
    label = torch.tensor(labels).reshape(1, 1, 2, 1, 1)

    probs = [_softmax(v) for v in voxel_logits]
    ce = sum(-math.log(p[y]) for p, y in zip(probs, labels)) / 2
    smooth = 1.0
    dice_terms = []
    for c in (1, 2):  # background excluded
        inter = sum(p[c] for p, y in zip(probs, labels) if y == c)
        psum = sum(p[c] for p in probs)
        gsum = sum(1 for y in labels if y == c)
        dice_terms.append(1 - (2 * inter + smooth) / (psum + gsum + smooth))
    expected = ce + sum(dice_terms) / 2

    assert SegmentationLoss()(logits, label).item() == pytest.approx(expected, rel=1e-5)


def test_dice_ce_pools_the_batch_before_the_ratio() -> None:
    # Class 1 only in sample 0, class 2 only in sample 1: batch Dice pools them into one ratio each.
    logits = torch.tensor([[[2.0], [0.0], [0.0]], [[0.0], [0.0], [1.0]]]).reshape(2, 3, 1, 1, 1)
    label = torch.tensor([1, 2]).reshape(2, 1, 1, 1, 1)
    p = torch.softmax(logits.reshape(2, 3), dim=1)
    dice = sum(1 - (2 * p[i, c] + 1) / (p[:, c].sum() + 1 + 1) for i, c in ((0, 1), (1, 2))) / 2
    ce = -(p[0, 1].log() + p[1, 2].log()) / 2
    assert SegmentationLoss()(logits, label).item() == pytest.approx((dice + ce).item(), rel=1e-5)


def test_dice_ce_with_absent_classes_is_finite_and_zero_for_an_empty_prediction() -> None:
    label = torch.zeros(1, 1, 3, 3, 3, dtype=torch.long)  # background only: classes 1..3 absent
    confident = torch.zeros(1, 4, 3, 3, 3)
    confident[:, 0] = 30.0
    assert SegmentationLoss()(confident, label).item() < 1e-6

    # Dice part alone, uniform prediction: each absent class has sum p = 27 / 4 and no truth voxels,
    # so its term is 1 - 1 / (1 + 6.75) by the smoothed formula.
    unsure = torch.zeros(1, 4, 3, 3, 3, requires_grad=True)
    loss = SegmentationLoss(lambda_ce=0.0)(unsure, label)
    assert loss.item() == pytest.approx(1 - 1 / 7.75, rel=1e-6)
    loss.backward()
    assert torch.isfinite(unsure.grad).all()
    # Spurious mass on absent classes is pushed down with a gradient that does not vanish.
    assert (unsure.grad[:, 1:] > 1e-4).all()


def test_class_weighted_ce_weighs_each_voxel_by_one_minus_its_class_share_per_sample() -> None:
    # Sample 0: labels 0, 0, 0, 1 (shares 3/4, 1/4); sample 1: labels 2, 2, 0, 2 (shares 1/4, 3/4).
    labels = [[0, 0, 0, 1], [2, 2, 0, 2]]
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 1, 1)
    label = torch.tensor(labels).reshape(2, 1, 4, 1, 1)
    total = 0.0
    for b, row in enumerate(labels):
        for v, y in enumerate(row):
            p = _softmax(logits[b, :, v, 0, 0].tolist())
            total += (1 - row.count(y) / 4) * -math.log(p[y])
    expected = total / 8  # mean over every voxel of the batch, as the public code
    loss = SegmentationLoss(lambda_dice=0.0, class_weighted_ce=True)(logits, label)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Unweighted, the same voxels give the plain mean cross-entropy.
    plain = SegmentationLoss(lambda_dice=0.0)(logits, label)
    assert plain.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, label[:, 0]).item(), rel=1e-6
    )


def test_public_code_loss_matches_its_per_class_formula() -> None:
    # mmFormer's criterions written out per class on one-hot targets: weighted CE + batch Dice averaged
    # over all classes, background included (smoothing 1 here instead of its eps).
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5, 4, 3)
    label = torch.randint(0, 4, (2, 1, 5, 4, 3))
    prob = torch.softmax(logits, 1)
    target = torch.nn.functional.one_hot(label[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    cross, dice = 0.0, 0.0
    for c in range(4):
        share = target[:, c].sum((1, 2, 3)) / target.sum((1, 2, 3, 4))
        cross = cross - ((1 - share).view(-1, 1, 1, 1) * target[:, c] * prob[:, c].log())
        dice = dice + (2 * (prob[:, c] * target[:, c]).sum() + 1) / (
            prob[:, c].sum() + target[:, c].sum() + 1
        )
    expected = cross.mean() + 1 - dice / 4
    loss = SegmentationLoss(include_background=True, class_weighted_ce=True)(logits, label)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dice_ce_rejects_a_label_without_channel_axis() -> None:
    with pytest.raises(ValueError, match="label must be"):
        SegmentationLoss()(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long))


def test_deep_supervision_downsamples_labels_by_nearest_neighbour_and_sums() -> None:
    label = torch.randint(0, 4, (2, 1, 4, 4, 4))
    seen: list[torch.Tensor] = []

    def recording_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(target)
        return torch.tensor(float(logits.shape[2]))

    outputs = [torch.zeros(2, 4, 1, 1, 1), torch.zeros(2, 4, 2, 2, 2), torch.zeros(2, 4, 4, 4, 4)]
    value = deep_supervision_loss(recording_loss, outputs, label)
    assert value.item() == pytest.approx(1 + 2 + 4)
    # Voxel-centre sampling: a factor-2 reduction keeps voxels 1 and 3 along each axis.
    assert torch.equal(seen[1], label[:, :, 1::2, 1::2, 1::2])
    assert torch.equal(seen[0], label[:, :, 2:3, 2:3, 2:3])
    assert torch.equal(seen[2], label)
    assert all(t.dtype == torch.long for t in seen)


def test_deep_supervision_with_dice_ce_matches_explicit_sum() -> None:
    label = torch.randint(0, 4, (1, 1, 4, 4, 4))
    outputs = [torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 4, 4, 4)]
    loss_fn = SegmentationLoss()
    expected = loss_fn(outputs[0], label[:, :, 1::2, 1::2, 1::2]) + loss_fn(outputs[1], label)
    assert deep_supervision_loss(loss_fn, outputs, label).item() == pytest.approx(expected.item(), rel=1e-6)


def test_halving_weights_are_nnunets_and_weight_the_outputs() -> None:
    # nnU-Net: 1, 1/2, 1/4, 1/8 normalised to sum 1 (full resolution first)
    assert halving_weights(4) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert halving_weights(1) == [1.0]
    with pytest.raises(ValueError, match="at least one"):
        halving_weights(0)

    def by_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.tensor(float(logits.shape[2]))

    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    outputs = [torch.zeros(1, 4, 1, 1, 1), torch.zeros(1, 4, 2, 2, 2)]
    assert deep_supervision_loss(by_size, outputs, label, [0.25, 0.5]).item() == pytest.approx(
        0.25 * 1 + 0.5 * 2
    )
    with pytest.raises(ValueError, match="1 weights for 2 outputs"):
        deep_supervision_loss(by_size, outputs, label, [1.0])


def test_masked_aux_loss_ignores_missing_pairs_in_value_and_gradient() -> None:
    torch.manual_seed(0)
    label = torch.randint(0, 4, (2, 1, 3, 3, 3))
    aux = [torch.randn(2, 4, 3, 3, 3, requires_grad=True) for _ in range(4)]
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    loss_fn = SegmentationLoss()

    value = masked_aux_loss(loss_fn, aux, label, mask)
    # Modalities 0, 1, 2 are scored on one sample of two (half weight), modality 3 on both (batch Dice).
    one = [(0, 0), (1, 1), (1, 2)]
    expected = sum(loss_fn(aux[m][b : b + 1], label[b : b + 1]) for b, m in one) / 2 + loss_fn(aux[3], label)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)

    value.backward()
    for m in range(4):
        for b in range(2):
            grad_norm = aux[m].grad[b].abs().sum().item()
            if mask[b, m]:
                assert grad_norm > 0, f"available pair ({b}, {m}) got no gradient"
            else:
                assert grad_norm == 0, f"missing pair ({b}, {m}) got a gradient"


def test_masked_aux_loss_with_every_modality_scored_is_the_sum_of_the_four_losses() -> None:
    torch.manual_seed(1)
    label = torch.randint(0, 4, (2, 1, 4, 4, 4))
    aux = [torch.randn(2, 4, 4, 4, 4) for _ in range(4)]
    loss_fn = SegmentationLoss()
    expected = sum(loss_fn(a, label) for a in aux)  # mmFormer's sep_loss: one batch loss per modality
    value = masked_aux_loss(loss_fn, aux, label, torch.ones(2, 4, dtype=torch.bool))
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_aux_loss_without_available_pairs_is_zero_with_a_graph() -> None:
    aux = [torch.randn(1, 4, 2, 2, 2, requires_grad=True) for _ in range(4)]
    value = masked_aux_loss(
        SegmentationLoss(),
        aux,
        torch.zeros(1, 1, 2, 2, 2, dtype=torch.long),
        torch.zeros(1, 4, dtype=torch.bool),
    )
    assert value.item() == 0.0
    value.backward()
    assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in aux)


def test_masked_aux_loss_rejects_a_mask_of_the_wrong_width() -> None:
    aux = [torch.zeros(1, 4, 2, 2, 2)] * 4
    with pytest.raises(ValueError, match=r"mask must be \(B, 4\)"):
        masked_aux_loss(
            SegmentationLoss(),
            aux,
            torch.zeros(1, 1, 2, 2, 2, dtype=torch.long),
            torch.ones(1, 3, dtype=torch.bool),
        )
