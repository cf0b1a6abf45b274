"""A case cached on a resampled grid (prepare --spacing) is scored and predicted on its native grid."""

import types

import nibabel as nib
import numpy as np
import torch

from smml_lightning.data import cache
from smml_lightning.data.labels import to_internal
from smml_lightning.data.layouts import discover
from smml_lightning.data.modalities import SUBSETS
from smml_lightning.data.prepare import crop, prepare
from smml_lightning.data.synthetic import synthesize
from smml_lightning.evaluation.metrics import case_metrics, image_diagonal
from smml_lightning.lit import base as lit_base
from smml_lightning.lit.baselines import SingleBranch
from smml_lightning.models.backbone import MMFormer

MIN = (16, 16, 16)


class _DataModule:
    """What test_step and predict_step read of the datamodule: each case's cache metadata."""

    def __init__(self, root):
        self.root = root

    def case_meta(self, name, stage="fit"):
        return cache.load_meta(self.root, name)


def _module(root, monkeypatch, label):
    """A module whose logits are the one-hot of ``label`` (the cached grid's): perfect on that grid."""

    def perfect(models, image, subsets, **kwargs):
        onehot = torch.nn.functional.one_hot(torch.as_tensor(np.array(label)).long(), 4).permute(3, 0, 1, 2)
        return {SUBSETS.index(tuple(s)): onehot[None].float() for s in subsets}

    monkeypatch.setattr(lit_base, "predict_subsets", perfect)
    module = SingleBranch(
        network=lambda: MMFormer(base_width=4, transformer_dim=16, num_heads=2, patch_size=16),
        roi_size=16,
        channels_last=False,
        test_subsets=["all"],
        challenge=None,
    )
    module._trainer = types.SimpleNamespace(datamodule=_DataModule(root))
    return module


def test_resampled_case_scored_against_its_native_label(tmp_path, monkeypatch):
    synthesize(tmp_path / "raw", 1, shape=(48, 48, 40), spacing=1.0, seed=3)
    (case,) = discover(tmp_path / "raw")
    truth = to_internal(np.asarray(nib.load(str(case.label)).dataobj), case.convention)
    for folder, spacing in (("native", None), ("coarse", 2.0)):
        root = tmp_path / folder
        prepare(tmp_path / "raw", root, min_size=MIN, spacing=spacing, progress=False)
        meta = cache.load_meta(root, case.name)
        label = cache.load_label(root, case.name)
        batch = {
            "name": [case.name],
            "image": torch.from_numpy(np.array(cache.load_image(root, case.name)))[None],
            "label": torch.from_numpy(np.array(label))[None, None],
            "available": torch.ones(1, 4, dtype=torch.bool),
        }
        rows = _module(root, monkeypatch, label).test_step(batch, 0)["rows"]
        dice = {r["region"]: r["dice"] for r in rows}
        if spacing is None:  # the cached grid is the native one: the model's labels are the truth
            assert dice == {
                r: v["dice"]
                for r, v in case_metrics(
                    np.array(label), truth[tuple(slice(a, b) for a, b in meta.crop_box)], meta.spacing
                ).items()
            }
            assert dice["WT"] == dice["TC"] == 1.0
            continue
        # Resampled: the upsampled one-hot, arg-maxed on the native crop, against the native label.
        box = crop(truth, meta.crop_box)
        onehot = (
            torch.nn.functional.one_hot(torch.from_numpy(np.array(label)).long(), 4)
            .permute(3, 0, 1, 2)
            .float()
        )
        native_pred = lit_base.logits_to_box(onehot, meta)
        # (an HD95 with one side empty is the original grid's diagonal, as test_step scores it)
        independent = case_metrics(
            native_pred,
            box,
            meta.native_spacing,
            empty_distance=image_diagonal(meta.original_shape, meta.native_spacing),
        )
        assert dice == {r: v["dice"] for r, v in independent.items()}
        assert 0.8 < dice["WT"] < 1.0 and 0.8 < dice["TC"] < 1.0  # resampling error, on the native grid
        hd95 = {r["region"]: r["hd95"] for r in rows}
        assert hd95 == {r: v["hd95"] for r, v in independent.items()}
        # predict_step gives labels on the native crop box.
        out = _module(root, monkeypatch, label).predict_step(batch, 0)
        assert tuple(out["labels"].shape) == meta.box_shape and np.array_equal(
            out["labels"].numpy(), native_pred
        )


def test_cache_grid_scoring_of_a_resampled_case(tmp_path, monkeypatch):
    """test_grid="cache" scores a resampled case on the grid the network sees: a perfect prediction
    there is perfect, and distances are in the cache's millimetres with its own grid's diagonal."""
    synthesize(tmp_path / "raw", 1, shape=(48, 48, 40), spacing=1.0, seed=3)
    (case,) = discover(tmp_path / "raw")
    root = tmp_path / "coarse"
    prepare(tmp_path / "raw", root, min_size=MIN, spacing=2.0, progress=False)
    label = np.array(cache.load_label(root, case.name))
    batch = {
        "name": [case.name],
        "image": torch.from_numpy(np.array(cache.load_image(root, case.name)))[None],
        "label": torch.from_numpy(label)[None, None],
        "available": torch.ones(1, 4, dtype=torch.bool),
    }
    module = _module(root, monkeypatch, label)
    module.test_grid = "cache"
    rows = module.test_step(batch, 0)["rows"]
    expected = case_metrics(
        label, label, (2.0, 2.0, 2.0), empty_distance=image_diagonal(label.shape, (2.0, 2.0, 2.0))
    )
    assert {r["region"]: (r["dice"], r["hd95"]) for r in rows} == {
        r: (v["dice"], v["hd95"]) for r, v in expected.items()
    }
    assert {r["region"]: r["dice"] for r in rows}[
        "WT"
    ] == 1.0  # the native grid would lose some to resampling
