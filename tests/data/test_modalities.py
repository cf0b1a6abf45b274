import itertools

import pytest
import torch

from smml_lightning.data.modalities import (
    MODALITIES,
    SUBSET_NAMES,
    SUBSETS,
    parse_subset,
    sample_masks,
    subset_index,
    subset_probabilities,
)


def test_subsets_are_the_15_nonempty_in_table_order():
    assert len(set(SUBSETS)) == 15
    assert set(SUBSETS) == {s for s in itertools.product([False, True], repeat=4) if any(s)}
    assert SUBSET_NAMES[0] == "T2" and SUBSET_NAMES[3] == "FLAIR" and SUBSET_NAMES[-1] == "FLAIR+T1ce+T1+T2"
    assert SUBSET_NAMES[9] == "FLAIR+T1ce" and SUBSET_NAMES[13] == "T1ce+T1+T2"
    assert MODALITIES == ("flair", "t1ce", "t1", "t2")


def test_parse_subset_roundtrip_and_errors():
    for s in SUBSETS:
        name = "+".join(m for m, on in zip(MODALITIES, s) if on)
        assert subset_index(parse_subset(name.upper())) == SUBSETS.index(s)
    with pytest.raises(ValueError, match="unknown modality"):
        parse_subset("flair+pd")
    with pytest.raises(ValueError):
        parse_subset("")


def _empirical(masks):
    counts = torch.zeros(15)
    for m in masks.reshape(-1, 4):
        counts[subset_index(m)] += 1
    return counts / counts.sum()


def test_uniform_sampling_frequencies():
    g = torch.Generator().manual_seed(0)
    freq = _empirical(sample_masks(6000, 1, generator=g))
    assert torch.allclose(freq, torch.full((15,), 1 / 15), atol=0.015)


def test_distinct_pairs_are_distinct_and_uniform():
    g = torch.Generator().manual_seed(1)
    m = sample_masks(3000, 2, generator=g)
    assert (m[:, 0] != m[:, 1]).any(dim=1).all()
    assert torch.allclose(_empirical(m), torch.full((15,), 1 / 15), atol=0.015)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_mask_ratio_sets_expected_dropped_fraction(ratio):
    probs = subset_probabilities(ratio)
    dropped = torch.tensor([4 - sum(s) for s in SUBSETS], dtype=torch.float64)
    # Binomial(4, r) conditioned on k < 4: hand computation of E[k].
    pk = torch.tensor(
        [(ratio**k) * ((1 - ratio) ** (4 - k)) * [1, 4, 6, 4][k] for k in range(4)], dtype=torch.float64
    )
    expected = (pk * torch.arange(4)).sum() / pk.sum() if pk.sum() > 0 else torch.tensor(3.0)
    assert abs(float((probs * dropped).sum()) - float(expected)) < 1e-9
    g = torch.Generator().manual_seed(2)
    m = sample_masks(4000, 1, mask_ratio=ratio, generator=g)
    assert abs((4 - m.sum(-1).double()).mean().item() - float(expected)) < 0.06


def test_mask_ratio_out_of_range():
    with pytest.raises(ValueError, match="mask_ratio"):
        subset_probabilities(1.5)
