"""CSC and CAC name themselves and the layout they expect when features, logits and mask disagree."""

import re

import pytest
import torch

from smml_lightning.losses.cmc import cac_loss, csc_loss


@pytest.mark.parametrize(
    ("loss", "layout", "shape", "mask_shape"),
    [
        (csc_loss, "features (B, M, C, *s)", (2, 4, 3), (2, 4)),  # too few dimensions
        (csc_loss, "features (B, M, C, *s)", (2, 4, 3, 5), (2, 3)),  # mask of other modalities
        (cac_loss, "logits (B, M, K, *S)", (2, 4, 3), (2, 4)),
        (cac_loss, "logits (B, M, K, *S)", (2, 4, 3, 5), (3, 4)),  # mask of other samples
    ],
)
def test_disagreeing_shapes_are_named(loss, layout, shape, mask_shape):
    message = f"{loss.__name__}: {layout} and mask (B, M) disagree: {shape}, {mask_shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        loss(torch.zeros(shape), torch.ones(mask_shape, dtype=torch.bool))


def test_only_pairs_available_in_a_sample_count():
    """A sample with one modality adds nothing; with none available anywhere the loss is a zero with a graph."""
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    one_each = torch.tensor([[True, False, False], [False, True, False]])
    assert csc_loss(x, one_each).item() == 0.0 and cac_loss(x, one_each).item() == 0.0
    csc_loss(x, one_each).backward()
    assert x.grad is not None and not x.grad.any()
    pair = torch.tensor([[True, False, True], [False, True, False]])
    torch.testing.assert_close(cac_loss(x, pair), cac_loss(x[:1, [0, 2]], pair[:1, [0, 2]]))
