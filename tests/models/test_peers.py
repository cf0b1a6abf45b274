"""FusedPeers: SMML's two branches run as one grouped network give the plain path's losses and gradients."""

import functools

import pytest
import torch

from smml_lightning.lit.smml import SMML
from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.baselines import UNetBaseline
from smml_lightning.models.peers import FusedPeers
from smml_lightning.models.refine import SemanticRefiner

NET = functools.partial(
    MMFormer, base_width=4, transformer_dim=16, num_heads=2, mlp_ratio=2.0, dropout=0.1, patch_size=32
)


def smml(fuse: bool) -> SMML:
    torch.manual_seed(0)
    module = SMML(
        network=NET,
        refiner=functools.partial(SemanticRefiner, width=4),
        warmup_epochs=0,
        roi_size=32,
        fuse_peers=fuse,
    )
    module.setup("fit")
    return module.train()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(2, 4, 32, 32, 32, generator=g),
        "label": torch.randint(0, 4, (2, 1, 32, 32, 32), generator=g),
        # Per sample two different masks, one with a single modality, so the peers' fusions differ.
        "masks": torch.tensor([[[1, 0, 1, 0], [0, 1, 1, 1]], [[0, 0, 0, 1], [1, 1, 0, 0]]], dtype=torch.bool),
        "prior": torch.rand(2, 4, 4, 32, 32, 32, generator=g).softmax(dim=2),
    }


def losses_and_grads(module: SMML, data: dict[str, torch.Tensor]):
    torch.manual_seed(7)  # the transformers' dropout draws the same numbers on both paths
    terms = module.training_losses(data)
    torch.stack(list(terms.values())).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def test_fused_peers_give_the_plain_losses_and_gradients():
    plain, fused = smml(False), smml(True)
    assert plain.state_dict().keys() == fused.state_dict().keys()  # checkpoints load either way
    fused.load_state_dict(plain.state_dict())
    data = batch()
    terms_plain, grads_plain = losses_and_grads(plain, data)
    terms_fused, grads_fused = losses_and_grads(fused, data)
    assert (
        terms_plain.keys() == terms_fused.keys()
        and {"hcc_pixel", "prior_consist", "seg_aux"} <= terms_plain.keys()
    )
    for name in terms_plain:
        torch.testing.assert_close(terms_fused[name], terms_plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # Every parameter of both branches gets the plain path's gradient, none is missing or extra.
    assert grads_plain.keys() == grads_fused.keys()
    assert sum(name.startswith("branches.1.") for name in grads_plain) > 50
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_differs_between_peers_as_in_the_plain_path():
    # With another seed the losses change: the comparison above did exercise dropout.
    module = smml(True)
    data = batch()
    torch.manual_seed(7)
    first = module.training_losses(data)["seg_fused"]
    torch.manual_seed(8)
    assert not torch.equal(first, module.training_losses(data)["seg_fused"])


def test_fused_peers_refuse_what_they_cannot_fuse():
    with pytest.raises(ValueError, match="MMFormer"):
        FusedPeers(UNetBaseline())
    with pytest.raises(ValueError, match="aux_all_modalities"):
        FusedPeers(NET(aux_all_modalities=False))
    fused = FusedPeers(NET())
    with pytest.raises(ValueError, match="shape"):
        fused(
            [NET(), MMFormer(base_width=8, transformer_dim=16, num_heads=2, patch_size=32)],
            torch.zeros(1, 4, 32, 32, 32),
            [torch.ones(1, 4, dtype=torch.bool)] * 2,
        )
