"""``BratsDataModule``: patches for training, whole cases for validation, test and prediction.

Everything is read from the preprocessed cache (:mod:`smml_lightning.data.cache`). Training draws
label-balanced patches through a torchio ``Queue``; each patch gets ``n_masks`` modality availability
masks (SMML's two branches see two different subsets of the same patch). Evaluation yields whole
cropped cases one at a time.

Each training epoch's batches are a pure function of (seed, epoch, rank)
(:mod:`smml_lightning.data.stream`), and the datamodule's ``state_dict`` says how far the current
epoch got; Lightning stores it in checkpoints, so a run resumed mid-epoch replays the epoch's stream
up to that point and continues with exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchio as tio
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from smml_lightning.data import cache, splits
from smml_lightning.data.inputs import cache_name
from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.layouts import Case, discover
from smml_lightning.data.modalities import MODALITIES, sample_masks
from smml_lightning.data.resample import resampled_spacing
from smml_lightning.data.stream import (
    EpochQueue,
    EpochStream,
    MixedQueue,
    PatchCollate,
    PatchLoader,
    QueueSampler,
)
from smml_lightning.data.transforms import AugmentedPatches, StackedPatches, case_subject, misalign_case
from smml_lightning.io import atomic_write_text

# --- reader: torchio calls it lazily, in the Queue's worker processes ----------------------------


def _affine(npy_path: Path) -> np.ndarray:
    """Voxel-to-world matrix of the cropped grid: the case's spacing, no rotation.

    Rotations are then in millimetres, like the methods' augmentation on the 1 mm BraTS grid.
    """
    meta = cache.load_meta(npy_path.parent.parent, npy_path.parent.name)
    return np.diag([*meta.spacing, 1.0])


def read_label_npy(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """torchio reader of a cached ``label.npy`` (D, H, W) uint8, as one channel."""
    path = Path(path)
    return torch.from_numpy(np.array(np.load(path, mmap_mode="r"))[None]), _affine(path)


# --- evaluation dataset ---------------------------------------------------------------------------


class CachedCaseDataset(Dataset):
    """Whole cropped cases from the cache, for validation, test and prediction (batch size 1).

    Items: ``image`` float (4, D, H, W), ``label`` long (1, D, H, W) when the case has one, ``name``,
    and ``available`` bool (4,) from the case's metadata (which subsets are scored is the model's
    ``val_subsets`` / ``test_subsets``, restricted to what a case has).
    """

    def __init__(
        self,
        root: Path | str,
        names: Sequence[str],
        misalign_mm: float = 0.0,
        misalign_degrees: float = 0.0,
        seed: int = 0,
    ) -> None:
        """``misalign_mm`` / ``misalign_degrees`` (0: off) move every modality but T1ce by a rigid transform
        of that size, seeded by ``seed`` and the case name (:func:`misalign_case`), to score robustness to
        misregistered inputs; the label stays on T1ce's grid."""
        self.root = Path(root)
        self.names = list(names)
        self.available = {n: cache.load_meta(self.root, n).available for n in self.names}
        self.misalign = (float(misalign_mm), float(misalign_degrees))
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.names[index]
        image = torch.from_numpy(np.array(cache.load_image(self.root, name), dtype=np.float32))
        if any(self.misalign):
            spacing = cache.load_meta(self.root, name).spacing
            case_seed = zlib.crc32(f"{self.seed}:{name}".encode())
            image = misalign_case(image, spacing, *self.misalign, seed=case_seed)
        item: dict[str, Any] = {
            "image": image,
            "name": name,
            "available": torch.tensor(self.available[name], dtype=torch.bool),
        }
        label = cache.load_label(self.root, name)
        if label is not None:
            item["label"] = torch.from_numpy(np.array(label, dtype=np.int64))[None]
        return item


# --- the datamodule -------------------------------------------------------------------------------


class BratsDataModule(LightningDataModule):
    """BraTS cases from a preprocessed cache.

    Training subjects hold a case's label (a path and a ``reader``) and its cache folder: the dataset
    holds only paths and the main process never loads a volume. Each of the queue's workers takes one
    case at a time, reads its label, and cuts and augments ``samples_per_volume`` patches from windows
    of the memory-mapped image and prior (:class:`~smml_lightning.data.transforms.AugmentedPatches`);
    only the patches travel to the main process. With 300 cases nothing scales with the number of
    cases; memory is ``num_workers`` labels and windows plus ``queue_length`` patches of
    (5 + 4C) x P^3 values.

    Under DDP each rank's queue reads its own shard of the training cases through a
    ``DistributedSampler`` (padded to equal length so ranks run the same number of steps; with an
    odd count one case appears on two ranks). Validation uses a padded ``DistributedSampler`` too
    (equal step counts are the safe default for per-step logging). Test and prediction use
    ``UnrepeatedDistributedSampler``: rank r takes cases r, r + W, r + 2W, ..., so each case is
    scored exactly once overall and ranks differ by at most one case.

    Args:
        cache_dir: folder written by ``smml prepare``.
        split: split JSON ``{"train": [...], "val": [...], "test": [...]}`` or a folder of
            ``train.txt``/``val.txt``/``test.txt`` (read and checked by
            :mod:`~smml_lightning.data.splits`); ``None`` draws a seeded split of the cached cases
            with ``val_fraction``, ``test_fraction`` and ``seed``.
        output_dir: where to write the split used as ``split.json`` (rank 0 only), if given.
        patch_size: training patch edge (int) or (D, H, W).
        label_probabilities: patch-centre probability per internal class; default 1 each
            (label-balanced). Classes a case lacks are skipped and the rest renormalised.
        n_masks: availability masks per sample (SMML 2, single-branch 1).
        mask_ratio: ``None`` = uniform over the 15 subsets; else the expected fraction of dropped
            modalities (see :func:`~smml_lightning.data.modalities.subset_probabilities`).
        distinct_masks: a sample's masks are different subsets.
        use_prior: load the SAM priors (``prior.npy``) into training batches.
        augment: flips, rotation and intensity augmentation, per patch (:class:`AugmentedPatches`).
        predict_root: raw cases to predict on (any supported layout, modalities may be missing); they
            are validated and prepared into ``predict_dir`` first (resumable).
        predict_dir: cache to predict on (default with ``predict_root``: ``runs/predict_cache/<name>-<key>``,
            keyed by the input's path and content);
            neither given = the test split.
        labeled_fraction: share of the training cases whose labels are used (1: all). The labeled cases
            are drawn with ``seed`` from the training split (at least one); with ``output_dir`` their
            names are written to ``labeled.txt``.
        labeled_cases: a text file naming the labeled training cases, one per line (instead of
            ``labeled_fraction``); the other training cases are unlabeled and need no label in the cache.
        use_unlabeled: train on the unlabeled cases too (semi-supervised methods, e.g. CMC): batches then
            carry ``labeled`` (bool ``(B,)``) and mix both kinds at ``labeled_share``
            (:class:`~smml_lightning.data.stream.MixedQueue`). Off (supervised methods): only the labeled
            cases are used. An unlabeled case's label is never loaded and its patch centres are uniform.
            Either way an epoch has as many patches as the whole training split
            (``samples_per_volume`` per case), so every labeled fraction trains for the same number of
            steps per epoch (the labeled cases recur within an epoch).
        labeled_share: share of labeled samples in semi-supervised batches (0.5: the public CMC code's
            pairing of a labeled and an unlabeled batch).
        jitter_mm, jitter_degrees: per-modality rigid misalignment of training patches, up to these sizes
            (0: off; :class:`~smml_lightning.data.transforms.AugmentedPatches`).
        test_misalign_mm, test_misalign_degrees: misalign the test cases' modalities (all but T1ce) by a
            seeded rigid transform of this size (0: off), to measure robustness to misregistration.
    """

    def __init__(
        self,
        cache_dir: str,
        split: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        output_dir: str | None = None,
        patch_size: int | tuple[int, int, int] = 128,
        batch_size: int = 1,
        samples_per_volume: int = 4,
        queue_length: int = 32,
        num_workers: int = 2,
        label_probabilities: dict[int, float] | None = None,
        n_masks: int = 2,
        mask_ratio: float | None = None,
        distinct_masks: bool = True,
        use_prior: bool = False,
        augment: bool = True,
        predict_root: str | None = None,
        predict_dir: str | None = None,
        labeled_fraction: float = 1.0,
        labeled_cases: str | None = None,
        use_unlabeled: bool = False,
        labeled_share: float = 0.5,
        jitter_mm: float = 0.0,
        jitter_degrees: float = 0.0,
        test_misalign_mm: float = 0.0,
        test_misalign_degrees: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        splits.check_labeled_options(labeled_fraction, labeled_cases)
        if not 0.0 < float(labeled_share) < 1.0:
            raise ValueError(f"data.labeled_share must be in (0, 1), got {labeled_share}")
        for key in ("jitter_mm", "jitter_degrees", "test_misalign_mm", "test_misalign_degrees"):
            if float(getattr(self.hparams, key)) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self.hparams, key)}")
        if mask_ratio is not None and not 0.0 <= float(mask_ratio) <= 1.0:
            raise ValueError(
                f"data.mask_ratio must be null (uniform over the 15 subsets) or in [0, 1], got {mask_ratio}"
            )
        if n_masks < 1:
            raise ValueError(f"data.n_masks must be at least 1, got {n_masks}")
        # Fails now, not in the first batch, when n_masks distinct subsets cannot be drawn.
        sample_masks(1, n_masks, mask_ratio, distinct_masks, generator=torch.Generator().manual_seed(0))
        size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"data.patch_size must be a positive int or three of them, got {patch_size}")
        probs = (
            {c: 1.0 for c in range(NUM_CLASSES)} if label_probabilities is None else dict(label_probabilities)
        )
        bad = [c for c in probs if not 0 <= int(c) < NUM_CLASSES]
        if bad or any(p < 0 for p in probs.values()) or sum(probs.values()) <= 0:
            raise ValueError(
                f"data.label_probabilities must map classes 0..{NUM_CLASSES - 1} to non-negative weights "
                f"with a positive sum, got {label_probabilities}"
            )
        self.cache_dir = Path(cache_dir)
        self.patch_size: tuple[int, int, int] = (size[0], size[1], size[2])
        self.label_probabilities = {int(c): float(p) for c, p in probs.items()}
        self.splits: dict[str, list[str]] | None = None
        self._predict_cache: Path | None = None
        self.labeled: list[str] | None = None
        self._train_stream: EpochStream | None = None
        self._train_stream_resume: dict[str, int] | None = None

    # -- helpers -----------------------------------------------------------------------------------

    def world(self) -> tuple[int, int]:
        """``(world_size, rank)``: from the attached trainer, else torch.distributed, else (1, 0)."""
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _cached_cases(self, root: Path) -> list[str]:
        names = cache.list_cases(root)
        if not names:
            raise FileNotFoundError(f"cache folder {root} holds no prepared cases: run `smml prepare` first")
        for name in names:  # a truncated array fails here, named, not in a loader worker mid-epoch
            cache.check_case(root, name)
        return names

    def _make_splits(self) -> dict[str, list[str]]:
        hp: Any = self.hparams  # an AttributeDict of the constructor's arguments
        names = self._cached_cases(self.cache_dir)
        split = splits.choose_split(names, hp.split, hp.val_fraction, hp.test_fraction, hp.seed)
        if hp.output_dir is not None and self.world()[1] == 0:
            splits.write_split(split, Path(hp.output_dir) / "split.json")
        return split

    def _labeled_cases(self, train: Sequence[str]) -> list[str]:
        """The labeled training cases (:func:`~smml_lightning.data.splits.labeled_subset`)."""
        hp: Any = self.hparams
        return splits.labeled_subset(train, hp.labeled_fraction, hp.labeled_cases, hp.seed)

    def _check_train_cases(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError(f"the training split of {self.cache_dir} is empty")
        for name in names:
            meta = cache.load_meta(self.cache_dir, name)
            shape = meta.cropped_shape
            if any(p > s for p, s in zip(self.patch_size, shape)):
                raise ValueError(
                    f"case {name!r}: patch size {self.patch_size} is larger than its cropped size {shape}: "
                    "lower data.patch_size or re-run `smml prepare` with a larger minimum size"
                )
            labeled = self.labeled is None or name in self.labeled
            if labeled and (
                not meta.has_label or not (cache.case_dir(self.cache_dir, name) / "label.npy").is_file()
            ):
                raise ValueError(
                    f"case {name!r} in {self.cache_dir} has no label and cannot be used for training"
                )
            if not all(meta.available):
                absent = [m for m, have in zip(MODALITIES, meta.available) if not have]
                raise ValueError(
                    f"case {name!r} in {self.cache_dir} lacks {', '.join(absent)}: training needs all four "
                    "modalities (the modality masks simulate the missing ones, and each encoder's auxiliary "
                    "loss reads its own modality); score such a case with `test` or `predict` instead"
                )
            if self.hparams["use_prior"] and not cache.has_prior(self.cache_dir, name):
                raise FileNotFoundError(
                    f"case {name!r}: data.use_prior is set but {cache.case_dir(self.cache_dir, name)}/prior.npy "
                    "is missing: run `smml priors` first"
                )

    def _eval_loader(self, dataset: CachedCaseDataset, padded: bool) -> DataLoader:
        world_size, rank = self.world()
        sampler: DistributedSampler | None = None
        if world_size > 1:
            kind = DistributedSampler if padded else UnrepeatedDistributedSampler
            sampler = kind(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=self.hparams["num_workers"])

    # -- Lightning hooks ---------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        hp: Any = self.hparams
        if self.splits is None:
            self.splits = self._make_splits()
        if self.labeled is None:
            self.labeled = self._labeled_cases(self.splits["train"])
            if (
                len(self.labeled) < len(self.splits["train"])
                and hp.output_dir is not None
                and self.world()[1] == 0
            ):
                atomic_write_text(
                    Path(hp.output_dir) / "labeled.txt", "".join(f"{n}\n" for n in self.labeled)
                )
        if stage in (None, "fit"):
            self._check_train_cases(self.splits["train"] if hp.use_unlabeled else self.labeled)

    def _split(self, part: str) -> list[str]:
        if self.splits is None:
            raise RuntimeError("BratsDataModule.setup() must run before its dataloaders are requested")
        return self.splits[part]

    def _queue(
        self, names: Sequence[str], labeled: bool, stream: EpochStream, length: int | None
    ) -> EpochQueue:
        """A training queue over ``names``, sharded across ranks under DDP, drawing from ``stream``."""
        hp: Any = self.hparams  # an AttributeDict of the constructor's arguments
        dataset = tio.SubjectsDataset(
            [case_subject(self.cache_dir, n, read_label_npy, labeled=labeled) for n in names],
            transform=AugmentedPatches(
                self.patch_size,
                hp.samples_per_volume,
                self.label_probabilities,
                augment=hp.augment,
                use_prior=hp.use_prior,
                jitter_mm=hp.jitter_mm,
                jitter_degrees=hp.jitter_degrees,
            ),
        )
        world_size, rank = self.world()
        subject_sampler: DistributedSampler | None = None
        if world_size > 1:
            subject_sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=hp.seed
            )
        return EpochQueue(
            dataset,
            max_length=hp.queue_length,
            samples_per_volume=hp.samples_per_volume,
            sampler=StackedPatches(self.patch_size),  # the workers cut and augmented the patches
            subject_sampler=subject_sampler,
            num_workers=hp.num_workers,
            shuffle_subjects=subject_sampler is None,
            shuffle_patches=True,
            start_background=False,  # the first fill starts the workers, from the epoch's stream
            stream=stream,
            length=length,
        )

    def train_dataloader(self) -> PatchLoader:
        hp: Any = self.hparams
        names = self._split("train")
        labeled = self.labeled if self.labeled is not None else list(names)
        unlabeled = [n for n in names if n not in set(labeled)] if hp.use_unlabeled else []
        world_size, rank = self.world()
        # The run's torch seed: seed_everything's, also after a resume restored the global states.
        stream = EpochStream((torch.initial_seed(), hp.seed), rank)
        if self._train_stream_resume is not None:
            stream.load_state_dict(self._train_stream_resume)
            self._train_stream_resume = None
        self._train_stream = stream
        # An epoch has as many patches as the whole training split (per rank, padded like the sampler).
        length = -(-len(names) // world_size) * hp.samples_per_volume
        queue: EpochQueue | MixedQueue
        if unlabeled:
            queue = MixedQueue(
                self._queue(labeled, True, stream, None),
                self._queue(unlabeled, False, stream, None),
                hp.labeled_share,
                length,
            )
        else:
            queue = self._queue(labeled, True, stream, None if len(labeled) == len(names) else length)
        collate = PatchCollate(
            hp.n_masks,
            hp.mask_ratio,
            hp.distinct_masks,
            hp.use_prior,
            stream,
            semi_supervised=bool(unlabeled),
        )
        # A generator of its own: creating an iterator then draws nothing from the global generator.
        return PatchLoader(
            queue,
            batch_size=hp.batch_size,
            sampler=QueueSampler(queue, hp.batch_size),
            num_workers=0,
            collate_fn=collate,
            generator=torch.Generator(),
        )

    def state_dict(self) -> dict[str, Any]:
        """How far the training stream got in its epoch; Lightning puts it in every checkpoint."""
        return {} if self._train_stream is None else {"train_stream": self._train_stream.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls this on resume before it builds the training loader, which then replays the
        batches the checkpoint's epoch had used (see :class:`EpochStream`)."""
        self._train_stream_resume = state_dict.get("train_stream")

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(CachedCaseDataset(self.cache_dir, self._split("val")), padded=True)

    def test_dataloader(self) -> DataLoader:
        names = self._split("test")
        if not names:
            raise ValueError(
                f"the test split of {self.cache_dir} is empty: set data.test_fraction > 0 or "
                "give data.split with test cases"
            )
        hp: Any = self.hparams
        return self._eval_loader(
            CachedCaseDataset(self.cache_dir, names, hp.test_misalign_mm, hp.test_misalign_degrees, hp.seed),
            padded=False,
        )

    @property
    def predict_cache(self) -> Path:
        """The cache prediction reads: ``predict_dir``; else, with ``predict_root``, a cache under
        ``runs/predict_cache/`` named by the input's path and content
        (:func:`~smml_lightning.data.inputs.cache_name`: folders of the same name never share one);
        else ``cache_dir``."""
        hp: Any = self.hparams  # an AttributeDict of the constructor's arguments
        if hp.predict_dir is not None:
            return Path(hp.predict_dir)
        if hp.predict_root is not None:
            if self._predict_cache is None:
                self._predict_cache = (
                    Path("runs") / "predict_cache" / cache_name(hp.predict_root, self._predict_cases())
                )
            return self._predict_cache
        return self.cache_dir

    def _predict_cases(self) -> list[Case]:
        return discover(self.hparams["predict_root"])

    def prepare_data(self) -> None:
        """Prepare raw prediction inputs (rank 0 only; skips cases already prepared)."""
        hp: Any = self.hparams  # an AttributeDict of the constructor's arguments
        if hp.predict_root is None or self.trainer is None or self.trainer.state.fn != "predict":
            return
        from .prepare import prepare

        summary = prepare(
            hp.predict_root,
            self.predict_cache,
            min_size=self.patch_size,
            require_all=False,
            require_label=False,
            workers=min(2, hp.num_workers) or 1,
            spacing=self.training_spacing(),
        )
        for name, reason in summary.failed.items():  # the others are still predicted
            rank_zero_warn(f"case {name} of {hp.predict_root} is not predicted: {reason}")

    def training_spacing(self) -> tuple[float, float, float] | None:
        """The training cache's voxel spacing when ``smml prepare --spacing`` resampled it (prediction inputs
        are resampled to it), else None."""
        try:
            names = cache.list_cases(self.cache_dir)
        except FileNotFoundError:
            return None
        if not names:
            return None
        return resampled_spacing(cache.load_meta(self.cache_dir, names[0]))

    def check_ready(self) -> None:
        """Fail early, with what to do, when the training cache is missing."""
        if not self.cache_dir.is_dir() or not cache.list_cases(self.cache_dir):
            raise SystemExit(
                f"no prepared cases in {self.cache_dir}.\n"
                "  Real data: request BraTS from the challenge pages (e.g. https://www.med.upenn.edu/sbia/brats2018/data.html,\n"
                "  https://www.synapse.org/brats for 2021/2023), then `smml prepare <download> "
                f"{self.cache_dir}`\n  and, for SMML, `smml priors {self.cache_dir} --sam_checkpoint <sam.pth>`.\n"
                "  Synthetic data instead: `make demo` (or `smml synth runs/syn --cases 24 --shape [64,64,48]`,\n"
                "  `smml prepare runs/syn runs/syn_cache --min_size [48,48,48]`, then --data.cache_dir=runs/syn_cache)."
            )

    def case_meta(self, name: str, stage: str = "fit") -> cache.CaseMeta:
        """Metadata of a case in the training cache, or in the prediction cache for ``stage="predict"``."""
        return cache.load_meta(self.predict_cache if stage == "predict" else self.cache_dir, name)

    def predict_dataloader(self) -> DataLoader:
        root = self.predict_cache
        if root == self.cache_dir and self.hparams["predict_root"] is None:
            return self.test_dataloader()
        names = self._cached_cases(root)
        if (
            self.hparams["predict_root"] is not None
        ):  # only the input's cases as it is now, whatever the cache holds
            present = {case.name for case in self._predict_cases()}
            names = [n for n in names if n in present]
        return self._eval_loader(CachedCaseDataset(root, names), padded=False)
