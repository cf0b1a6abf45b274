"""model.init_args.compile: networks' forward through torch.compile, eager with one warning on failure."""

import warnings

import pytest
import torch

from smml_lightning.lit import base
from smml_lightning.lit.base import CompiledForward
from smml_lightning.lit.smml import SMML
from smml_lightning.models.backbone import MMFormer

P = 32


def tiny_smml(**kw) -> SMML:
    torch.manual_seed(0)
    return SMML(
        network=lambda: MMFormer(base_width=4, transformer_dim=16, num_heads=2, dropout=0.0, patch_size=P),
        warmup_epochs=0,
        roi_size=P,
        **kw,
    )


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, P, P, P, generator=g), torch.tensor([[True, False, True, True]])


def failing_compile(fn, *args, **kwargs):
    def compiled(*a, **k):
        raise RuntimeError("inductor exploded\nsecond line of the trace")

    return compiled


def test_switch_off_by_default_and_on_routes_every_branch(monkeypatch):
    calls = []
    monkeypatch.setattr(base.torch, "compile", lambda fn, **kw: calls.append(fn) or fn)
    plain = tiny_smml()
    plain.setup("fit")
    assert not calls and not any(isinstance(b.forward, CompiledForward) for b in plain.branches)
    module = tiny_smml(compile=True)
    assert module.hparams["compile"] is True  # recorded, so a checkpoint rebuilds the same module
    module.setup("fit")
    assert [b.forward.name for b in module.branches] == ["branches.0", "branches.1"]
    assert len(calls) == 2
    module.setup("fit")  # a second setup does not wrap twice
    assert len(calls) == 2


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(base.torch, "compile", failing_compile)
    module = tiny_smml(compile=True)
    module.setup("fit")
    branch = module.branches[0].eval()
    image, mask = inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"^torch.compile of branches.0 failed") as caught:
        out = branch(image, mask).logits
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert "second line" not in str(caught[0].message)  # one line
    with torch.no_grad():
        expected = branch.forward.eager(image, mask).logits
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning: eager from now on
            torch.testing.assert_close(branch(image, mask).logits, expected, rtol=0, atol=0)


def test_an_error_of_the_model_itself_is_raised_not_blamed_on_the_compiler(monkeypatch):
    monkeypatch.setattr(base.torch, "compile", failing_compile)
    module = tiny_smml(compile=True)
    module.setup("fit")
    branch = module.branches[0]
    image, _ = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no available modality"):
            branch(image, torch.zeros(1, 4, dtype=torch.bool))
    assert not branch.forward.failed
