"""Offline SAM prior stage (SMML): fit the 3D prior decoder on a frozen SAM, then export priors to the cache.

Plain PyTorch, no Lightning: it runs once per dataset before training. Each modality of a case is
encoded alone and decoded alone, so a case's ``prior.npy`` holds four independent class-probability
maps ``(4, C, D, H, W)`` on the cached (cropped) grid; the refinement network later uses those of the
available modalities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from tqdm.auto import tqdm

from smml_lightning.data import cache
from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.data.prepare import cache_lock
from smml_lightning.data.splits import labeled_subset
from smml_lightning.io import atomic_write_bytes
from smml_lightning.models.sam_prior import PriorDecoder3D, SliceEncoder, load_sam_image_encoder

logger = logging.getLogger(__name__)

DECODER_FORMAT = 1
DEFAULT_DECODER_NAME = "prior_decoder.pt"


def _slice_encoder(
    checkpoint: str | Path, model_type: str, device: torch.device, chunk_size: int, bf16: bool
) -> SliceEncoder:
    return SliceEncoder(load_sam_image_encoder(checkpoint, model_type), chunk_size=chunk_size, bf16=bf16).to(
        device
    )


def _available(meta: cache.CaseMeta) -> list[int]:
    return [m for m, on in enumerate(meta.available) if on]


class _FeatureStore:
    """Encoder features of the training cases' available modalities.

    A case's features stay in memory (on the encoder's device) across epochs while the running total is under
    ``budget_bytes``; the others are encoded again at every step, and then only the slab being trained.
    """

    def __init__(self, encoder: SliceEncoder, budget_bytes: int) -> None:
        self.encoder = encoder
        self.budget, self.used = budget_bytes, 0
        self.kept: dict[str, torch.Tensor] = {}

    def features(self, name: str, image: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        """Features ``(n, F, D', H', k1 - k0)`` of ``image (n, 1, D, H, K)``'s slices ``k0:k1``."""
        if name in self.kept:
            return self.kept[name][..., k0:k1]
        n, _, d, h, k = image.shape
        fd, fh = self.encoder.feature_shape(d, h)
        size = n * self.encoder.out_chans * fd * fh * k * 4
        if self.used + size <= self.budget:
            self.kept[name] = self.encoder(image)
            self.used += size
            return self.kept[name][..., k0:k1]
        return self.encoder(image[..., k0:k1])


def fit_prior_decoder(
    cache_dir: str | Path,
    names: Sequence[str],
    checkpoint: str | Path,
    model_type: str = "vit_b",
    epochs: int = 20,
    lr: float = 1e-2,
    device: str | torch.device = "cpu",
    out: str | Path | None = None,
    *,
    width: int = 16,
    slab: int = 16,
    chunk_size: int = 32,
    bf16: bool = False,
    feature_cache_bytes: int = 2 * 1024**3,
    seed: int = 0,
) -> Path:
    """Train the prior decoder (SAM encoder frozen) with CE + Dice against the cached labels.

    Every step takes one case and a random slab of ``slab`` consecutive axial slices, and decodes each
    available modality on its own against the same label (each modality's prior must stand alone).
    Encoder features are kept in memory across epochs up to ``feature_cache_bytes``; past that they
    are computed on the fly. That matters on GPU with ``vit_b`` at 1024: one BraTS modality's features
    are about 256 x 64 x 64 x 155 floats (~650 MB), ~2.6 GB per case, so only small datasets or tiny
    SAMs are cached. ``epochs=0`` saves the randomly initialised decoder (a baseline).
    Saves ``{"decoder", "config", "fit"}`` to ``out`` (default ``<cache_dir>/prior_decoder.pt``) atomically.
    """
    cache_dir = Path(cache_dir)
    dev = torch.device(device)
    metas = [cache.load_meta(cache_dir, n) for n in names]
    train = [
        m for m in metas if m.has_label and cache.load_label(cache_dir, m.name) is not None and _available(m)
    ]
    if not train:
        raise ValueError(
            f"{cache_dir}: none of the {len(metas)} given cases has a label and a modality "
            "to fit the prior decoder on"
        )
    encoder = _slice_encoder(checkpoint, model_type, dev, chunk_size, bf16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = PriorDecoder3D(encoder.out_chans, NUM_CLASSES, width).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    store = _FeatureStore(encoder, feature_cache_bytes)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    decoder.train()
    for epoch in range(epochs):
        losses = []
        for i in torch.randperm(len(train), generator=generator).tolist():
            meta = train[i]
            avail = _available(meta)
            image = torch.from_numpy(cache.load_image(cache_dir, meta.name, mmap=False)[avail]).to(dev)[
                :, None
            ]
            stored = cache.load_label(cache_dir, meta.name, mmap=False)
            assert stored is not None  # training cases were chosen for having labels
            label = torch.from_numpy(stored.astype(np.int64)).to(dev)
            k = image.shape[-1]
            depth = min(slab, k)
            k0 = int(torch.randint(0, k - depth + 1, (1,), generator=generator))
            feats = store.features(meta.name, image, k0, k0 + depth)
            logits = decoder(
                feats,
                image[..., k0 : k0 + depth],
                torch.tensor(avail, device=dev),
                encoder.cell_size(*image.shape[2:4]),
            )
            target = label[None, None, ..., k0 : k0 + depth].expand(len(avail), -1, -1, -1, -1)
            loss = loss_fn(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        logger.info("prior decoder epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1])
    out = Path(out) if out is not None else cache_dir / DEFAULT_DECODER_NAME
    payload: dict[str, Any] = {
        "format": DECODER_FORMAT,
        "decoder": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
        "config": {
            "model_type": model_type,
            "checkpoint": str(Path(checkpoint).expanduser().resolve()),
            "img_size": encoder.img_size,
            "patch_size": encoder.patch_size,
            "in_channels": encoder.out_chans,
            "num_classes": NUM_CLASSES,
            "width": width,
            "num_modalities": NUM_MODALITIES,
        },
        "fit": _fit_settings(epochs, lr, width, slab, seed, names) | {"history": history},
    }
    atomic_write_bytes(out, lambda f: torch.save(payload, f))
    return out


def _fit_settings(
    epochs: int, lr: float, width: int, slab: int, seed: int, names: Sequence[str]
) -> dict[str, Any]:
    return {"epochs": epochs, "lr": lr, "width": width, "slab": slab, "seed": seed, "names": sorted(names)}


def load_prior_decoder(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[PriorDecoder3D, dict[str, Any]]:
    """Read a decoder file written by :func:`fit_prior_decoder`: the decoder (eval mode) and the whole payload."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prior decoder {path} not found: fit it first (`smml priors` or fit_prior_decoder)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        config = payload["config"]
        decoder = PriorDecoder3D(
            config["in_channels"], config["num_classes"], config["width"], config["num_modalities"]
        )
        decoder.load_state_dict(payload["decoder"])
    except Exception as err:  # unpickling, missing keys and shape mismatches all mean a bad file
        raise ValueError(
            f"{path}: not a prior decoder file written by fit_prior_decoder ({type(err).__name__}: {err})"
        ) from err
    return decoder.to(device).eval(), payload


def export_priors(
    cache_dir: str | Path,
    names: Sequence[str] | None,
    decoder_path: str | Path,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    *,
    chunk_size: int = 32,
    bf16: bool = False,
) -> dict[str, list[str]]:
    """Write each case's priors ``(4, C, D, H, W)`` float16 (softmax per modality) with ``cache.write_prior``.

    ``names=None`` takes every complete case. Missing modalities (``meta.available`` False) get zeros.
    Cases that already have ``prior.npy`` are skipped unless ``overwrite``, so an interrupted export
    resumes; the write is atomic, so no case is left with a partial file. ``checkpoint`` defaults to the
    one the decoder was fitted on. Returns ``{"written": [...], "skipped": [...]}``.
    """
    cache_dir = Path(cache_dir)
    dev = torch.device(device)
    todo = list(cache.list_cases(cache_dir) if names is None else names)
    decoder, payload = load_prior_decoder(decoder_path, dev)
    config = payload["config"]
    done = set() if overwrite else {n for n in todo if cache.has_prior(cache_dir, n)}
    pending = [n for n in todo if n not in done]
    result: dict[str, list[str]] = {"written": [], "skipped": [n for n in todo if n in done]}
    if not pending:
        return result
    encoder = _slice_encoder(checkpoint or config["checkpoint"], config["model_type"], dev, chunk_size, bf16)
    if encoder.out_chans != config["in_channels"]:
        raise ValueError(
            f"{decoder_path}: decoder expects {config['in_channels']}-channel SAM features, "
            f"the checkpoint's encoder gives {encoder.out_chans}; use the checkpoint it was fitted on"
        )
    for name in tqdm(pending, desc="SAM priors", unit="case"):
        meta = cache.load_meta(cache_dir, name)
        image = torch.from_numpy(cache.load_image(cache_dir, name, mmap=False))
        prior = np.zeros((NUM_MODALITIES, config["num_classes"], *meta.cropped_shape), dtype=np.float16)
        with torch.inference_mode():
            for m in _available(meta):
                volume = image[m][None, None].to(dev)
                cell = encoder.cell_size(*volume.shape[2:4])
                logits = decoder(encoder(volume), volume, torch.tensor([m], device=dev), cell)
                prior[m] = logits.float().softmax(1)[0].cpu().numpy()
        cache.write_prior(cache_dir, name, prior)
        result["written"].append(name)
    return result


def run_priors(
    cache_dir: str | Path,
    checkpoint: str | Path,
    model_type: str = "vit_b",
    epochs: int = 20,
    *,
    train_names: Sequence[str] | None = None,
    labeled_fraction: float = 1.0,
    labeled_cases: str | Path | None = None,
    data_seed: int = 0,
    names: Sequence[str] | None = None,
    lr: float = 1e-2,
    device: str | torch.device = "cpu",
    decoder_path: str | Path | None = None,
    overwrite: bool = False,
    width: int = 16,
    slab: int = 16,
    chunk_size: int = 32,
    bf16: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole prior stage: fit the decoder on the labeled training cases, export priors for all cases.

    ``train_names`` should be the training split (default: every labelled case in ``names``, which lets
    validation/test labels shape their priors; the priors are training-time only, but pass the split).
    In semi-supervised training the decoder is fitted on the labeled cases only, chosen from
    ``train_names`` by :func:`~smml_lightning.data.splits.labeled_subset` with ``labeled_fraction`` or
    ``labeled_cases`` and ``data_seed`` (the datamodule's ``data.labeled_*`` and ``data.seed``), so it never
    reads an unlabeled case's label; their priors are still exported (SAM sees images only). ``seed`` seeds
    the decoder's fit. The run holds the cache folder as ``smml prepare`` does
    (:func:`~smml_lightning.data.prepare.cache_lock`): a concurrent prepare or priors run on the same cache
    raises ``ValueError`` naming the holder. A decoder file fitted with the same settings and cases is
    reused unless ``overwrite``, so a rerun after an interrupted export only exports what is missing.
    Returns the decoder path, the labeled cases, the export summary and the seconds spent fitting and
    exporting.
    """
    cache_dir = Path(cache_dir)
    all_names = list(cache.list_cases(cache_dir) if names is None else names)
    with cache_lock(cache_dir, "smml priors"):
        if train_names is None:
            train_names = [n for n in all_names if cache.load_meta(cache_dir, n).has_label]
        labeled = labeled_subset(train_names, labeled_fraction, labeled_cases, data_seed)
        path = Path(decoder_path) if decoder_path is not None else cache_dir / DEFAULT_DECODER_NAME
        wanted = {"model_type": model_type, "checkpoint": str(Path(checkpoint).expanduser().resolve())}
        settings = _fit_settings(epochs, lr, width, slab, seed, labeled)
        start = time.perf_counter()
        refit = overwrite or not _reusable(path, wanted, settings)
        if refit:
            fit_prior_decoder(
                cache_dir,
                labeled,
                checkpoint,
                model_type,
                epochs,
                lr,
                device,
                path,
                width=width,
                slab=slab,
                chunk_size=chunk_size,
                bf16=bf16,
                seed=seed,
            )
        else:
            logger.info("reusing prior decoder %s (fitted with the same settings)", path)
        fitted = time.perf_counter()
        # A new decoder makes every exported prior stale: export them all again.
        summary = export_priors(
            cache_dir, all_names, path, checkpoint, device, refit, chunk_size=chunk_size, bf16=bf16
        )
    return {
        "decoder": path,
        "labeled": labeled,
        **summary,
        "fit_seconds": fitted - start,
        "export_seconds": time.perf_counter() - fitted,
    }


def _reusable(path: Path, wanted: dict[str, str], settings: dict[str, Any]) -> bool:
    """Whether ``path`` holds a decoder fitted on the same SAM with the same settings and cases."""
    if not path.is_file():
        return False
    try:
        _, payload = load_prior_decoder(path)
    except ValueError:
        return False
    fit = {k: v for k, v in payload["fit"].items() if k != "history"}
    return all(payload["config"][k] == v for k, v in wanted.items()) and fit == settings
