"""The anatomy generator: full-size synthetic glioma cases built on a real brain template.

Each case starts from the MNI ICBM152 2009c symmetric template that ships inside nilearn's wheel (a
skull-stripped T1 and grey- and white-matter probability maps, 1 mm; CSF is the brain mask less both)
placed into a BraTS-like 240x240x155 1 mm grid, and adds, all from one seeded random generator:

- anatomy: a random affine (scale, rotation, shift) and a smooth non-linear displacement, so every case
  has its own head size, pose and gyral pattern;
- a tumour grown from a seed in deep white matter: an irregular core whose growth pushes the
  surrounding tissue outwards (a volume-preserving radial displacement, so sulci and ventricles near it
  are squeezed and shifted), oedema that spreads from the core along white matter (it stops at cortex
  and CSF), and for high-grade cases a necrotic centre inside an enhancing rim of irregular thickness
  (or a solid enhancing core); low-grade cases have a non-enhancing core and no enhancement;
- per-modality contrast as clinical scans show it: T1 from the template (white over grey over CSF,
  tumour slightly dark), T1ce the same plus a bright enhancing rim and dark necrosis, T2 with bright CSF
  and oedema, FLAIR with dark CSF and bright oedema; oedema signal fades towards its border;
- scanner variation per modality: contrast (gamma and tissue means), resolution (in-plane blur, and
  thick slices for some), a smooth multiplicative bias field, Rician noise and the intensity scale;
- skull stripping as BraTS does it: zero outside one brain mask shared by all modalities.

A case depends only on ``(seed, index)``. The warps are sampled only at voxels that can hold brain
(found on a grid twice as coarse first), which halves the cost of a full-size case;
``synthesize_anatomy`` writes cases in parallel processes.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.prepare import terminate_workers, worker_pool
from smml_lightning.data.synthetic.write import (
    brats_affine,
    check_layout,
    refuse_existing,
    write_case,
)

SHAPE: tuple[int, int, int] = (240, 240, 155)
SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

# Mean signal of the healthy tissues per modality (CSF, GM, WM), relative to white matter's T1 signal.
# T1 and T1ce take their healthy signal from the template's own T1 instead (it carries the deep grey
# nuclei and the gradual cortex-to-white transition); these rows only set its contrast jitter.
_HEALTHY: dict[str, tuple[float, float, float]] = {
    "flair": (0.12, 0.62, 0.48),
    "t2": (1.00, 0.52, 0.36),
}
# Tumour compartments per modality: necrosis, oedema, enhancing tumour, non-enhancing tumour.
_TUMOUR: dict[str, tuple[float, float, float, float]] = {
    #        ncr   ed    et    net
    "flair": (0.55, 0.95, 0.80, 0.90),
    "t1ce": (0.32, 0.66, 1.30, 0.58),
    "t1": (0.36, 0.64, 0.70, 0.58),
    "t2": (0.95, 0.82, 0.66, 0.80),
}
_P_LGG = 0.2  # low-grade: non-enhancing core, no enhancement
_P_SOLID = 0.15  # high-grade without necrosis: the whole core enhances


def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the anatomy generator needs nilearn (pip install nilearn), whose wheel "
            "ships the MNI ICBM152 template"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.cache
def _template() -> tuple[np.ndarray, np.ndarray]:
    """The template as a ``(4, X, Y, Z)`` array (T1, GM, WM, brain mask over the RAS 1 mm grid) and
    candidate tumour seeds (voxels of deep supratentorial white matter)."""
    folder = _template_dir()
    arrays, affine = [], np.eye(4)
    for key in ("t1", "gm", "wm"):
        path = folder / _TEMPLATE.format(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: MNI template missing from the nilearn installation")
        img = cast(nib.Nifti1Image, nib.load(str(path)))
        affine = np.asarray(img.affine)
        arrays.append(np.asarray(img.dataobj, dtype=np.float32) / np.float32(255))
    t1, gm, wm = arrays
    mask = (t1 > 0).astype(np.float32)
    world_z = affine[2, 2] * np.arange(t1.shape[2]) + affine[2, 3]
    deep = ndimage.binary_erosion(wm > 0.5, iterations=4) & (world_z > 0)[None, None, :]
    seeds = np.argwhere(deep & (wm > 0.95)).astype(np.float32)
    return np.stack([t1, gm, wm, mask]), seeds


def _linear(volumes: np.ndarray, q: Sequence[np.ndarray]) -> np.ndarray:
    """Linear samples ``(C, N)`` of ``volumes`` ``(C, X, Y, Z)`` at voxel coordinates ``q`` (three
    ``(N,)`` arrays); zero outside."""
    coords = np.stack(q)
    return np.stack(
        [
            ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0, prefilter=False)
            for v in volumes
        ]
    )


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], step: float) -> np.ndarray:
    """Unit-variance smooth noise over ``shape``: Gaussian noise on a grid ``step`` voxels apart,
    interpolated (trilinear, then lightly blurred at the coarse level to avoid creases)."""
    coarse = [max(2, math.ceil(n / step) + 1) for n in shape]
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.7, mode="wrap")
    fine = F.interpolate(
        torch.from_numpy(noise)[None, None],
        size=tuple(int(n) for n in shape),
        mode="trilinear",
        align_corners=True,
    )[0, 0].numpy()
    return fine / np.float32(max(float(noise.std()), 1e-6))


def _kind(draw: float) -> str:
    """The tumour kind a case's first random draw selects: ``lgg``, ``solid`` (HGG without necrosis) or ``hgg``."""
    return "lgg" if draw < _P_LGG else ("solid" if draw < _P_LGG + _P_SOLID else "hgg")


def _rotation(angles: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = out @ r
    return out


def _blur(volume: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    return ndimage.gaussian_filter(volume, sigma=[float(s) for s in sigma], truncate=2.0, mode="nearest")


def anatomy_arrays(seed: int | Sequence[int] = 0) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """One case in memory: int16 images (240x240x155) keyed by modality, internal uint8 labels
    (0 background, 1 necrosis / non-enhancing core, 2 oedema, 3 enhancing), and the grade (HGG/LGG)."""
    rng = np.random.default_rng(seed)
    template, seeds = _template()
    kind = _kind(rng.random())

    # Output voxel p -> template voxel q = c_t + M (p - c_o) + d(p): flips (the output grid runs LPS,
    # the template RAS), then the case's scale and rotation; d is the smooth non-linear part.
    flip = np.diag([-1.0, -1.0, 1.0])
    # MNI space is larger than most heads: cases are the same size or smaller.
    scale = rng.uniform(0.86, 1.0) * rng.uniform(0.97, 1.03, size=3)
    matrix = _rotation(np.deg2rad(rng.uniform(-7, 7, size=3))) @ np.diag(1 / scale) @ flip
    c_t = np.array([98.5, 117.5, 80.0]) + rng.uniform(-3, 3, size=3)  # template brain centre (voxels)
    c_o = (np.array(SHAPE) - 1) / 2 + rng.uniform(-4, 4, size=3) * np.array([1, 1, 0.5])
    d_max = 12.0  # bound on |d| plus the tumour's push, used to size the working box
    # Working box: where the template's brain lands, widened by the non-linear and tumour displacement.
    corners = np.array([[x, y, z] for x in (26.0, 171.0) for y in (27.0, 209.0) for z in (0.0, 156.0)])
    p_corners = (np.linalg.inv(matrix) @ (corners - c_t).T).T + c_o
    lo = np.maximum(np.floor(p_corners.min(0) - d_max), 0).astype(int)
    hi = np.minimum(np.ceil(p_corners.max(0) + d_max) + 1, SHAPE).astype(int)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))

    disp_sd = rng.uniform(2.0, 4.0)
    step = rng.uniform(14, 22)
    coarse = tuple(max(2, math.ceil(n / step) + 1) for n in bshape)
    disp_grid = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), 0.7) for _ in range(3)]
    )
    disp_grid *= np.float32(disp_sd) / disp_grid.std(axis=(1, 2, 3), keepdims=True)
    np.clip(disp_grid, -2.5 * disp_sd, 2.5 * disp_sd, out=disp_grid)
    # Dense over the box: torch's upsampling is much cheaper than sampling the grid point by point.
    disp_box = F.interpolate(
        torch.from_numpy(disp_grid)[None], size=bshape, mode="trilinear", align_corners=True
    )[0].numpy()

    # Tumour seed in deep white matter (template voxels), its size and kind.
    seed_q = seeds[rng.integers(len(seeds))].astype(np.float32)
    r_core = np.float32(rng.uniform(15, 25) if kind == "lgg" else rng.uniform(12, 25))
    push = np.float32(rng.uniform(0.55, 0.8)) * r_core  # radius of tissue volume the core displaces
    atrophy = np.float32(rng.uniform(0.05, 0.35))
    spread = np.float32(rng.uniform(8, 16) if kind == "lgg" else rng.uniform(8, 20))  # oedema reach, mm

    def warp(points: tuple[np.ndarray, ...]) -> tuple[list[np.ndarray], np.ndarray]:
        """Template coordinates of the healthy tissue seen at box voxels ``points`` (three index arrays),
        and each point's distance to the tumour seed in the tumour's own (displaced) space."""
        disp = [d[points] for d in disp_box]
        shifted = [pt.astype(np.float32) + np.float32(lo[a] - c_o[a]) for a, pt in enumerate(points)]
        rel = []
        for c in range(3):
            qc = disp[c] + np.float32(c_t[c] - seed_q[c])
            for a in range(3):
                qc += np.float32(matrix[c, a]) * shifted[a]
            rel.append(qc)
        # Mass effect: tissue now at radius r came from r0 = (r^3 - push^3)^(1/3) (volume preserving).
        r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
        factor = np.cbrt(np.maximum(r**3 - push**3, 0)) / np.maximum(r, np.float32(1e-3))
        return [s + d * factor for s, d in zip(seed_q, rel)], r

    # Which voxels can hold brain: the brain mask warped on a grid twice as coarse, widened.
    grid2 = np.meshgrid(*[np.arange(0, n, 2) for n in bshape], indexing="ij")
    q2, _ = warp(tuple(g.ravel() for g in grid2))
    mask2 = _linear(template[3:], q2)[0].reshape(grid2[0].shape) > 0.01
    mask2 = ndimage.binary_dilation(mask2, iterations=2)
    candidates = np.zeros(bshape, dtype=bool)
    for offset in np.ndindex(2, 2, 2):
        view = candidates[offset[0] :: 2, offset[1] :: 2, offset[2] :: 2]
        view |= mask2[tuple(slice(0, n) for n in view.shape)]
    points = np.nonzero(candidates)
    q, r_points = warp(points)
    sampled = _linear(template, q)
    t1w, gm, wm, mask = (np.zeros(bshape, dtype=np.float32) for _ in range(4))
    for c, volume in enumerate((t1w, gm, wm, mask)):
        volume[points] = sampled[c]
    r = np.full(bshape, np.inf, dtype=np.float32)
    r[points] = r_points
    del sampled, q, r_points, points
    brain = mask > 0.5
    # Atrophy (most glioma patients are past middle age): partial-volume tissue at the borders of sulci
    # and ventricles turns to CSF, widening both.
    tissue = gm + wm
    kept = np.clip((tissue - atrophy) / np.float32(1 - atrophy), 0, 1)
    shrink = kept / np.maximum(tissue, np.float32(1e-3))
    gm *= shrink
    wm *= shrink
    lost = tissue - kept
    t1w += lost * (np.float32(0.27) - t1w)  # towards the template's CSF T1 level
    csf = np.clip(mask - gm - wm, 0, 1)
    del tissue, kept, shrink, lost

    # Tumour geometry: an irregular core, necrosis inside it, oedema spreading along white matter.
    reach = float(r_core * 1.35 + 2 * spread)
    near = r < reach
    tb = ndimage.find_objects(near.astype(np.uint8))[0]
    tshape = tuple(s.stop - s.start for s in tb)
    r_t = r[tb]
    lumps = np.float32(0.22) * _smooth_noise(rng, tshape, 10) + np.float32(0.08) * _smooth_noise(
        rng, tshape, 4
    )
    rho = r_t / (r_core * (1 + np.clip(lumps, -0.45, 0.6)))
    core = rho < 1
    label_t = np.zeros(tshape, dtype=np.uint8)
    dist = np.maximum(rho - 1, 0) * r_core  # about the distance from the core's surface, mm
    wm_t = _blur(wm[tb], (1.5, 1.5, 1.5))
    oedema_score = wm_t * np.exp(-dist / spread) * (1 + np.float32(0.3) * _smooth_noise(rng, tshape, 7))
    oedema = (oedema_score > 0.3) | (rho < 1 + 2.5 / r_core)
    oedema &= brain[tb]
    components, _ = ndimage.label(oedema | core)
    keep = np.unique(components[core & (components > 0)])
    oedema &= np.isin(components, keep)
    label_t[oedema] = 2
    if kind == "lgg":
        label_t[core] = 1
    else:
        label_t[core] = 3
        if kind == "hgg":
            nec_frac = rng.uniform(0.45, 0.8)
            nec_lumps = np.float32(0.25) * _smooth_noise(rng, tshape, 6) + np.float32(0.1) * _smooth_noise(
                rng, tshape, 3
            )
            nec = rho / (nec_frac * (1 + nec_lumps)) < 1
            label_t[core & nec] = 1
    label_box = np.zeros(bshape, dtype=np.uint8)
    label_box[tb] = label_t
    brain |= label_box > 0

    # Soft compartment weights (partial volume at the borders); oedema fades towards its edge.
    ed_grade = np.clip(oedema_score / np.float32(0.6), 0.45, 1.0)
    weights = []
    for cls in (1, 2, 3):
        w = _blur((label_t == cls).astype(np.float32), (0.8, 0.8, 0.8))
        weights.append(w * ed_grade if cls == 2 else w)
    texture = (
        np.float32(1)
        + np.float32(0.1) * _smooth_noise(rng, tshape, 4)
        + np.float32(0.05) * _smooth_noise(rng, tshape, 2)
    )

    # The brain's tight box, where the per-modality work happens.
    tight = ndimage.find_objects(brain.astype(np.uint8))[0]
    brain_t = brain[tight]
    # The tumour box's part inside the brain box, in each box's own coordinates.
    inter = [(max(t.start, b.start), min(t.stop, b.stop)) for t, b in zip(tb, tight)]
    in_tight = tuple(slice(a - b.start, z - b.start) for (a, z), b in zip(inter, tight))
    in_tumour = tuple(slice(a - t.start, z - t.start) for (a, z), t in zip(inter, tb))
    weights = [w[in_tumour] for w in weights]
    texture = texture[in_tumour]
    images: dict[str, np.ndarray] = {}
    for m in MODALITIES:
        jitter = rng.uniform(0.94, 1.06, size=4).astype(np.float32)
        if m in ("t1", "t1ce"):
            healthy = t1w[tight] * np.float32(1 / 0.87)  # template WM T1 signal -> 1
            # contrast jitter between tissues: push the T1 signal away from or towards the WM level
            healthy = 1 + (healthy - 1) * np.float32(rng.uniform(0.85, 1.15))
        else:
            means = np.asarray(_HEALTHY[m], dtype=np.float32) * jitter[:3]
            healthy = csf[tight] * means[0] + gm[tight] * means[1] + wm[tight] * means[2]
        signal = healthy.copy()
        local = signal[in_tight]
        tm = np.asarray(_TUMOUR[m], dtype=np.float32) * np.float32(rng.uniform(0.94, 1.06))
        ncr_mean = tm[3] if kind == "lgg" else tm[0]  # class 1 is non-enhancing core in LGG
        for w, mean in zip(weights, (ncr_mean, tm[1], tm[2])):
            local += w * (mean * texture - local)
        signal[in_tight] = local
        signal = np.maximum(signal, 0) ** np.float32(rng.uniform(0.85, 1.15))
        thick = rng.uniform(1.0, 2.2) if rng.random() < 0.4 else rng.uniform(0.2, 0.5)
        in_plane = rng.uniform(0.3, 0.8)
        signal = _blur(signal, (in_plane, in_plane, thick))
        bias = np.exp(np.float32(rng.uniform(0.05, 0.2)) * _smooth_noise(rng, signal.shape, 45))
        values = signal[brain_t] * bias[brain_t]
        sigma = np.float32(rng.uniform(0.015, 0.04))
        noise = rng.standard_normal((2, values.size), dtype=np.float32) * sigma
        magnitude = np.sqrt((values + noise[0]) ** 2 + noise[1] ** 2)
        scale_int = rng.uniform(300, 2500)
        out = np.zeros(SHAPE, dtype=np.int16)
        out_box = out[box]
        out_tight = out_box[tight]
        out_tight[brain_t] = np.clip(np.rint(magnitude * scale_int), 1, np.iinfo(np.int16).max)
        images[m] = out
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[box] = label_box
    return images, label, "LGG" if kind == "lgg" else "HGG"


def _write_one(args: tuple[Path, str, int, int]) -> Path:
    out, layout, seed, index = args
    torch.set_num_threads(1)
    images, label, grade = anatomy_arrays([seed, index])
    return write_case(out, layout, index, images, label, grade, brats_affine(SHAPE, SPACING))


def synthesize_anatomy(
    out: Path | str,
    n_cases: int,
    layout: str = "brats2020",
    seed: int = 0,
    first: int = 0,
    workers: int = 1,
    overwrite: bool = False,
) -> list[Path]:
    """Write anatomy cases ``first`` to ``first + n_cases - 1`` under ``out`` (240x240x155, 1 mm) in
    ``layout``'s naming, ``workers`` at a time in separate processes; return their folders.

    Images are int16 and labels uint8 in the layout's convention (ET = 4, or 3 for 2023). Case ``i``
    depends only on ``(seed, i)``, as with the tiny generator. A file already there stops the run before
    anything is written, unless ``overwrite``.
    """
    check_layout(layout, n_cases, first)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    _template()  # fail early (and once) when the template is missing
    out = Path(out)
    indices = list(range(first, first + n_cases))
    if not overwrite:
        refuse_existing(out, layout, indices)
    jobs = [(out, layout, seed, i) for i in indices]
    if workers == 1 or n_cases == 1:
        return [_write_one(job) for job in jobs]
    # As prepare's pool: Ctrl-C reaches the parent only, which terminates the workers at once (their
    # cases are left unfinished: a re-run with overwrite redoes them) and runs none of the pending ones.
    with worker_pool(min(workers, n_cases, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(_write_one, job) for job in jobs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            terminate_workers(pool)
            raise
