"""Canonical modality order, the 15 non-empty subsets, and modality-mask sampling.

Everything in the package indexes modalities in one order, the one the community's code uses
(RFNet, mmFormer): ``[FLAIR, T1ce, T1, T2]``. Subsets are boolean availability masks in that
order; the 15 of them are listed in the row order of the community's tables so that our reports
line up with published ones row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MODALITIES: tuple[str, ...] = ("flair", "t1ce", "t1", "t2")
"""Canonical channel order of every image tensor and cache in the package."""

MODALITY_LABELS: dict[str, str] = {"flair": "FLAIR", "t1ce": "T1ce", "t1": "T1", "t2": "T2"}

NUM_MODALITIES = len(MODALITIES)

# Rows of the community's 15-subset tables, each as the available modalities.
_SUBSET_ORDER: tuple[tuple[str, ...], ...] = (
    ("t2",),
    ("t1ce",),
    ("t1",),
    ("flair",),
    ("t1ce", "t2"),
    ("t1ce", "t1"),
    ("flair", "t1"),
    ("t1", "t2"),
    ("flair", "t2"),
    ("flair", "t1ce"),
    ("flair", "t1ce", "t1"),
    ("flair", "t1", "t2"),
    ("flair", "t1ce", "t2"),
    ("t1ce", "t1", "t2"),
    ("flair", "t1ce", "t1", "t2"),
)

SUBSETS: tuple[tuple[bool, ...], ...] = tuple(
    tuple(m in subset for m in MODALITIES) for subset in _SUBSET_ORDER
)
"""The 15 non-empty availability masks, in the community's table order."""


def subset_name(mask: Sequence[bool] | torch.Tensor) -> str:
    """Human name of an availability mask, e.g. ``FLAIR+T1ce``."""
    flags = [bool(v) for v in (mask.tolist() if isinstance(mask, torch.Tensor) else mask)]
    if len(flags) != NUM_MODALITIES:
        raise ValueError(f"an availability mask has {NUM_MODALITIES} entries, got {len(flags)}")
    names = [MODALITY_LABELS[m] for m, on in zip(MODALITIES, flags) if on]
    if not names:
        raise ValueError("the empty subset has no name: at least one modality must be available")
    return "+".join(names)


SUBSET_NAMES: tuple[str, ...] = tuple(subset_name(s) for s in SUBSETS)


def parse_subset(text: str) -> tuple[bool, ...]:
    """Parse ``"flair+t1ce"`` (any case, any order) into an availability mask."""
    wanted = {t.strip().lower() for t in text.split("+") if t.strip()}
    unknown = wanted - set(MODALITIES)
    if unknown or not wanted:
        raise ValueError(f"unknown modality subset {text!r}: use '+'-joined names from {list(MODALITIES)}")
    return tuple(m in wanted for m in MODALITIES)


def subset_index(mask: Sequence[bool] | torch.Tensor) -> int:
    """Index of an availability mask in :data:`SUBSETS`."""
    flags = tuple(bool(v) for v in (mask.tolist() if isinstance(mask, torch.Tensor) else mask))
    return SUBSETS.index(flags)


def subset_probabilities(mask_ratio: float | None = None) -> torch.Tensor:
    """Sampling probabilities over :data:`SUBSETS`.

    ``mask_ratio=None`` gives the uniform distribution over the 15 subsets, as in the paper's code.
    A float ``r`` in ``[0, 1]`` is the expected fraction of modalities a sample loses: the number of
    dropped modalities ``k`` (0 to 3, never all four) follows a binomial over four modalities with
    probability ``r``, renormalised without ``k = 4``; subsets with the same ``k`` share equally.
    """
    n = len(SUBSETS)
    if mask_ratio is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(
            f"mask_ratio must be null (uniform over the 15 subsets) or in [0, 1], got {mask_ratio}"
        )
    r = float(mask_ratio)
    if r == 1.0:  # every sample loses three modalities: all single-modality subsets
        weights = [1.0 if sum(s) == 1 else 0.0 for s in SUBSETS]
    else:
        # Binomial(4, r) over the number of dropped modalities, spread evenly over each k's subsets.
        weights = [r ** (NUM_MODALITIES - sum(s)) * (1 - r) ** sum(s) for s in SUBSETS]
    probs = torch.tensor(weights, dtype=torch.float64)
    return probs / probs.sum()


def sample_masks(
    n_samples: int,
    n_masks: int = 1,
    mask_ratio: float | None = None,
    distinct: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw availability masks, shape ``(n_samples, n_masks, 4)``, dtype bool.

    With ``distinct`` each sample's ``n_masks`` masks are different subsets (SMML's two branches see
    two different views of the same patch); draws are without replacement from
    :func:`subset_probabilities`.
    """
    probs = subset_probabilities(mask_ratio)
    if distinct and n_masks > int((probs > 0).sum()):
        raise ValueError(f"cannot draw {n_masks} distinct subsets from {int((probs > 0).sum())} with mass")
    table = torch.tensor(SUBSETS, dtype=torch.bool)
    out = torch.empty(n_samples, n_masks, NUM_MODALITIES, dtype=torch.bool)
    for i in range(n_samples):
        idx = torch.multinomial(probs, n_masks, replacement=not distinct, generator=generator)
        out[i] = table[idx]
    return out
