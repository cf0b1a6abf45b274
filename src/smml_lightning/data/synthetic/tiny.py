"""The tiny generator: ellipsoid heads of any size, for tests that need small volumes.

The data are built to make missing modalities matter the way they do in real scans: a deformed
ellipsoidal brain with CSF, grey and white matter; a tumor with necrotic core (NCR), enhancing rim (ET) and edema (ED), sometimes
without necrosis or without enhancement (LGG-like); and per-modality contrasts that follow MRI
physics: FLAIR and T2 bright in edema (T2 also in CSF, FLAIR dark there), T1ce bright on the
enhancing rim with dark necrosis, T1 barely telling tumor from grey matter. A smooth multiplicative
bias field and Rician noise complete each image. Everything is vectorised numpy seeded per case, so
the same seed gives the same arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.synthetic.write import (
    brats_affine,
    check_layout,
    refuse_existing,
    write_case,
)

# Tissue classes of the generator, and the internal label (labels.py) each one carries.
TISSUES: tuple[str, ...] = ("background", "csf", "gm", "wm", "ncr", "ed", "et", "net")
_TISSUE_LABEL = np.array([0, 0, 0, 0, 1, 2, 3, 1], dtype=np.uint8)

# Mean intensity of each tissue (TISSUES order) per modality, relative to the brightest tissue.
# "net" is solid non-enhancing tumor, the core of LGG-like cases.
_CONTRAST: dict[str, tuple[float, ...]] = {
    #         bg   csf   gm    wm    ncr   ed    et    net
    "flair": (0.0, 0.12, 0.55, 0.45, 0.62, 0.95, 0.88, 0.86),
    "t1ce": (0.0, 0.25, 0.50, 0.65, 0.22, 0.55, 1.00, 0.45),
    "t1": (0.0, 0.25, 0.50, 0.65, 0.40, 0.50, 0.52, 0.46),
    "t2": (0.0, 1.00, 0.55, 0.40, 0.95, 0.85, 0.78, 0.80),
}

_P_NO_ENHANCEMENT = 0.2  # LGG-like: solid non-enhancing core, no ET
_P_NO_NECROSIS = 0.15  # core entirely enhancing
_NOISE = 0.05  # noise standard deviation relative to the brightest tissue


def _random_field(
    rng: np.random.Generator, coords: Sequence[np.ndarray], n_terms: int, freq: tuple[float, float]
) -> np.ndarray:
    """A smooth random field of unit variance: a sum of plane waves of random direction and phase."""
    out: np.ndarray | float = 0.0
    for _ in range(n_terms):
        w = rng.normal(size=3)
        w *= rng.uniform(*freq) / np.linalg.norm(w)
        out = out + np.cos(
            coords[0] * np.float32(w[0])
            + coords[1] * np.float32(w[1])
            + coords[2] * np.float32(w[2])
            + np.float32(rng.uniform(0, 2 * np.pi))
        )
    return np.asarray(out, dtype=np.float32) * np.float32(np.sqrt(2.0 / n_terms))


def _bias_axes(rng: np.random.Generator, axes: Sequence[np.ndarray], strength: float) -> list[np.ndarray]:
    """Smooth multiplicative bias, separable: one factor per axis, so it costs a gather per voxel."""
    factors = []
    for ax in axes:
        wave = sum(
            np.cos(ax * np.float32(rng.uniform(0.5, 1.8)) + np.float32(rng.uniform(0, 2 * np.pi)))
            for _ in range(2)
        )
        factors.append(np.exp(np.float32(strength / 2) * wave).astype(np.float32))
    return factors


def _ellipsoid(coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((c - np.float32(m)) / np.float32(r)) ** 2 for c, m, r in zip(coords, centre, radii)) < 1


def _local(
    axes: Sequence[np.ndarray],
    box: tuple[slice, ...],
    centre: Sequence[float] | np.ndarray,
    radii: Sequence[float] | np.ndarray,
) -> list[np.ndarray]:
    """Broadcastable coordinates over ``box``, centred on ``centre`` and scaled by ``radii``."""
    out = []
    for a, (ax, s, m, r) in enumerate(zip(axes, box, centre, radii)):
        shape = [1, 1, 1]
        shape[a] = -1
        out.append(((ax[s] - np.float32(m)) / np.float32(r)).reshape(shape))
    return out


def _box_around(centre: np.ndarray, radius: np.ndarray, axes: Sequence[np.ndarray]) -> tuple[slice, ...]:
    """Voxel slices covering ``centre +- radius`` given each axis's normalised coordinates."""
    box = []
    for m, r, ax in zip(centre, radius, axes):
        inside = np.nonzero(np.abs(ax - m) <= r)[0]
        box.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
    return tuple(box)


def synthesize_arrays(
    shape: Sequence[int], seed: int | Sequence[int] = 0
) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """One synthetic case in memory: int16 images keyed by modality, internal uint8 labels, grade.

    The grade is ``"LGG"`` for cases without enhancement, ``"HGG"`` otherwise.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthetic volumes are 3-D with every side >= 8, got shape {shape}")
    # Voxel coordinates normalised to [-1, 1] along each axis.
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) / (n / 2)) for n in shape]

    centre = rng.uniform(-0.03, 0.03, size=3)
    radii = np.array([0.62, 0.78, 0.80]) * rng.uniform(0.93, 1.05, size=3)
    tissue = np.zeros(shape, dtype=np.uint8)
    sub = _box_around(centre, radii * 1.25, axes)  # brain box: all healthy-tissue work happens inside
    q = _local(axes, sub, centre, radii)
    r_brain = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) * (1 + 0.06 * _random_field(rng, q, 4, (1.5, 3.0)))
    gm_inner = np.float32(0.78) + np.float32(0.05) * _random_field(rng, q, 6, (6.0, 10.0))
    t = np.where(r_brain < 1, np.uint8(3), np.uint8(0))
    t[(r_brain >= gm_inner) & (r_brain < 1)] = 2
    t[(r_brain >= 0.95) & (r_brain < 1)] = 1  # sulcal CSF under the skull
    vent = np.float32(rng.uniform(0.85, 1.2))
    for side in (-1, 1):  # lateral ventricles
        t[_ellipsoid(q, (side * 0.11 * vent, 0.02, 0.12), (0.07 * vent, 0.3, 0.13 * vent))] = 1
    tissue[sub] = t

    # Tumor: an irregular blob at a random place in the brain, nested edema > core > necrosis.
    kind = (
        "lgg" if rng.random() < _P_NO_ENHANCEMENT else ("solid" if rng.random() < _P_NO_NECROSIS else "hgg")
    )
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    t_centre_q = direction * rng.uniform(0.2, 0.5)
    t_radius = rng.uniform(0.25, 0.45)
    t_centre = centre + t_centre_q * radii
    tsub = _box_around(t_centre, t_radius * radii * 1.45, axes)
    tq = _local(axes, tsub, t_centre, radii)
    dist = np.sqrt(tq[0] ** 2 + tq[1] ** 2 + tq[2] ** 2) / np.float32(t_radius)
    core_frac, nec_frac = rng.uniform(0.55, 0.8), rng.uniform(0.5, 0.8)
    wt_dist = dist * (1 + 0.22 * _random_field(rng, tq, 5, (2.0, 5.0)))
    whole = wt_dist < 1
    core = whole & (dist / core_frac * (1 + 0.15 * _random_field(rng, tq, 5, (3.0, 6.0))) < 1)
    necrosis = core & (dist / (core_frac * nec_frac) * (1 + 0.15 * _random_field(rng, tq, 4, (3.0, 6.0))) < 1)
    tt = tissue[tsub]
    healthy = tt.copy()
    # Edema fades into the tissue it infiltrates: full strength inside, a blend near its border.
    edema_weight = np.clip(np.float32(1.6) - wt_dist, np.float32(0.35), np.float32(1.0))
    in_brain = tt > 0
    tt[whole & in_brain] = 5
    if kind == "lgg":
        tt[core & in_brain] = 7
    else:
        tt[core & in_brain] = 6
        if kind == "hgg":
            tt[necrosis & in_brain] = 4
    tissue[tsub] = tt

    brain = tissue > 0
    # Per-modality work is confined to the brain's bounding box (plus the blur's margin) and its voxels.
    tight = tuple(
        slice(max(sl.start - 1, 0), sl.stop + 1) for sl in ndimage.find_objects(brain.astype(np.uint8))[0]
    )
    brain_t = brain[tight]
    voxels = np.nonzero(brain_t)
    texture = _random_field(rng, _local(axes, tight, centre, radii), 4, (4.0, 9.0))  # shared heterogeneity
    tumor_texture = _random_field(rng, tq, 4, (4.0, 9.0))
    tumor_t = tissue[tsub]
    edema = tumor_t == 5
    images = {}
    for m in MODALITIES:
        means = np.asarray(_CONTRAST[m], dtype=np.float32) * rng.uniform(
            0.95, 1.05, size=len(TISSUES)
        ).astype(np.float32)
        mean = np.zeros(shape, dtype=np.float32)
        mean[tight] = means[tissue[tight]] * (1 + np.float32(0.03 * rng.choice([-1, 1])) * texture)
        local = mean[tsub]
        local[edema] = (edema_weight * means[5] + (1 - edema_weight) * means[healthy])[edema]
        local *= np.where(tumor_t >= 4, 1 + np.float32(0.1) * tumor_texture, np.float32(1))
        mean[tsub] = local
        blurred = ndimage.gaussian_filter(mean[tight], sigma=0.6, truncate=2.0)  # partial volume
        bias = [f[s][v] for f, s, v in zip(_bias_axes(rng, axes, strength=0.12), tight, voxels)]
        signal = blurred[brain_t] * bias[0] * bias[1] * bias[2]
        noise = rng.standard_normal((2, signal.size), dtype=np.float32) * np.float32(_NOISE)
        magnitude = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)  # Rician: magnitude of complex signal
        scale = rng.uniform(400, 1600)
        out = np.zeros(shape, dtype=np.int16)
        out[tight][brain_t] = np.clip(np.rint(magnitude * scale), 1, np.iinfo(np.int16).max).astype(np.int16)
        images[m] = out
    label = _TISSUE_LABEL[tissue]
    return images, label, "LGG" if kind == "lgg" else "HGG"


def synthesize(
    out: Path | str,
    n_cases: int,
    layout: str = "brats2020",
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    spacing: float | Sequence[float] | None = None,
    first: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write cases ``first`` to ``first + n_cases - 1`` under ``out`` in ``layout``'s naming; return their folders.

    Images are int16 and labels uint8 in the layout's convention (ET = 4, or 3 for 2023). The
    default spacing is ``240 / shape[0]`` mm, so a small volume stands for a downsampled head.
    Case ``i`` depends only on ``(seed, i)``: adding cases does not change earlier ones, and a later
    ``first`` gives new cases disjoint from earlier ones (a held-out set for a model trained on them).
    A file already there stops the run before anything is written, unless ``overwrite``.
    """
    check_layout(layout, n_cases, first)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"synthetic volumes are 3-D with every side >= 8, got shape {shape}")
    if spacing is None:
        spacing = 240.0 / shape[0]
    sp = tuple(float(s) for s in (spacing if isinstance(spacing, Sequence) else (spacing,) * 3))
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be a positive number or three of them, got {spacing}")
    out = Path(out)
    indices = range(first, first + n_cases)
    if not overwrite:
        refuse_existing(out, layout, indices)
    affine = brats_affine(shape, sp)
    folders = []
    for i in indices:
        images, label, grade = synthesize_arrays(shape, seed=[seed, i])
        folders.append(write_case(out, layout, i, images, label, grade, affine))
    return folders
