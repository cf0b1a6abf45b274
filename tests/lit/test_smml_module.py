"""The SMML LightningModule's loss composition: terms, warm-up, gradients and masking."""

import pytest
import torch

from smml_lightning.lit.base import NonFiniteLossError
from smml_lightning.lit.smml import SMML
from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.refine import SemanticRefiner

P = 32


def tiny_smml(**kw) -> SMML:
    torch.manual_seed(0)
    return SMML(
        network=lambda: MMFormer(base_width=4, transformer_dim=16, num_heads=2, dropout=0.0, patch_size=P),
        refiner=lambda: SemanticRefiner(width=4),
        roi_size=P,
        channels_last=False,
        **kw,
    )


def make_batch(b=2, masks=None):
    g = torch.Generator().manual_seed(1)
    label = torch.zeros(b, 1, P, P, P, dtype=torch.long)
    label[:, :, 8:24, 8:24, 8:24] = 2
    label[:, :, 12:20, 12:20, 12:20] = 1
    label[:, :, 12:20, 12:20, 18:20] = 3
    image = torch.randn(b, 4, P, P, P, generator=g) + label.float()
    prior = torch.softmax(torch.randn(b, 4, 4, P, P, P, generator=g), dim=2)
    if masks is None:
        masks = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 1]]] * b, dtype=torch.bool)
    return {"image": image, "label": label, "masks": masks, "prior": prior}


PAPER_TERMS = {
    "seg_fused",
    "seg_aux",
    "seg_deep",
    "seg_refine",
    "prior_consist",
    "hcc_pixel",
    "hcc_sample",
    "hcc_class",
}


def test_all_paper_terms_after_warmup_and_gradients_reach_both_branches():
    model = tiny_smml(warmup_epochs=0)
    terms = model.training_losses(make_batch())
    assert set(terms) == PAPER_TERMS
    assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    for part in (model.branches[0], model.branches[1], model.refiners[0], model.refiners[1]):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_warmup_holds_back_pixel_hcc_and_prior_consistency():
    model = tiny_smml(warmup_epochs=3)
    terms = model.training_losses(make_batch())
    assert set(terms) == PAPER_TERMS - {"hcc_pixel", "prior_consist"}


def test_ablations_by_weights_and_without_prior():
    model = tiny_smml(warmup_epochs=0, w_pixel=0, w_sample=0, w_class=0, use_prior=False)
    batch = make_batch()
    del batch["prior"]
    assert set(model.training_losses(batch)) == {"seg_fused", "seg_aux", "seg_deep"}
    assert model.refiners is None


def test_shared_mask_ablation_feeds_both_branches_the_first_mask(monkeypatch):
    model = tiny_smml(warmup_epochs=0, share_mask=True)
    seen = []
    for branch in model.branches:
        original = branch.forward
        monkeypatch.setattr(
            branch, "forward", lambda x, m, _f=original: (seen.append(m.clone()), _f(x, m))[1]
        )
    model.training_losses(make_batch())
    assert torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("w_aux", [1.0, 0.0])
def test_masked_modality_encoder_learns_only_through_its_auxiliary_loss(w_aux):
    """Modality 2 (T1) and 3 (T2) are masked for branch 0: of all SMML terms only the auxiliary loss
    (each encoder's own prediction, as in the public code) may reach their slices of branch 0's grouped
    encoder; without it nothing does. Modality 0 (FLAIR), kept, is always reached."""
    model = tiny_smml(warmup_epochs=0, w_aux=w_aux)
    batch = make_batch(b=1)
    torch.stack(list(model.training_losses(batch).values())).sum().backward()
    enc = model.branches[0].encoder
    first = [m for m in enc.modules() if isinstance(m, torch.nn.Conv3d)][0]
    per_group = first.weight.shape[0] // 4
    grad = first.weight.grad
    for k, available in enumerate(batch["masks"][0, 0].tolist()):
        g = grad[k * per_group : (k + 1) * per_group].abs().sum()
        assert (g > 0) if (available or w_aux > 0) else (g == 0), (k, available, float(g))
    for k in (2, 3):  # the intra-modal transformers feed the fused path and the auxiliary decoder
        reached = sum(
            float(p.grad.abs().sum()) for p in model.branches[0].intra[k].parameters() if p.grad is not None
        )
        assert (reached > 0) == (w_aux > 0), (k, reached)


def test_nonfinite_loss_raises_with_term_name_or_skips():
    batch = make_batch()
    batch["prior"][0, 0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="seg_refine"):
        tiny_smml(warmup_epochs=0).training_step(batch, 0)
    model = tiny_smml(warmup_epochs=0, on_nonfinite="skip")
    with pytest.warns(UserWarning, match="skipping step.*seg_refine"):
        skipped = model.training_step(batch, 0)
    skipped.backward()  # a backward of zeros (DDP's all-reduce still meets the other ranks')
    assert skipped.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="w_pixel"):
        tiny_smml(w_pixel=-1)
    with pytest.raises(ValueError, match="sw_overlap"):
        tiny_smml(sw_overlap=1.0)
    model = tiny_smml()
    batch = make_batch()
    batch["masks"] = batch["masks"][:, :1]
    with pytest.raises(ValueError, match="n_masks=2"):
        model.training_losses(batch)


def test_inference_branches_pick_the_peers_whose_logits_are_averaged():
    from smml_lightning.evaluation.inference import predict_subsets

    model = tiny_smml().eval()
    # Make the peers disagree strongly so a wrong choice of peer would change the labels.
    with torch.no_grad():
        model.branches[1].decoder.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
    image = make_batch(b=1)["image"]

    def logits(models, dtype=torch.float16):  # float16 blending is what predict_case uses
        return predict_subsets(models, image, roi_size=P, accumulate_dtype=dtype)

    exact = [logits([b], torch.float32) for b in model.branches]
    both = logits(list(model.branches), torch.float32)
    for sid in (0, 14):
        torch.testing.assert_close(both[sid], (exact[0][sid] + exact[1][sid]) / 2, rtol=1e-5, atol=1e-4)
    assert not torch.equal(exact[0][14].argmax(1), exact[1][14].argmax(1))  # the choice is visible
    for choice in ([0], [1], [0, 1]):
        model.inference_branches = choice
        labels = model.predict_case(image, [0, 14])
        expect = logits([model.branches[k] for k in choice])
        for sid in (0, 14):
            assert torch.equal(labels[sid], expect[sid].argmax(1)[0])
    for bad in ([], [2], [0, 0]):
        with pytest.raises(ValueError, match="inference_branches"):
            tiny_smml(inference_branches=bad)


def _varied_batch(b: int, seed: int) -> dict:
    """Samples that differ as patches of different cases do: tumour place and class, intensity scale."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(b, 1, P, P, P, dtype=torch.long)
    for i in range(b):
        x, y, z = torch.randint(0, P // 2, (3,), generator=g).tolist()
        label[i, :, x : x + 12, y : y + 12, z : z + 12] = 1 + i % 3
    scale = torch.rand(b, 4, 1, 1, 1, generator=g) * 2 + 0.5
    image = torch.randn(b, 4, P, P, P, generator=g) * scale + 2 * label.float()
    masks = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 1]]] * b, dtype=torch.bool)
    return {"image": image, "label": label, "masks": masks}


def test_feature_hcc_relates_the_pre_norm_bottleneck_and_the_inter_sample_term_passes_gradient():
    """HCC's features are the fused inter-modal features before the instance norm that feeds the
    decoder. Pooled over space, the normalised map is nearly one vector for every sample, so the
    inter-sample relation built on it passes almost no gradient; on the pre-norm features it does."""
    from smml_lightning.losses.hcc import inter_sample_relation

    model = tiny_smml(warmup_epochs=0, use_prior=False)
    batch = _varied_batch(4, seed=0)
    decoder_inputs = []
    hook = model.branches[0].decoder.register_forward_hook(
        lambda mod, args, out: decoder_inputs.append(args[1])
    )
    outs = [branch(batch["image"], batch["masks"][:, k]) for k, branch in enumerate(model.branches)]
    hook.remove()
    post = [branch.from_tokens.adn(out.bottleneck) for branch, out in zip(model.branches, outs)]
    torch.testing.assert_close(post[0], decoder_inputs[0])  # the decoder reads the normalised features

    encoder = list(model.branches[0].encoder.parameters())

    def grad_norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, encoder, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))

    pre_norm = grad_norm(inter_sample_relation(outs[0].bottleneck, outs[1].bottleneck))
    post_norm = grad_norm(inter_sample_relation(post[0], post[1]))
    seg = grad_norm(model.seg_loss(outs[0].logits, batch["label"]))
    assert pre_norm > 0.01 * seg, (pre_norm, seg)
    assert pre_norm > 10 * post_norm, (pre_norm, post_norm)
    terms = model.training_losses(batch)  # the module's own term is the pre-norm relation
    torch.testing.assert_close(
        terms["hcc_sample"],
        model.w["sample"] * inter_sample_relation(outs[0].bottleneck, outs[1].bottleneck).detach(),
        rtol=1e-4,
        atol=1e-7,
    )
