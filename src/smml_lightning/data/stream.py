"""The training stream: each epoch's batches as a pure function of (seeds, epoch, rank), resumable
mid-epoch at the exact batch.

:class:`EpochStream` owns the random source and the position in the epoch; :class:`EpochQueue` (a
torchio ``Queue``) draws its patches from it and restarts cleanly at each epoch; :class:`QueueSampler`
passes Lightning's epoch on to the queue and skips the batches a checkpoint had used; :class:`MixedQueue`
interleaves a labeled and an unlabeled queue for semi-supervised training;
:class:`PatchLoader` is the stateful loader Lightning checkpoints; :class:`PatchCollate` stacks the
patches and draws the modality masks from the stream.
:class:`~smml_lightning.data.datamodule.BratsDataModule` wires them together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset, DistributedSampler

from smml_lightning.data.modalities import NUM_MODALITIES, sample_masks

UNLABELED = -1
"""Label value of an unlabeled sample's voxels in a semi-supervised training batch."""


class EpochStream:
    """The random source of the training batches, and how far the current epoch got.

    Every random choice behind an epoch's batches (the order of the cases, their augmentation, the patch
    centres, the patch shuffle, the modality masks) is a function of ``(seeds, rank, epoch)`` only, never
    of the global random state that the model also draws from. An epoch's batches can then be made again
    at will: a run resumed from a checkpoint written after batch k of an epoch starts that epoch's stream
    afresh, produces and discards its first k batches' patches (data time only, no model work) and
    continues with exactly the batches the uninterrupted run saw. ``epoch`` and ``batches`` (handed out
    this epoch) are what the datamodule's ``state_dict`` puts into checkpoints. Iterating the loader
    without ``set_epoch`` (outside Lightning) replays the same epoch each time, as a
    ``DistributedSampler`` does.

    The queue's draws come from ``generator``, reseeded at the start of each epoch and swapped in for
    torch's global CPU generator while the queue fills (:meth:`drawing`): torchio's samplers and
    transforms, and the DataLoader that feeds the queue (its case shuffle and its workers' base seed),
    all draw from the global one. Workers are seeded by torch from that base seed, so augmentation done
    in workers follows the stream too. The masks of batch b come from a generator of their own seeded by
    ``(seeds, rank, epoch, b)``, independent of how many draws the queue made.

    Args:
        seeds: the run's seeds (the torch seed ``seed_everything`` set, and ``data.seed``).
        rank: the process's global rank: ranks draw different streams.
    """

    def __init__(self, seeds: Sequence[int], rank: int) -> None:
        self.seeds = tuple(int(s) for s in seeds)
        self.rank = rank
        self.epoch = 0
        self.batches = 0
        self.generator = torch.Generator()
        self._resume_at: tuple[int, int] | None = None

    def _seed(self, *keys: int) -> int:
        # SeedSequence mixes the keys so that neighbouring epochs or batches get unrelated streams.
        entropy = [k & 0xFFFF_FFFF_FFFF_FFFF for k in (*self.seeds, self.rank, self.epoch, *keys)]
        return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])

    def begin(self, epoch: int) -> int:
        """Start ``epoch``'s stream; returns how many of its batches a loaded checkpoint had already used."""
        self.epoch = epoch
        self.generator.manual_seed(self._seed(0))
        used = self._resume_at[1] if self._resume_at is not None and self._resume_at[0] == epoch else 0
        self._resume_at = None
        self.batches = used
        return used

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Run a block with ``generator`` as torch's global CPU generator, then restore the global state."""
        outside = torch.get_rng_state()
        torch.set_rng_state(self.generator.get_state())
        try:
            yield
        finally:
            self.generator.set_state(torch.get_rng_state())
            torch.set_rng_state(outside)

    def next_mask_generator(self) -> torch.Generator:
        """The generator of the next batch's masks; counts that batch as handed out."""
        generator = torch.Generator().manual_seed(self._seed(1, self.batches))
        self.batches += 1
        return generator

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Remember where a checkpoint stopped; :meth:`begin` of that epoch skips the batches it used."""
        self._resume_at = (int(state["epoch"]), int(state["batches"]))


class EpochQueue(tio.Queue):
    """A ``tio.Queue`` that draws from an :class:`EpochStream` and restarts cleanly at each epoch.

    A plain queue carries its patches and its pass over the cases from one epoch to the next, so an
    epoch's patches depend on all earlier epochs; this one starts each epoch empty, with a new pass
    over the cases (and new workers), so an epoch depends on its stream only.
    """

    def __init__(self, *args: Any, stream: EpochStream, length: int | None = None, **kwargs: Any) -> None:
        """``length``: patches per epoch (default: torchio's, one pass over the cases); a longer epoch
        cycles over the cases (torchio's queue starts a new pass when one ends)."""
        super().__init__(*args, **kwargs)
        self.stream = stream
        self.length = length

    def __len__(self) -> int:
        return super().__len__() if self.length is None else self.length

    def __getitem__(self, index: int) -> tio.Subject:
        with self.stream.drawing():
            return super().__getitem__(index)

    def reset(self) -> None:
        """Empty the queue; the next fill starts a new pass over the cases (and new workers)."""
        self.patches_list = []
        self._incomplete_subject = None
        self._num_patches_incomplete = 0
        self._num_sampled_subjects = 0
        self._subjects_iterable = None

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the sampler that shards the cases across ranks, if any."""
        if self.subject_sampler is not None and hasattr(self.subject_sampler, "set_epoch"):
            self.subject_sampler.set_epoch(epoch)

    def start_epoch(self, epoch: int, batch_size: int) -> int:
        """Start ``epoch`` and replay the batches a loaded checkpoint had used; returns their number."""
        used = self.stream.begin(epoch)
        self.reset()
        for _ in range(min(used * batch_size, len(self))):
            self[0]  # the queue ignores the index; the patch is produced and dropped
        return used


class MixedQueue(Dataset):
    """Labeled and unlabeled patches from two :class:`EpochQueue` s, interleaved at a fixed share.

    Position ``i`` of an epoch is labeled when ``floor((i + 1) s) > floor(i s)`` for the labeled share
    ``s``, so every run of positions holds labeled samples in that share, as evenly as possible: at
    ``s = 0.5`` each batch of two has one labeled and one unlabeled sample (the public CMC code pairs a
    labeled and an unlabeled batch at every step); with batches of one they alternate. Both queues draw
    from one :class:`EpochStream` in the order of the positions, so an epoch is a function of its stream
    and a resumed epoch replays its first batches exactly as :class:`EpochQueue` does.
    """

    def __init__(self, labeled: EpochQueue, unlabeled: EpochQueue, labeled_share: float, length: int) -> None:
        if labeled.stream is not unlabeled.stream:
            raise ValueError("MixedQueue: both queues must draw from one EpochStream")
        if not 0.0 < labeled_share < 1.0:
            raise ValueError(f"MixedQueue: labeled_share must be in (0, 1), got {labeled_share}")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.labeled_share = float(labeled_share)
        self.length = int(length)
        self.stream = labeled.stream

    def __len__(self) -> int:
        return self.length

    def is_labeled(self, index: int) -> bool:
        return math.floor((index + 1) * self.labeled_share) > math.floor(index * self.labeled_share)

    def __getitem__(self, index: int) -> tio.Subject:
        return (self.labeled if self.is_labeled(index) else self.unlabeled)[index]

    def set_epoch(self, epoch: int) -> None:
        self.labeled.set_epoch(epoch)
        self.unlabeled.set_epoch(epoch)

    def start_epoch(self, epoch: int, batch_size: int) -> int:
        """Start ``epoch`` in both queues and replay the positions a loaded checkpoint had used."""
        used = self.stream.begin(epoch)
        self.labeled.reset()
        self.unlabeled.reset()
        for index in range(min(used * batch_size, len(self))):
            self[index]  # produced in the epoch's order and dropped
        return used


class QueueSampler(DistributedSampler):
    """Sequential indices over an :class:`EpochQueue` (or :class:`MixedQueue`); starting an iteration
    starts the queue's epoch.

    Lightning calls ``set_epoch`` on the loader's sampler each epoch, but never sees the sampler
    inside the queue that shards the cases across ranks; this passes the epoch on so every epoch
    reshuffles the shards. It is a ``DistributedSampler`` with one replica only so that Lightning
    keeps it in place under DDP instead of sharding the patches a second time.

    ``__iter__`` runs at the first fetch of an epoch (the loader's batch sampler is a generator), which
    is after Lightning's ``set_epoch`` even when the loader's iterator was made before it (Lightning
    does so for the first epoch of a run, resumed or not). After a mid-epoch resume it yields only the
    indices of the batches not yet used; the loader's length stays the whole epoch, as Lightning's
    counters expect.
    """

    dataset: EpochQueue | MixedQueue

    def __init__(self, queue: EpochQueue | MixedQueue, batch_size: int) -> None:
        super().__init__(queue, num_replicas=1, rank=0, shuffle=False)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        used = self.dataset.start_epoch(self.epoch, self.batch_size)
        return iter(range(min(used * self.batch_size, len(self.dataset)), len(self.dataset)))


class PatchLoader(tio.SubjectsLoader):
    """The training loader, stateful in Lightning's sense (``state_dict``/``load_state_dict``).

    Lightning saves a stateful loader's state with its loop state and gives it back on a mid-epoch
    resume when it sets up the data after restoring the loops. When the loader is built earlier (a
    model whose ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``, as ours do),
    Lightning never gives it back; the datamodule's ``load_state_dict`` covers that case with the same
    position, so whichever arrives, the epoch resumes at the same batch.
    """

    dataset: EpochQueue

    def state_dict(self) -> dict[str, int]:
        return self.dataset.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.stream.load_state_dict(state)


@dataclass
class PatchCollate:
    """Stack queued patches into a training batch and draw each sample's modality masks.

    It runs in the main process (the loader around the queue has no workers), once per batch; the
    masks come from the stream's per-batch generator (:meth:`EpochStream.next_mask_generator`).

    With ``semi_supervised`` the batch also has ``labeled`` (bool ``(B,)``) and the label rows of
    unlabeled samples are :data:`UNLABELED` (-1, which any loss reading them rejects): an unlabeled
    case's label is never loaded.
    """

    n_masks: int
    mask_ratio: float | None
    distinct: bool
    use_prior: bool
    stream: EpochStream
    semi_supervised: bool = False

    def _labels(self, patches: list[tio.Subject]) -> torch.Tensor:
        if not self.semi_supervised:
            return torch.stack([cast(tio.Image, p["label"]).data for p in patches]).long()
        shape = (1, *cast(tio.Image, patches[0]["image"]).data.shape[1:])
        return torch.stack(
            [
                cast(tio.Image, p["label"]).data.long() if p["labeled"] else torch.full(shape, UNLABELED)
                for p in patches
            ]
        )

    def __call__(self, patches: list[tio.Subject]) -> dict[str, torch.Tensor]:
        def stacked(key: str) -> torch.Tensor:
            return torch.stack([cast(tio.Image, p[key]).data for p in patches])

        batch = {
            "image": stacked("image").float(),
            "label": self._labels(patches),
            "masks": sample_masks(
                len(patches),
                self.n_masks,
                self.mask_ratio,
                self.distinct,
                generator=self.stream.next_mask_generator(),
            ),
        }
        if self.semi_supervised:
            batch["labeled"] = torch.tensor([bool(p["labeled"]) for p in patches])
        if self.use_prior:
            prior = stacked("prior").float()
            batch["prior"] = prior.reshape(prior.shape[0], NUM_MODALITIES, -1, *prior.shape[2:])
        return batch
