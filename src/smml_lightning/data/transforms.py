"""Training patches, cut and augmented in the queue's workers, one case at a time.

The recipe follows the methods (RFNet, mmFormer, SMML): flips on the three axes, a rotation of up to
10 degrees, and a per-channel intensity scale (0.9-1.1) and shift (+-0.1) of the MRI channels, drawn
per patch (the methods crop one patch per case and augment it).

Why per patch and in the worker: augmenting a whole case before cutting patches resamples every voxel
of 4 image and 4*C prior channels (~4 M voxels per channel at BraTS size) to use four patches of it, and
torchio's queue then builds the label-balanced sampling map and cuts the patches in the main process,
serial with training. Here a worker reads the label, picks the patch centres with torchio's
``LabelSampler`` map, reads from the memory-mapped cache only a window around each centre large enough
for that patch's rotation, resamples the window to the patch, and hands the finished patches to the
main process stacked along the first axis (:class:`StackedPatches` cuts them apart there).

Unlabeled training cases (semi-supervised training) never read their label: their patch centres are
drawn uniformly over the case (a label-guided centre would leak the label, as the public CMC code's
cropping does) and their patches carry no ``label``.

Misalignment (CMC's second claim is robustness to modalities that are not co-registered):
:func:`move_modalities` moves each modality by its own small rigid transform (a rotation about the
patch or case centre and a shift, in millimetres) while the label and a reference modality stay put.
``AugmentedPatches(jitter_mm=..., jitter_degrees=...)`` applies a random one to every training patch
(off by default) and :func:`misalign_case` applies a seeded one of a given size to a whole test case.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio

from smml_lightning.data import cache
from smml_lightning.data.modalities import MODALITIES

PRIOR_DTYPE = torch.float16
"""Priors wait in the queue as float16: a 4*C-channel prior in float32 would dominate its memory."""


def rotation_matrix(angles: Sequence[float]) -> torch.Tensor:
    """``R_2 @ R_1 @ R_0`` for rotations by ``angles`` (radians) about voxel axes 0, 1 and 2."""
    out = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def rotated_grid(patch: Sequence[int], spacing: Sequence[float], rotation: torch.Tensor) -> torch.Tensor:
    """Voxel offsets ``(P0, P1, P2, 3)`` from the patch centre at which a rotated patch samples its source.

    The rotation acts in millimetres (``spacing``), so anisotropic grids rotate like the anatomy does.
    """
    s = torch.tensor(spacing, dtype=torch.float64)
    axes = [(torch.arange(p, dtype=torch.float64) - (p - 1) / 2) for p in patch]
    mm = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) * s
    return (mm @ rotation.T) / s


def read_window(
    array: np.ndarray, lo: Sequence[int] | np.ndarray, hi: Sequence[int] | np.ndarray
) -> np.ndarray:
    """``array[..., lo:hi]`` over the last three axes, zero outside the array (the cache's background)."""
    shape = array.shape[-3:]
    inner = tuple(slice(max(int(a), 0), min(int(b), n)) for a, b, n in zip(lo, hi, shape))
    pad = [(max(-a, 0), max(b - n, 0)) for a, b, n in zip(lo, hi, shape)]
    index: tuple[Any, ...] = (Ellipsis, *inner)
    window = np.asarray(array[index])
    if any(p != (0, 0) for p in pad):
        window = np.pad(window, [(0, 0)] * (window.ndim - 3) + pad)
    return window


JITTER_REFERENCE = MODALITIES.index("t1ce")
"""The modality misalignment leaves in place: BraTS co-registers every modality to T1ce."""


def move_modalities(
    image: torch.Tensor,
    angles: torch.Tensor,
    shifts_mm: torch.Tensor,
    spacing: Sequence[float],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample each modality of ``image`` ``(M, k, *S)`` (``k`` channels per modality) under its own
    rigid transform: a rotation by ``angles[m]`` (radians, about voxel axes 0, 1, 2, in millimetres)
    about the grid centre followed by a shift of ``shifts_mm[m]`` (mm per axis). Output voxel ``x`` of
    modality ``m`` reads the input at ``R_m^-1 (x - c - t_m) + c``, zero outside; a modality whose angles
    and shifts are all zero is returned unchanged.
    """
    if image.ndim != 5 or angles.shape != (image.shape[0], 3) or shifts_mm.shape != (image.shape[0], 3):
        raise ValueError(
            f"move_modalities: image (M, k, *S) with angles and shifts (M, 3), got "
            f"{tuple(image.shape)}, {tuple(angles.shape)}, {tuple(shifts_mm.shape)}"
        )
    size = image.shape[2:]
    s = torch.tensor(spacing, dtype=torch.float64)
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) for n in size]
    mm = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) * s  # output positions about the centre
    out = image.clone()
    for m in range(image.shape[0]):
        if not (angles[m].any() or shifts_mm[m].any()):
            continue
        rotation = rotation_matrix([float(a) for a in angles[m]])
        source = ((mm - shifts_mm[m].double()) @ rotation) / s  # R^-1 = R^T: rows times R
        grid = (2 * source / torch.tensor([max(n - 1, 1) for n in size], dtype=torch.float64)).flip(-1)
        sampled = F.grid_sample(
            image[m].float()[None], grid[None].float(), mode=mode, padding_mode="zeros", align_corners=True
        )[0]
        out[m] = sampled.to(image.dtype)
    return out


def random_rigid(
    count: int,
    max_mm: float,
    max_degrees: float,
    fixed: Sequence[int] = (JITTER_REFERENCE,),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angles (radians) and shifts (mm), ``(count, 3)`` each, uniform in +-``max_degrees`` and +-``max_mm``
    per axis; zero for the modalities in ``fixed``."""
    angles = torch.deg2rad(
        (torch.rand(count, 3, generator=generator, dtype=torch.float64) * 2 - 1) * max_degrees
    )
    shifts = (torch.rand(count, 3, generator=generator, dtype=torch.float64) * 2 - 1) * max_mm
    keep = list(fixed)
    angles[keep], shifts[keep] = 0.0, 0.0
    return angles, shifts


def misalign_case(
    image: torch.Tensor,
    spacing: Sequence[float],
    shift_mm: float,
    degrees: float,
    seed: int,
    fixed: Sequence[int] = (JITTER_REFERENCE,),
) -> torch.Tensor:
    """A whole case ``(M, *S)`` with every modality but ``fixed`` moved by a rigid transform of a given
    size: a shift of exactly ``shift_mm`` along a random direction and a rotation by ``degrees`` about each
    voxel axis in turn, with random signs. Seeded, so every method is scored on the same inputs."""
    g = torch.Generator().manual_seed(seed)
    m = image.shape[0]
    direction = torch.randn(m, 3, generator=g, dtype=torch.float64)
    shifts = direction / direction.norm(dim=1, keepdim=True) * shift_mm
    signs = torch.randint(0, 2, (m, 3), generator=g).double() * 2 - 1
    angles = signs * math.radians(degrees)
    shifts[list(fixed)], angles[list(fixed)] = 0.0, 0.0
    return move_modalities(image[:, None], angles, shifts, spacing)[:, 0]


class AugmentedPatches(tio.Transform):
    """Worker-side transform: a case subject -> its ``num_patches`` training patches, augmented, stacked.

    The input subject (:func:`case_subject`) holds the case's ``label`` (a ``LabelMap``) and its cache
    folder ``case_dir``; image and prior are read from there, window by window. The output has
    ``image`` (4, n*P0, P1, P2) float32, ``label`` (1, n*P0, P1, P2) uint8 and, with priors, ``prior``
    (4*C, n*P0, P1, P2) float16. An unlabeled subject (``labeled=False``, no label) gets uniformly drawn
    patch centres and its patches have no ``label``. ``jitter_mm`` / ``jitter_degrees`` (0: off) move each
    modality but T1ce (and its priors) by its own random rigid transform per patch, up to these sizes
    (:func:`move_modalities`; voxels moved in from outside the patch are zero).
    Random draws use torch's global generator, which the DataLoader seeds per worker.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        num_patches: int,
        label_probabilities: dict[int, float],
        augment: bool = True,
        use_prior: bool = False,
        flip_axes: Sequence[int] = (0, 1, 2),
        degrees: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
        shift: float = 0.1,
        jitter_mm: float = 0.0,
        jitter_degrees: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if jitter_mm < 0 or jitter_degrees < 0:
            raise ValueError(f"jitter_mm and jitter_degrees must be >= 0, got {jitter_mm}, {jitter_degrees}")
        self.jitter_mm, self.jitter_degrees = float(jitter_mm), float(jitter_degrees)
        self.patch_size: tuple[int, int, int] = cast(tuple[int, int, int], tuple(int(p) for p in patch_size))
        self.num_patches = int(num_patches)
        self.sampler = tio.LabelSampler(self.patch_size, "label", label_probabilities)
        self.augment = augment
        self.use_prior = use_prior
        self.flip_axes = tuple(flip_axes) if augment else ()
        self.degrees = float(degrees) if augment else 0.0
        self.scale = tuple(scale) if augment else (1.0, 1.0)
        self.shift = float(shift) if augment else 0.0
        self.args_names = ["patch_size", "num_patches", "augment", "use_prior"]

    def _corners(self, subject: tio.Subject, shape: Sequence[int]) -> list[np.ndarray]:
        """First voxel of each patch: label-balanced (torchio's ``LabelSampler`` probability map), or
        uniform over the case ``shape`` for an unlabeled subject."""
        if "label" not in subject:
            high = [max(n - p, 0) + 1 for n, p in zip(shape, self.patch_size)]
            return [np.array([int(torch.randint(0, h, (1,))) for h in high]) for _ in range(self.num_patches)]
        probability = self.sampler.process_probability_map(self.sampler.get_probability_map(subject), subject)
        cdf = self.sampler.get_cumulative_distribution_function(probability)
        return [self.sampler.get_random_index_ini(probability, cdf) for _ in range(self.num_patches)]

    def _patch(
        self, arrays: list[np.ndarray], corner: np.ndarray, spacing: Sequence[float], labeled: bool = True
    ) -> list[torch.Tensor]:
        """Cut (and rotate) one patch from each array; with ``labeled`` the last array is the label
        (nearest neighbour)."""
        p = self.patch_size
        angles = [math.radians(float(torch.empty(1).uniform_(-self.degrees, self.degrees))) for _ in range(3)]
        if not any(angles):
            hi = [c + s for c, s in zip(corner, p)]
            return [torch.from_numpy(read_window(a, corner, hi).astype(np.float32)) for a in arrays]
        offsets = rotated_grid(p, spacing, rotation_matrix(angles))
        centre = corner + (np.array(p) - 1) / 2
        reach = offsets.abs().flatten(0, 2).amax(dim=0).numpy()
        lo = np.floor(centre - reach).astype(int) - 1
        hi = np.ceil(centre + reach).astype(int) + 2
        size = hi - lo
        coords = offsets + torch.from_numpy(centre - lo)  # voxel coordinates inside the window
        # grid_sample: align_corners=True maps -1/1 to the first/last voxel; its last axis is (x, y, z) =
        # (axis 2, axis 1, axis 0).
        grid = (2 * coords / torch.from_numpy(size - 1) - 1).flip(-1)[None].float()
        out = []
        for k, array in enumerate(arrays):
            window = torch.from_numpy(read_window(array, lo, hi).astype(np.float32))
            mode = "nearest" if labeled and k == len(arrays) - 1 else "bilinear"
            flat = window.reshape(-1, *window.shape[-3:])[None]
            sampled = F.grid_sample(flat, grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
            out.append(sampled.reshape(*window.shape[:-3], *p))
        return out

    def _jitter(self, patch: list[torch.Tensor], spacing: Sequence[float]) -> list[torch.Tensor]:
        """Move each modality of the image (and of the prior) by its own random rigid transform."""
        image = patch[0]
        m = image.shape[0]
        angles, shifts = random_rigid(m, self.jitter_mm, self.jitter_degrees)
        patch[0] = move_modalities(image[:, None], angles, shifts, spacing)[:, 0]
        if self.use_prior:
            prior = patch[1]
            patch[1] = move_modalities(
                prior.reshape(m, -1, *prior.shape[1:]), angles, shifts, spacing
            ).reshape(prior.shape)
        return patch

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        folder = Path(cast(str, subject["case_dir"]))
        labeled = "label" in subject
        reference = cast(tio.Image, subject["label"] if labeled else subject["grid"])
        spacing = reference.spacing
        arrays = [np.load(folder / "image.npy", mmap_mode="r")]
        if self.use_prior:
            prior = np.load(folder / "prior.npy", mmap_mode="r")
            arrays.append(prior.reshape(-1, *prior.shape[2:]))
        if labeled:
            arrays.append(reference.data.numpy())
        stacks: list[list[torch.Tensor]] = [[] for _ in arrays]
        for corner in self._corners(subject, arrays[0].shape[-3:]):
            patch = self._patch(arrays, corner, spacing, labeled)
            if self.jitter_mm or self.jitter_degrees:
                patch = self._jitter(patch, spacing)
            dims = [1 + a for a in self.flip_axes if float(torch.rand(1)) < 0.5]
            if dims:
                patch = [t.flip(dims) for t in patch]
            channels = patch[0].shape[0]
            scale = torch.empty(channels, 1, 1, 1).uniform_(*self.scale)
            shift = torch.empty(channels, 1, 1, 1).uniform_(-self.shift, self.shift)
            patch[0] = patch[0] * scale + shift
            for stack, t in zip(stacks, patch):
                stack.append(t)
        affine = np.diag([*spacing, 1.0])
        images: dict[str, tio.Image] = {
            "image": tio.ScalarImage(tensor=torch.cat(stacks[0], dim=1), affine=affine)
        }
        if labeled:
            images["label"] = tio.LabelMap(
                tensor=torch.cat(stacks[-1], dim=1).round().to(torch.uint8), affine=affine
            )
        if self.use_prior:
            images["prior"] = tio.ScalarImage(
                tensor=torch.cat(stacks[1], dim=1).to(PRIOR_DTYPE), affine=affine
            )
        return tio.Subject(name=subject["name"], labeled=labeled, **images)


class StackedPatches(tio.data.PatchSampler):
    """Main-process sampler: cuts the patches :class:`AugmentedPatches` stacked along axis 0 apart again."""

    def _generate_patches(
        self, subject: tio.Subject, num_patches: int | None = None
    ) -> Generator[tio.Subject]:
        count = subject.spatial_shape[0] // int(self.patch_size[0])
        for k in range(count if num_patches is None else min(count, num_patches)):
            yield self.extract_patch(subject, (k * int(self.patch_size[0]), 0, 0))


def case_subject(root: Path | str, name: str, reader: object, labeled: bool = True) -> tio.Subject:
    """A training case as the worker transform expects it: the label (read lazily) and the case folder.

    An unlabeled case has no label at all; a one-voxel ``grid`` image carries its spacing instead (a
    torchio subject needs an image).
    """
    folder = cache.case_dir(root, name)
    if not labeled:
        spacing = cache.load_meta(root, name).spacing
        grid = tio.ScalarImage(tensor=torch.zeros(1, 1, 1, 1), affine=np.diag([*spacing, 1.0]))
        return tio.Subject(name=name, case_dir=str(folder), labeled=False, grid=grid)
    return tio.Subject(
        name=name, case_dir=str(folder), labeled=True, label=tio.LabelMap(folder / "label.npy", reader=reader)
    )
