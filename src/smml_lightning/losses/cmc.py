"""CMC's cross-modality terms: channel-wise semantic consistency (CSC) and cross-modality agreement (CAC).

Both compare two branches (modalities) of the same case and are averaged over the available pairs of
each sample (a pair counts when both modalities are available). Fixes to the public code
(``main.py``), each documented where it is made:

* CSC is NT-Xent over the bottleneck's channels, computed as one normalised matrix product per sample
  and pair. The public call of MONAI's ``ContrastiveLoss`` reshapes ``(C, D, H, W)`` to ``(-1, C)``
  without a permute (so its "channels" are slices of voxels) and builds a ``2n x 2n x F`` tensor in
  ``cosine_similarity`` (8192 x 8192 x 512 at a 16^3 bottleneck: the out-of-memory users report).
* CAC is a loss, one minus the soft Dice between the branches' softmax probabilities; the public code
  adds the Dice *similarity* of raw outputs with a positive weight, which would push branches apart.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F


def channel_nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Per-sample NT-Xent between the channels of two feature maps ``(N, C, *s)``; returns ``(N,)``.

    Each channel is a vector over the voxels, L2-normalised. The 2C vectors of a sample form the
    views; channel ``c`` of ``a`` and channel ``c`` of ``b`` are a positive pair, every other vector a
    negative. For view ``i`` with partner ``j``: ``-log(exp(s_ij / T) / sum_{k != i} exp(s_ik / T))``, with
    ``s`` the cosine similarity; the loss is the mean over the 2C views (SimCLR's NT-Xent, the value of
    MONAI's ``ContrastiveLoss`` on the ``(C, voxels)`` matrices). Computed in float32.
    """
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(
            f"channel_nt_xent: need two (N, C, *s) tensors of one shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"channel_nt_xent: temperature must be > 0, got {temperature}")
    n, c = a.shape[:2]
    with torch.autocast(a.device.type, enabled=False):
        views = F.normalize(torch.cat([a.flatten(2), b.flatten(2)], dim=1).float(), dim=-1)  # (N, 2C, L)
        sim = torch.bmm(views, views.transpose(1, 2)) / temperature
        self_pair = torch.eye(2 * c, dtype=torch.bool, device=a.device)
        sim = sim.masked_fill(self_pair, float("-inf"))
        partner = torch.cat([torch.arange(c, 2 * c), torch.arange(c)]).to(a.device)
        loss = F.cross_entropy(sim.flatten(0, 1), partner.repeat(n), reduction="none")
    return loss.view(n, 2 * c).mean(dim=1)


def soft_dice_agreement(
    p: torch.Tensor, q: torch.Tensor, smooth: float = 1e-5, include_background: bool = True
) -> torch.Tensor:
    """Per-sample ``1 - mean_c (2 sum p q + s) / (sum p^2 + sum q^2 + s)`` of probabilities ``(N, K, *S)``;
    returns ``(N,)``. The squared denominators and the mean over classes (background included by
    default) are the public code's; 0 when the two maps are equal."""
    if p.shape != q.shape or p.ndim < 3:
        raise ValueError(
            f"soft_dice_agreement: need two (N, K, *S) tensors of one shape, got "
            f"{tuple(p.shape)} and {tuple(q.shape)}"
        )
    if not include_background:
        p, q = p[:, 1:], q[:, 1:]
    p, q = p.flatten(2).float(), q.flatten(2).float()
    dice = (2 * (p * q).sum(-1) + smooth) / ((p * p).sum(-1) + (q * q).sum(-1) + smooth)
    return 1.0 - dice.mean(dim=1)


def _available_pairs(
    loss: str, layout: str, x: torch.Tensor, mask: torch.Tensor
) -> list[tuple[int, int, torch.Tensor]]:
    """``(i, j, samples)`` for every two modalities ``i < j`` available together in some samples (their
    indices); ``x`` ``(B, M, ...)`` must agree with ``mask`` ``(B, M)``, else ``ValueError`` naming ``loss``
    and the expected ``layout``."""
    if x.ndim < 4 or mask.shape != x.shape[:2]:
        raise ValueError(f"{loss}: {layout} and mask (B, M) disagree: {tuple(x.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    pairs = []
    for i, j in combinations(range(mask.shape[1]), 2):
        both = (mask[:, i] & mask[:, j]).nonzero()[:, 0]
        if len(both):
            pairs.append((i, j, both))
    return pairs


def _pairwise_mean(values: list[torch.Tensor], anchor: torch.Tensor) -> torch.Tensor:
    if not values:  # no sample has two available modalities: a zero that keeps the graph
        return anchor.sum() * 0.0
    return torch.cat(values).mean()


def csc_loss(features: torch.Tensor, mask: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Channel-wise semantic consistency: :func:`channel_nt_xent` between the bottleneck features of
    every two available modalities of a sample, averaged over all such (sample, pair) instances.

    Args:
        features: per-modality bottlenecks ``(B, M, C, *s)``.
        mask: availability ``(B, M)``.
    """
    pairs = _available_pairs("csc_loss", "features (B, M, C, *s)", features, mask)
    values = [channel_nt_xent(features[both, i], features[both, j], temperature) for i, j, both in pairs]
    return _pairwise_mean(values, features)


def cac_loss(
    logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-5, include_background: bool = True
) -> torch.Tensor:
    """Cross-modality agreement: :func:`soft_dice_agreement` between the softmax predictions of every two
    available branches of a sample, averaged over all such (sample, pair) instances.

    Args:
        logits: per-branch logits ``(B, M, K, *S)``.
        mask: availability ``(B, M)``.
    """
    pairs = _available_pairs("cac_loss", "logits (B, M, K, *S)", logits, mask)
    probs = torch.softmax(logits.float(), dim=2)
    values = [
        soft_dice_agreement(probs[both, i], probs[both, j], smooth, include_background)
        for i, j, both in pairs
    ]
    return _pairwise_mean(values, logits)
