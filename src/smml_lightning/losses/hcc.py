"""Hierarchical Consistency Constraints (HCC) between SMML's two peer branches.

Pixel level: each branch teaches the other with a temperature-softened KL divergence, restricted to
the voxels where the teaching branch is right (the public SMML code passes the ground truth to this
loss). Feature level: relations rather than raw features are matched at the fused bottleneck, since
the two branches see different modality subsets and need not share a feature basis: the similarity
between the samples of a batch (inter-sample) and between class prototypes (inter-class). The
features are the fused inter-modal features before any normalisation (the public code's
``x5_inter``; ``SegmentationOutput.bottleneck``): pooled over space, an instance-normalised map is
nearly the same vector for every sample, and the inter-sample relation on it would pass on nothing.

Every "mutual" match here is symmetric: each direction treats the other branch as a fixed target
(``detach``), and the two directions are summed, so each branch receives the full gradient of
matching the other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.models.base import predicted_labels


def softened_kl(
    target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Voxel-wise ``T^2 * KL(p_target || p_input)`` with both softmaxes softened by ``T``; shape ``(B, *S)``.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    Nothing is detached here: callers decide which side is the teacher.
    """
    if target_logits.shape != input_logits.shape:
        raise ValueError(
            f"softened_kl: logits shapes differ, {tuple(target_logits.shape)} vs {tuple(input_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"softened_kl: temperature must be positive, got {temperature}")
    log_p_target = F.log_softmax(target_logits / temperature, dim=1)
    log_p_input = F.log_softmax(input_logits / temperature, dim=1)
    kl = F.kl_div(log_p_input, log_p_target, reduction="none", log_target=True).sum(dim=1)
    return kl * temperature**2


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar zero connected to ``tensors`` so that ``backward`` still runs (with zero gradients)."""
    return torch.stack([t.sum() for t in tensors]).sum() * 0.0


def pixel_level_consistency(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    label: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` averaged over the teacher's reliable voxels.

    A voxel is reliable when the teacher's argmax equals the label: a wrong teacher would only pass on
    its mistakes. The teacher is detached, so only the student learns from this term. Zero (with the
    graph intact) when the teacher is right nowhere.
    """
    if label.shape[0] != student_logits.shape[0] or label.shape[2:] != student_logits.shape[2:]:
        raise ValueError(
            f"pixel_level_consistency: label {tuple(label.shape)} does not match logits {tuple(student_logits.shape)}"
        )
    teacher_logits = teacher_logits.detach()
    reliable = predicted_labels(teacher_logits) == label[:, 0]
    if not bool(reliable.any()):
        return _zero_like_graph(student_logits)
    return softened_kl(teacher_logits, student_logits, temperature)[reliable].mean()


def bidirectional_pixel_consistency(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    label: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sum of both directions: ``b`` teaches ``a`` on ``b``'s reliable voxels and vice versa."""
    a_learns = pixel_level_consistency(logits_a, logits_b, label, temperature)
    b_learns = pixel_level_consistency(logits_b, logits_a, label, temperature)
    return a_learns + b_learns


def _mutual_match(rel_a: torch.Tensor, rel_b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two relation matrices, each side matched to the other held fixed."""
    return F.mse_loss(rel_a, rel_b.detach()) + F.mse_loss(rel_b, rel_a.detach())


def _check_pair(name: str, feat_a: torch.Tensor, feat_b: torch.Tensor) -> None:
    if feat_a.shape != feat_b.shape or feat_a.dim() < 3:
        raise ValueError(
            f"{name}: both branches' features must be (B, F, *spatial) of one shape, "
            f"got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
        )


def gather_across_ranks(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' ``rows`` stacked in rank order, ``(sum of B_r, ...)``; the identity outside DDP.

    Differentiable (``torch.distributed.nn``): each rank's loss also sends gradient to the rows it
    received from the others, so under DDP's gradient averaging a relation over the gathered rows has
    the gradient of the same relation computed in one process on the global batch. Ranks may hold
    different numbers of rows (a short last batch): rows are padded to the largest count for the
    collective and the padding is cut off again.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, max(sizes) - rows.shape[0]))
    gathered = dist_nn.all_gather(padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])


def sample_similarity(feat: torch.Tensor, across_ranks: bool = False) -> torch.Tensor:
    """Cosine similarity ``(B, B)`` between the samples of a batch, each its globally average-pooled features.

    With ``across_ranks`` under DDP the columns are the global batch's samples (see
    :func:`gather_across_ranks`): this rank's rows of the global matrix. In float32, so a bf16 autocast
    neither rounds the cosines nor reaches the collective.
    """
    rows = F.normalize(feat.flatten(2).float().mean(dim=2), dim=1)
    others = gather_across_ranks(rows) if across_ranks else rows
    return rows @ others.T


def inter_sample_relation(
    feat_a: torch.Tensor, feat_b: torch.Tensor, across_ranks: bool = False
) -> torch.Tensor:
    """Match the two branches' sample similarity matrices (mutual, summed over both directions).

    With a batch of one the only relation is a sample with itself (always 1), which carries no
    information: the term is then zero with the graph intact. That is SMML's setting of one volume per
    GPU unless ``across_ranks`` relates the samples of the global batch (all DDP ranks').
    """
    _check_pair("inter_sample_relation", feat_a, feat_b)
    rel_a = sample_similarity(feat_a, across_ranks)
    if rel_a.shape[1] < 2:
        return _zero_like_graph(feat_a, feat_b)
    return _mutual_match(rel_a, sample_similarity(feat_b, across_ranks))


def class_weights(
    label: torch.Tensor, size: torch.Size | tuple[int, ...], num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Per-class soft masks ``(B, C, *size)``: the fraction of each feature cell covered by each class.

    The bottleneck is 16x coarser than the label, so nearest-neighbour downsampling would drop small
    regions (a 10-voxel ET focus would usually vanish); area-averaging the one-hot label keeps every
    class that occurs in the patch, weighted by how much of each cell it fills.
    """
    onehot = F.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()
    if tuple(onehot.shape[2:]) == tuple(size):
        return onehot
    return F.interpolate(onehot, size=tuple(size), mode="area")


def class_prototypes(feat: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling over the whole batch: ``(prototypes (C', F), present (C,) bool)``.

    Only classes with positive mass (present in the patch batch) get a prototype.
    """
    mass = weights.flatten(2).sum(dim=(0, 2))
    present = mass > 0
    sums = torch.einsum("bcs,bfs->cf", weights.flatten(2), feat.flatten(2))
    return sums[present] / mass[present, None], present


def class_similarity(feat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(C', C')`` between the prototypes of the classes present."""
    prototypes = F.normalize(class_prototypes(feat, weights)[0], dim=1)
    return prototypes @ prototypes.T


def inter_class_relation(
    feat_a: torch.Tensor, feat_b: torch.Tensor, label: torch.Tensor, num_classes: int = NUM_CLASSES
) -> torch.Tensor:
    """Match the two branches' class-prototype similarity matrices (mutual, summed over both directions).

    Classes absent from the batch are left out; with fewer than two classes present there is no
    relation to match and the term is zero with the graph intact. Normalisation uses an epsilon, so
    all-zero features give zero similarities rather than NaN.
    """
    _check_pair("inter_class_relation", feat_a, feat_b)
    if label.shape[0] != feat_a.shape[0] or label.dim() != feat_a.dim() or label.shape[1] != 1:
        raise ValueError(
            f"inter_class_relation: label must be (B, 1, *S) for features {tuple(feat_a.shape)}, got {tuple(label.shape)}"
        )
    weights = class_weights(label, feat_a.shape[2:], num_classes)
    if int((weights.flatten(2).sum(dim=(0, 2)) > 0).sum()) < 2:
        return _zero_like_graph(feat_a, feat_b)
    return _mutual_match(class_similarity(feat_a, weights), class_similarity(feat_b, weights))
