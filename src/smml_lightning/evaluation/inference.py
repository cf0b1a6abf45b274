"""Whole-case sliding-window inference over many modality subsets with encoder reuse.

Every window is encoded once per model (``MaskedSegmenter.encode``) and decoded under every requested
subset, so scoring all 15 subsets costs one encoder pass instead of 15. The subsets are decoded in
batches (``decode_subsets``, ``subset_batch`` subsets per call, one batch of ``subset_batch *
sw_batch_size`` samples): fewer, larger decoder calls allocate their large activations less often
(without huge pages, page faults of per-subset allocations were a large part of a decode) and give
the convolutions larger batches; docs/benchmarks.md has the measurements behind the default. MONAI's
``sliding_window_inference`` does the tiling and blending; our predictor returns all subsets' logits
concatenated along channels, so MONAI keeps one output and one count map for all of them.

What is returned: the mean over models of their fused **logits**, blended over windows. This is what
SMML does at test time (it averages both branches' logits); the argmax of the result gives the labels.
Blending and model-averaging are both linear, so averaging inside each window equals averaging
separate whole-volume runs.

Memory: the blended output of a 240x240x155 case with 4 classes and 15 subsets holds 536 M values,
2.1 GB in float32. Measured peak RSS with a tiny two-branch toy model (roi 128, overlap 0.5, one
thread) was 4.66 GiB blending in float32 and 3.29 GiB in float16, so the 15-subset default is float16
(logit rounding ~5e-4 relative, far below what moves an argmax except at exact ties), leaving room
under a 6 GiB budget for a real network's activations. Windows always reach the networks in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.utils import ensure_tuple_rep

from smml_lightning.data.modalities import NUM_MODALITIES, SUBSETS, subset_index
from smml_lightning.models.base import MaskedSegmenter


def _subset_keys(subsets: Sequence[Sequence[bool]]) -> list[int]:
    """Index of each requested subset in :data:`SUBSETS`; duplicates and the empty subset are errors."""
    keys = []
    for mask in subsets:
        flags = tuple(bool(v) for v in mask)
        if len(flags) != NUM_MODALITIES or flags not in SUBSETS:
            raise ValueError(f"subset {flags} is not one of the 15 non-empty {NUM_MODALITIES}-modality masks")
        keys.append(subset_index(flags))
    if len(set(keys)) != len(keys):
        raise ValueError(f"subsets requested more than once: {[SUBSETS[k] for k in keys]}")
    return keys


@contextlib.contextmanager
def _eval_mode(models: Sequence[MaskedSegmenter]):
    """Put models in eval mode and restore each one's previous mode afterwards."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, was_training):
            m.train(flag)


def predict_subsets(
    models: Sequence[MaskedSegmenter],
    image: torch.Tensor,
    subsets: Sequence[Sequence[bool]] = SUBSETS,
    roi_size: Sequence[int] | int = 128,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 2,
    autocast_dtype: torch.dtype | None = None,
    accumulate_dtype: torch.dtype = torch.float16,
    subset_batch: int = 3,
) -> dict[int, torch.Tensor]:
    """Model-averaged, window-blended logits ``(1, C, D, H, W)`` for each requested subset.

    Keys are the subsets' indices in :data:`SUBSETS` (so ``SUBSET_NAMES[key]`` names them); the values
    are channel views of one ``(1, S * C, D, H, W)`` tensor of ``accumulate_dtype``. Models run in eval
    mode under ``torch.inference_mode``; ``autocast_dtype`` (e.g. ``torch.bfloat16``, default: the
    ambient autocast dtype if autocast is on) enables autocast for the network calls only.
    ``accumulate_dtype`` is the blending dtype (float16 halves the memory, see the module notes; float32
    for exact blending); the networks always see the float32 image. ``subset_batch``: subsets decoded
    per network call (:meth:`~smml_lightning.models.base.MaskedSegmenter.decode_subsets`), one batch
    of ``subset_batch * sw_batch_size`` samples; 1 decodes subset by subset.
    """
    if not models:
        raise ValueError("predict_subsets needs at least one model")
    if image.dim() != 5 or image.shape[0] != 1 or image.shape[1] != NUM_MODALITIES:
        raise ValueError(f"image must be (1, {NUM_MODALITIES}, D, H, W), got {tuple(image.shape)}")
    if subset_batch < 1:
        raise ValueError(f"subset_batch must be >= 1, got {subset_batch}")
    keys = _subset_keys(subsets)
    masks = [torch.tensor(SUBSETS[k], dtype=torch.bool, device=image.device) for k in keys]
    spatial = tuple(image.shape[2:])
    roi = ensure_tuple_rep(roi_size, len(spatial))
    # Pad small volumes at the far end ourselves so MONAI never pads and window coordinates index `image`.
    pad = [max(r - s, 0) for r, s in zip(roi, spatial)]
    image = F.pad(image.float(), [p for extra in reversed(pad) for p in (0, extra)])
    # MONAI blends in the dtype of the tensor it is given; windows are read from the float32 image.
    carrier = image.to(accumulate_dtype)
    weight = 1.0 / len(models)
    device = image.device.type
    if autocast_dtype is None and torch.is_autocast_enabled(device):
        autocast_dtype = torch.get_autocast_dtype(device)  # e.g. Lightning's bf16-mixed around test_step

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=autocast_dtype)

    def predictor(_: torch.Tensor, coords: Sequence[Sequence[slice]]) -> torch.Tensor:
        window = torch.cat([image[tuple(c)] for c in coords])
        batch = window.shape[0]
        out: torch.Tensor | None = None
        for model in models:
            with autocast():
                encoded = model.encode(window)
                for first in range(0, len(masks), subset_batch):
                    chunk = [mask.expand(batch, -1) for mask in masks[first : first + subset_batch]]
                    for i, logits in enumerate(model.decode_subsets(encoded, chunk), start=first):
                        n_cls = logits.shape[1]
                        if out is None:
                            out = torch.zeros(
                                batch,
                                len(masks) * n_cls,
                                *logits.shape[2:],
                                dtype=accumulate_dtype,
                                device=logits.device,
                            )
                        out[:, i * n_cls : (i + 1) * n_cls].add_(logits, alpha=weight)
            del encoded
        if out is None:
            raise ValueError("predict_subsets needs at least one model and one subset")
        return out

    # MONAI's own tensor work (batching windows with torch.cat, blending) runs outside autocast: CPU
    # autocast rejects a float16 carrier in torch.cat. Only the network calls above are autocast.
    with _eval_mode(models), torch.inference_mode(), torch.autocast(device, enabled=False):
        blended = sliding_window_inference(
            carrier, roi, sw_batch_size, predictor, overlap=overlap, mode=mode, with_coord=True
        )
    unpadded: tuple[Any, ...] = (..., *(slice(0, s) for s in spatial))
    blended = torch.as_tensor(blended)[unpadded]
    n_cls = blended.shape[1] // len(keys)
    return {k: blended[:, i * n_cls : (i + 1) * n_cls] for i, k in enumerate(keys)}
