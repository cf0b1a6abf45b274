"""Hierarchical Consistency Constraints against hand computations on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smml_lightning.losses.hcc import (
    bidirectional_pixel_consistency,
    class_prototypes,
    class_similarity,
    class_weights,
    inter_class_relation,
    inter_sample_relation,
    pixel_level_consistency,
    sample_similarity,
)


def _kl(p_logits: list[float], q_logits: list[float], t: float) -> float:
    """T^2 * KL(softmax(p/T) || softmax(q/T)) for one voxel, by hand."""
    p = [math.exp(v / t) for v in p_logits]
    q = [math.exp(v / t) for v in q_logits]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    return t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# Four voxels, two classes. Teacher argmax: [0, 1, 1, 0]; label: [0, 1, 0, 0] -> voxels 0, 1, 3 reliable.
TEACHER = [[2.0, -1.0], [0.1, 0.9], [-0.5, 1.0], [1.2, 0.3]]
STUDENT = [[0.3, 0.4], [1.0, -1.0], [0.0, 2.0], [0.6, -0.2]]  # argmax [1, 0, 1, 0]
LABEL = [0, 1, 0, 0]


def _vol(voxels: list[list[float]], requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(voxels).T.reshape(1, 2, 4, 1, 1).clone().requires_grad_(requires_grad)


def _label(values: list[int]) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, 4, 1, 1)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_pixel_level_averages_kl_over_reliable_voxels(t: float) -> None:
    expected = sum(_kl(TEACHER[v], STUDENT[v], t) for v in (0, 1, 3)) / 3
    value = pixel_level_consistency(_vol(STUDENT), _vol(TEACHER), _label(LABEL), temperature=t)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_pixel_level_temperature_softens_and_rescales() -> None:
    # Softening shrinks the divergence and T^2 rescales it: check against the T=1 value explicitly.
    t1 = pixel_level_consistency(_vol(STUDENT), _vol(TEACHER), _label(LABEL), 1.0).item()
    t3 = pixel_level_consistency(_vol(STUDENT), _vol(TEACHER), _label(LABEL), 3.0).item()
    unscaled = sum(_kl(TEACHER[v], STUDENT[v], 3.0) / 9 for v in (0, 1, 3)) / 3
    assert t3 == pytest.approx(9 * unscaled, rel=1e-5)
    assert t3 != pytest.approx(t1, rel=1e-3)


def test_pixel_level_is_zero_when_no_voxel_is_reliable() -> None:
    student = _vol(STUDENT, requires_grad=True)
    value = pixel_level_consistency(student, _vol(TEACHER), _label([1, 0, 0, 1]))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_pixel_level_gradient_reaches_only_the_student_on_reliable_voxels() -> None:
    student, teacher = _vol(STUDENT, requires_grad=True), _vol(TEACHER, requires_grad=True)
    pixel_level_consistency(student, teacher, _label(LABEL)).backward()
    assert teacher.grad is None
    per_voxel = student.grad.abs().sum(dim=1).flatten()
    assert (per_voxel[[0, 1, 3]] > 0).all() and per_voxel[2] == 0


def test_bidirectional_pixel_consistency_sums_both_directions() -> None:
    a, b, label = _vol(STUDENT), _vol(TEACHER), _label(LABEL)
    b_to_a = sum(_kl(TEACHER[v], STUDENT[v], 1.0) for v in (0, 1, 3)) / 3
    a_to_b = _kl(STUDENT[3], TEACHER[3], 1.0)  # the student (as teacher) is right on voxel 3 only
    assert bidirectional_pixel_consistency(a, b, label).item() == pytest.approx(b_to_a + a_to_b, rel=1e-5)


def _cos_matrix(vectors: list[list[float]]) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def test_inter_sample_relation_batch_of_two_by_hand() -> None:
    # Each sample's features vary over 2 voxels; the pooled means are [1, 0], [0, 1] (a) and [1, 0], [1, 1] (b).
    feat_a = torch.tensor([[[2.0, 0.0], [1.0, -1.0]], [[0.5, -0.5], [3.0, 1.0]]]).reshape(2, 2, 2, 1, 1)
    feat_b = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 2.0]]]).reshape(2, 2, 2, 1, 1)
    assert torch.allclose(sample_similarity(feat_a), torch.eye(2), atol=1e-6)
    s = 1 / math.sqrt(2)
    assert torch.allclose(sample_similarity(feat_b), torch.tensor([[1.0, s], [s, 1.0]]), atol=1e-6)
    # Mean squared difference over the 4 entries, once per direction.
    expected = 2 * (2 * s**2 / 4)
    assert inter_sample_relation(feat_a, feat_b).item() == pytest.approx(expected, rel=1e-5)


def test_inter_sample_relation_batch_of_three_by_hand() -> None:
    va = [[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, -1.0]]
    vb = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, -2.0, 1.0]]
    feat_a = torch.tensor(va).reshape(3, 3, 1, 1, 1)
    feat_b = torch.tensor(vb).reshape(3, 3, 1, 1, 1)
    expected = 2 * float(np.mean((_cos_matrix(va) - _cos_matrix(vb)) ** 2))
    assert inter_sample_relation(feat_a, feat_b).item() == pytest.approx(expected, rel=1e-5)


def test_inter_sample_relation_is_mutual() -> None:
    feat_a = torch.randn(3, 4, 2, 2, 2, requires_grad=True)
    feat_b = torch.randn(3, 4, 2, 2, 2, requires_grad=True)
    inter_sample_relation(feat_a, feat_b).backward()
    assert feat_a.grad.abs().sum() > 0 and feat_b.grad.abs().sum() > 0


def test_inter_sample_relation_batch_of_one_is_zero_with_a_graph() -> None:
    feat_a = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    feat_b = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    value = inter_sample_relation(feat_a, feat_b)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(feat_a.grad, torch.zeros_like(feat_a))


# Inter-class example at label resolution: labels [0, 1, 1, 3] over four voxels (class 2 absent).
CLASS_LABEL = [0, 1, 1, 3]
FEAT_A = [[1.0, 0.0], [0.0, 2.0], [2.0, 2.0], [-1.0, 1.0]]
FEAT_B = [[0.0, 1.0], [1.0, 1.0], [1.0, 3.0], [2.0, 0.5]]


def _feat(voxels: list[list[float]]) -> torch.Tensor:
    return torch.tensor(voxels).T.reshape(1, 2, 4, 1, 1).clone()


def test_class_prototypes_and_cosine_matrix_by_hand() -> None:
    weights = class_weights(_label(CLASS_LABEL), (4, 1, 1))
    prototypes, present = class_prototypes(_feat(FEAT_A), weights)
    assert present.tolist() == [True, True, False, True]
    by_hand = [FEAT_A[0], [1.0, 2.0], FEAT_A[3]]  # class 1 = mean of voxels 1 and 2
    assert torch.allclose(prototypes, torch.tensor(by_hand))
    assert np.allclose(class_similarity(_feat(FEAT_A), weights).numpy(), _cos_matrix(by_hand), atol=1e-6)


def test_inter_class_relation_by_hand_excludes_the_absent_class() -> None:
    protos_a = [FEAT_A[0], [1.0, 2.0], FEAT_A[3]]
    protos_b = [FEAT_B[0], [1.0, 2.0], FEAT_B[3]]
    expected = 2 * float(np.mean((_cos_matrix(protos_a) - _cos_matrix(protos_b)) ** 2))
    value = inter_class_relation(_feat(FEAT_A), _feat(FEAT_B), _label(CLASS_LABEL))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_class_weights_area_downsampling_keeps_a_single_voxel_class() -> None:
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, 3, 0, 1] = 3  # one ET voxel: nearest-neighbour downsampling by 2 could drop it
    weights = class_weights(label, (2, 2, 2))
    assert weights[0, 3, 1, 0, 0].item() == pytest.approx(1 / 8)
    assert weights[0, 3].sum().item() == pytest.approx(1 / 8)
    assert weights[0, 0, 1, 0, 0].item() == pytest.approx(7 / 8)
    assert torch.allclose(weights.sum(dim=1), torch.ones(1, 2, 2, 2))


@pytest.mark.parametrize(
    "label",
    [
        torch.zeros(1, 1, 4, 4, 4, dtype=torch.long),  # all background: one class present
        torch.full((1, 1, 4, 4, 4), 2, dtype=torch.long),  # one tumor class filling the patch
    ],
)
def test_inter_class_relation_with_fewer_than_two_classes_is_zero_without_nan(label: torch.Tensor) -> None:
    feat_a = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    feat_b = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    value = inter_class_relation(feat_a, feat_b, label)
    assert value.item() == 0.0
    value.backward()
    assert torch.isfinite(feat_a.grad).all() and feat_a.grad.abs().sum() == 0


def test_inter_class_relation_has_no_nan_for_zero_features_and_batch_of_one() -> None:
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, :2] = 1
    label[0, 0, 0, 0, 0] = 3
    feat_a = torch.zeros(1, 3, 2, 2, 2, requires_grad=True)
    feat_b = torch.randn(1, 3, 2, 2, 2, requires_grad=True)
    value = inter_class_relation(feat_a, feat_b, label)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(feat_a.grad).all() and torch.isfinite(feat_b.grad).all()
    assert feat_b.grad.abs().sum() > 0


def test_feature_terms_reject_mismatched_branches() -> None:
    with pytest.raises(ValueError, match="inter_sample_relation"):
        inter_sample_relation(torch.zeros(2, 3, 2, 2, 2), torch.zeros(2, 4, 2, 2, 2))
