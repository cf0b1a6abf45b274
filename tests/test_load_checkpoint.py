"""Checkpoints rebuild their model alone: built in plain Python or by the CLI, every method loads with
``load_from_checkpoint`` (its own class or the base class) to the same weights and the same logits, and
``smml test --ckpt_path`` needs no model config and no fit data options."""

from functools import partial
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer

from conftest import TINY_DATA_ARGS, TINY_NETWORK, TINY_NETWORK_ARGS, prepared_cache
from smml_lightning.cli import lightning_main
from smml_lightning.data.datamodule import BratsDataModule
from smml_lightning.lit.base import MissingModalityModule
from smml_lightning.lit.baselines import MAMLModule, SingleBranch
from smml_lightning.lit.cmc import CMC
from smml_lightning.lit.hparams import NotRecordable, spec
from smml_lightning.lit.smml import SMML
from smml_lightning.losses.segmentation import SegmentationLoss
from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.baselines import UNetBaseline
from smml_lightning.models.cmc import CMCNet
from smml_lightning.models.maml import MAML
from smml_lightning.models.refine import SemanticRefiner

TINY_MMFORMER = partial(MMFormer, **TINY_NETWORK)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("ckpt"), 4, seed=5)


def _logits(model: MissingModalityModule, seed: int = 0) -> torch.Tensor:
    image = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor([[True, False, True, True]])
    model.eval()
    with torch.no_grad():
        return torch.stack([net(image, mask).logits for net in model.inference_models()])


def _same_model(a: MissingModalityModule, b: MissingModalityModule) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)


def test_spec_records_classes_partials_and_objects():
    assert spec(partial(MMFormer, base_width=4)) == {
        "class_path": "smml_lightning.models.backbone.MMFormer",
        "init_args": {"base_width": 4},
    }
    loss = spec(SegmentationLoss(smooth=2.0, class_weighted_ce=True))
    assert loss["init_args"]["smooth"] == 2.0 and loss["init_args"]["class_weighted_ce"] is True
    assert spec(SemanticRefiner)["init_args"] == {}
    with pytest.raises(NotRecordable):
        spec(lambda: MMFormer())


def test_plain_python_fit_saves_a_checkpoint_that_loads_alone(cache, tmp_path):
    model = SMML(
        network=TINY_MMFORMER,
        refiner=partial(SemanticRefiner, width=4),
        use_prior=False,
        roi_size=32,
        seg_loss=SegmentationLoss(smooth=2.0),
        warmup_epochs=0,
        et_min_voxels=7,
        inference_branches=[1],
    )
    data = BratsDataModule(
        str(cache),
        patch_size=32,
        batch_size=1,
        samples_per_volume=1,
        queue_length=2,
        num_workers=0,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    trainer = Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    for cls in (SMML, MissingModalityModule):
        loaded = cls.load_from_checkpoint(path)
        _same_model(model, loaded)
        assert (
            loaded.seg_loss.smooth == 2.0 and loaded.et_min_voxels == 7 and loaded.inference_branches == [1]
        )
        assert loaded.roi_size == (32, 32, 32) and loaded.refiners is None
    # Keyword arguments still override what the checkpoint stores.
    assert SMML.load_from_checkpoint(path, et_min_voxels=3).et_min_voxels == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda: SingleBranch(network=partial(UNetBaseline, base_width=4), roi_size=32, w_aux=0.5),
        lambda: SingleBranch(network=TINY_MMFORMER, roi_size=32),
        lambda: MAMLModule(network=partial(MAML, base_width=4), roi_size=32, temperature=2.0),
        lambda: CMC(network=partial(CMCNet, base_width=4, num_stages=2), roi_size=32, temperature=0.25),
    ],
)
def test_every_method_loads_through_the_base_class(make, tmp_path):
    torch.manual_seed(0)
    model = make()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MissingModalityModule.load_from_checkpoint(tmp_path / "m.ckpt")
    _same_model(model, loaded)
    assert loaded.w == model.w and getattr(loaded, "temperature", None) == getattr(model, "temperature", None)
    # Loaded again, the stored form is stable: a checkpoint of a loaded model loads too.
    trainer.strategy.connect(loaded)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    _same_model(model, MissingModalityModule.load_from_checkpoint(tmp_path / "again.ckpt"))


@pytest.mark.slow
def test_cli_test_and_predict_with_only_the_checkpoint(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    fit = lightning_main(
        [
            "fit",
            "--config",
            "experiments/synthetic.yaml",
            f"--data.cache_dir={cache}",
            *TINY_NETWORK_ARGS,
            "--model.init_args.use_prior=false",
            "--model.init_args.et_min_voxels=3",
            "--data.use_prior=false",
            *TINY_DATA_ARGS,
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.precision=32",
            f"--trainer.default_root_dir={tmp_path}",
            f"--checkpoint.dirpath={ckpt.parent}",
        ]
    )
    assert ckpt.is_file()
    loaded = MissingModalityModule.load_from_checkpoint(ckpt)
    _same_model(fit.model, loaded)
    assert isinstance(loaded, SMML) and loaded.et_min_voxels == 3 and loaded.roi_size == (32, 32, 32)

    report = tmp_path / "report"
    test = lightning_main(
        [
            "test",
            f"--ckpt_path={ckpt}",
            f"--data.cache_dir={cache}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.report_dir={report}",
        ]
    )
    assert (
        isinstance(test.model, SMML) and test.model.roi_size == (32, 32, 32) and test.model.et_min_voxels == 3
    )
    # The fit's split (its fractions and seed, from the checkpoint), not the data module's defaults.
    assert test.datamodule.splits == fit.datamodule.splits
    rows = pd.read_csv(report / "per_case.csv")
    assert set(rows["case"]) == set(fit.datamodule.splits["test"]) and rows["subset"].nunique() == 15

    # predict, likewise: the checkpoint and where the new cases are.
    case = min(p for p in (cache.parent / "raw").iterdir() if p.is_dir())
    lightning_main(
        [
            "predict",
            f"--ckpt_path={ckpt}",
            f"--data.predict_root={case}",
            "--trainer.logger=false",
            f"--data.predict_dir={tmp_path / 'predict_cache'}",
            f"--prediction.output_dir={tmp_path / 'pred'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--prediction.overlay=false",
        ]
    )
    seg = nib.load(tmp_path / "pred" / f"{case.name}_seg.nii.gz")
    assert seg.shape == nib.load(next(case.glob("*_flair.nii.gz"))).shape
