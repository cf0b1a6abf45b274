import math

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from smml_lightning.data.modalities import SUBSETS, subset_index
from smml_lightning.evaluation.inference import predict_subsets
from smml_lightning.models.base import MaskedSegmenter, SegmentationOutput


class ToySegmenter(MaskedSegmenter):
    """Per-modality conv encoders, mask-weighted mean of features, conv decoder; counts its calls."""

    def __init__(self, features: int = 3, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleList(nn.Conv3d(1, features, 3, padding=1) for _ in range(4))
        self.decoder = nn.Conv3d(features, classes, 3, padding=1)
        self.encode_calls = 0
        self.encoded_windows = 0
        self.decode_calls = 0

    def encode(self, image):
        self.encode_calls += 1
        self.encoded_windows += image.shape[0]
        return torch.stack(
            [torch.tanh(enc(image[:, i : i + 1])) for i, enc in enumerate(self.encoders)], dim=1
        )

    def decode(self, encoded, mask):
        self.decode_calls += 1
        w = mask.to(encoded.dtype).view(*mask.shape, 1, 1, 1, 1)
        fused = (encoded * w).sum(1) / w.sum(1).clamp_min(1)
        return SegmentationOutput(logits=self.decoder(fused))


SHAPE = (12, 12, 10)
ROI = 8


def _image():
    return torch.randn(1, 4, *SHAPE, generator=torch.Generator().manual_seed(1))


def _separate(model, image, subset, mode="gaussian"):
    mask = torch.tensor(subset).unsqueeze(0)
    with torch.no_grad():
        return sliding_window_inference(
            image, ROI, 1, lambda x: model(x, mask.expand(x.shape[0], -1)).logits, overlap=0.5, mode=mode
        )


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_encoder_reuse_matches_separate_runs_and_encodes_once_per_window(mode):
    model, image = ToySegmenter(), _image()
    out = predict_subsets(
        [model], image, SUBSETS, roi_size=ROI, overlap=0.5, mode=mode, accumulate_dtype=torch.float32
    )
    # Hand count: interval 4 on each axis -> ceil((12-8)/4)+1 = 2, 2, and ceil((10-8)/4)+1 = 2 windows.
    n_windows = math.prod(math.ceil((s - ROI) / (ROI // 2)) + 1 for s in SHAPE)
    assert n_windows == 8
    assert model.encoded_windows == n_windows
    assert model.decode_calls == model.encode_calls * 15  # every encoded batch decoded once per subset
    assert sorted(out) == list(range(15))
    for k, subset in enumerate(SUBSETS):
        assert out[k].shape == (1, 4, *SHAPE) and out[k].dtype == torch.float32
        torch.testing.assert_close(out[k], _separate(model, image, subset, mode), rtol=1e-5, atol=1e-5)
    # Subsets really differ (the test would be vacuous if masks were ignored).
    assert not torch.allclose(out[0], out[14])


def test_two_models_average_equals_mean_of_separate_runs():
    models, image = [ToySegmenter(seed=0), ToySegmenter(seed=5)], _image()
    subsets = [SUBSETS[3], SUBSETS[14]]
    out = predict_subsets(
        models, image, subsets, roi_size=ROI, sw_batch_size=2, accumulate_dtype=torch.float32
    )
    assert all(m.encode_calls == 4 for m in models)  # 8 windows in batches of 2
    for subset in subsets:
        expected = (_separate(models[0], image, subset) + _separate(models[1], image, subset)) / 2
        torch.testing.assert_close(out[subset_index(subset)], expected, rtol=1e-5, atol=1e-5)


def test_single_subset_path_and_mode_restored():
    model, image = ToySegmenter(), _image()
    model.train()
    subset = SUBSETS[9]
    out = predict_subsets([model], image, [subset], roi_size=ROI, accumulate_dtype=torch.float32)
    assert model.training  # previous mode restored
    assert list(out) == [9]
    torch.testing.assert_close(out[9], _separate(model.eval(), image, subset), rtol=1e-5, atol=1e-5)


def test_rejects_bad_inputs():
    model = ToySegmenter()
    with pytest.raises(ValueError, match="not one of the 15"):
        predict_subsets([model], _image(), [(False,) * 4], roi_size=ROI)
    with pytest.raises(ValueError, match="more than once"):
        predict_subsets([model], _image(), [SUBSETS[0], SUBSETS[0]], roi_size=ROI)
    with pytest.raises(ValueError, match=r"\(1, 4, D, H, W\)"):
        predict_subsets([model], torch.zeros(1, 3, 8, 8, 8), roi_size=ROI)


def test_volume_smaller_than_roi_is_padded_at_the_end_and_cropped_back():
    model, image = ToySegmenter(), torch.randn(1, 4, 6, 7, 5, generator=torch.Generator().manual_seed(2))
    out = predict_subsets([model], image, [SUBSETS[14]], roi_size=ROI, accumulate_dtype=torch.float32)[14]
    assert out.shape == (1, 4, 6, 7, 5)
    with torch.no_grad():  # one window: blending is the identity
        padded = torch.nn.functional.pad(image, (0, 3, 0, 1, 0, 2))
        expected = model(padded, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(out, expected.logits[..., :6, :7, :5], rtol=1e-5, atol=1e-5)


def test_float16_accumulation_close_to_float32():
    model, image = ToySegmenter(), _image()
    exact = predict_subsets([model], image, SUBSETS[:3], roi_size=ROI, accumulate_dtype=torch.float32)
    half = predict_subsets([model], image, SUBSETS[:3], roi_size=ROI)  # float16 by default
    for k in exact:
        assert half[k].dtype == torch.float16
        torch.testing.assert_close(half[k].float(), exact[k], rtol=2e-3, atol=2e-3)


def test_ambient_autocast_is_used_for_the_networks_only():
    """Inside bf16 autocast (as Lightning runs test_step), windows batched in pairs with float16 blending
    work, and give what an explicit ``autocast_dtype`` gives."""
    model, image = ToySegmenter(), _image()
    explicit = predict_subsets(
        [model],
        image,
        [SUBSETS[14]],
        roi_size=ROI,
        sw_batch_size=2,
        autocast_dtype=torch.bfloat16,
        accumulate_dtype=torch.float16,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ambient = predict_subsets(
            [model], image, [SUBSETS[14]], roi_size=ROI, sw_batch_size=2, accumulate_dtype=torch.float16
        )
    fp32 = predict_subsets(
        [model], image, [SUBSETS[14]], roi_size=ROI, sw_batch_size=2, accumulate_dtype=torch.float16
    )
    assert torch.equal(ambient[14], explicit[14])
    assert not torch.equal(ambient[14], fp32[14])  # the networks really ran in bf16
