"""Per-patch sampling and augmentation in the workers (data/transforms.py).

The cached image's channels 0-2 hold each voxel's own coordinates (in mm), so every output voxel says
where in the case it was sampled from; the prior is a copy of the image (and its negative), so it must
follow the image exactly; the label is a ball whose inside is known from the coordinates.
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torchio as tio

from smml_lightning.data import cache
from smml_lightning.data.datamodule import read_label_npy
from smml_lightning.data.transforms import AugmentedPatches, StackedPatches, case_subject, rotation_matrix

SHAPE = (34, 32, 28)
SPACING = (1.0, 1.0, 2.0)  # anisotropic: rotations must act in millimetres
PATCH = (12, 12, 8)
CENTRE = np.array([17.0, 16.0, 14.0])  # voxels; the ball's rotated patches stay inside the case
RADIUS = 6.0  # mm


def _coords_mm() -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"))
    return grid * np.array(SPACING, np.float32)[:, None, None, None]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    mm = _coords_mm()
    noise = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    image = np.concatenate([mm, noise[None]])
    inside = np.linalg.norm(mm - (CENTRE * SPACING)[:, None, None, None], axis=0) < RADIUS
    label = np.where(inside, 3, 0).astype(np.uint8)
    meta = cache.CaseMeta(
        name="c",
        layout="synthetic",
        convention="brats2018",
        available=(True,) * 4,
        original_shape=SHAPE,
        affine=np.diag([*SPACING, 1.0]).tolist(),
        spacing=SPACING,
        crop_box=tuple((0, s) for s in SHAPE),
    )
    cache.write_case(root, meta, image, label)
    prior = np.stack([image, -image], axis=1)  # (4, 2, D, H, W): two "classes" per modality
    cache.write_prior(root, "c", prior)
    return root


def _patches(root, seed=0, n=6, probabilities=None, **kwargs):
    options = dict(augment=True, use_prior=True, degrees=0.0, flip_axes=(), scale=(1.0, 1.0), shift=0.0)
    options.update(kwargs)
    transform = AugmentedPatches(PATCH, n, probabilities or {0: 1.0, 3: 1.0}, **options)
    torch.manual_seed(seed)
    stacked = transform(case_subject(root, "c", read_label_npy))
    return list(StackedPatches(PATCH)(stacked))


def _source_voxels(patch: tio.Subject) -> torch.Tensor:
    """Case voxel coordinates ``(3, *PATCH)`` each output voxel was sampled from (from channels 0-2)."""
    return patch["image"].data[:3].double() / torch.tensor(SPACING, dtype=torch.float64).view(3, 1, 1, 1)


def test_without_augmentation_patches_are_exact_crops_and_label_balanced(case):
    patches = _patches(case, augment=False)
    assert len(patches) == 6
    image, label = np.load(case / "c" / "image.npy"), np.load(case / "c" / "label.npy")
    centres = []
    for p in patches:
        corner = [int(round(float(v))) for v in _source_voxels(p)[:, 0, 0, 0]]
        box = tuple(slice(c, c + s) for c, s in zip(corner, PATCH))
        assert torch.equal(p["image"].data, torch.from_numpy(image[(slice(None), *box)]))
        assert torch.equal(p["label"].data[0], torch.from_numpy(label[box]))
        prior = p["prior"].data.float()
        assert p["prior"].data.dtype == torch.float16 and p["label"].data.dtype == torch.uint8
        assert torch.allclose(prior[0::2], p["image"].data, rtol=1e-3) and torch.allclose(
            prior[1::2], -prior[0::2]
        )
        centres.append(label[tuple(c + s // 2 for c, s in zip(corner, PATCH))])
    # torchio's LabelSampler with equal weights for background and tumor: both kinds of centre occur.
    torch.manual_seed(0)
    many = [
        int(p["label"].data[0][tuple(s // 2 for s in PATCH)]) for p in _patches(case, augment=False, n=40)
    ]
    assert 0.2 < np.mean(np.array(many) == 3) < 0.8


def test_flips_on_each_axis_keep_image_prior_and_label_together(case):
    seen = set()
    for seed in range(6):
        for p in _patches(case, seed=seed, flip_axes=(0, 1, 2)):
            src = _source_voxels(p)
            # Along each axis the source coordinate steps by +1 (kept) or -1 (flipped), nothing else.
            steps = [src[a].diff(dim=a) for a in range(3)]
            flipped = tuple(a for a in range(3) if bool((steps[a] == -1).all()))
            assert all(bool((steps[a].abs() == 1).all()) for a in range(3))
            seen |= set(flipped)
            corner = src.amin(dim=(1, 2, 3)).round().long().tolist()
            box = tuple(slice(c, c + s) for c, s in zip(corner, PATCH))
            label = torch.from_numpy(np.load(case / "c" / "label.npy")[box])
            dims = [a for a in flipped]
            assert torch.equal(p["label"].data[0], label.flip(dims) if dims else label)
            assert torch.allclose(p["prior"].data[0::2].float(), p["image"].data, rtol=1e-3)
    assert seen == {0, 1, 2}


def test_rotation_is_a_rotation_in_millimetres_within_ten_degrees(case):
    rotated = 0
    for seed in range(4):
        for p in _patches(case, seed=seed, degrees=10.0, probabilities={3: 1.0}):
            src_mm = p["image"].data[:3].double()
            inside = src_mm.abs().sum(0) > 0
            assert bool(inside.all()), "patches centred in the ball never reach the zero padding"
            idx = torch.stack(
                torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in PATCH], indexing="ij")
            ) * torch.tensor(SPACING, dtype=torch.float64).view(3, 1, 1, 1)
            x = torch.cat([idx[:, inside].T, torch.ones(int(inside.sum()), 1, dtype=torch.float64)], dim=1)
            fit = torch.linalg.lstsq(x, src_mm[:, inside].T).solution  # (4, 3): linear part and offset
            linear = fit[:3].T
            assert torch.allclose(linear @ linear.T, torch.eye(3, dtype=torch.float64), atol=1e-3)
            assert torch.linalg.det(linear) > 0
            angle = torch.rad2deg(torch.arccos(((torch.trace(linear) - 1) / 2).clamp(-1, 1)))
            assert angle <= 30 + 1e-3  # three rotations of at most 10 degrees each
            rotated += bool(angle > 1)
            # The label moved with the image: inside the ball exactly where the coordinates say so.
            dist = (src_mm - torch.tensor(CENTRE * SPACING).view(3, 1, 1, 1)).norm(dim=0)
            label = p["label"].data[0].bool()
            clear = inside & ((dist - RADIUS).abs() > 1.5)
            assert torch.equal(label[clear], (dist < RADIUS)[clear])
            assert torch.allclose(p["prior"].data[0::2].float(), p["image"].data, rtol=2e-3, atol=2e-2)
    assert rotated > 10


def test_intensity_scale_and_shift_per_channel_on_the_image_only(case):
    for p in _patches(case, seed=3, scale=(0.9, 1.1), shift=0.1):
        prior = p["prior"].data[0::2].double()  # the untouched copy of the image
        draws = []
        for m in range(4):
            a, c = np.polyfit(prior[m].flatten().numpy(), p["image"].data[m].double().flatten().numpy(), 1)
            assert 0.9 - 1e-3 <= a <= 1.1 + 1e-3 and abs(c) <= 0.1 + 1e-2
            draws.append(round(a, 4))
        assert len(set(draws)) == 4, "each channel draws its own scale"


def test_rotation_matrix_composes_axis_rotations():
    r = rotation_matrix([0.0, 0.0, np.pi / 2])
    assert torch.allclose(
        r @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0, 1.0, 0], dtype=torch.float64)
    )
    for angles in itertools.product([-0.17, 0.0, 0.17], repeat=3):
        q = rotation_matrix(angles)
        assert torch.allclose(q @ q.T, torch.eye(3, dtype=torch.float64)) and torch.isclose(
            torch.linalg.det(q), torch.tensor(1.0, dtype=torch.float64)
        )


# --- unlabeled cases and misalignment -----------------------------------------------------------------


def test_unlabeled_cases_never_read_their_label_and_get_uniform_centres(case, tmp_path):
    import shutil

    root = tmp_path / "unlabeled"
    shutil.copytree(case, root)
    (root / "c" / "label.npy").write_bytes(b"not a label")  # reading it would fail
    transform = AugmentedPatches(PATCH, 60, {0: 1.0, 3: 1.0}, augment=False, use_prior=True)
    torch.manual_seed(0)
    patches = list(StackedPatches(PATCH)(transform(case_subject(root, "c", read_label_npy, labeled=False))))
    assert len(patches) == 60 and all("label" not in p and p["labeled"] is False for p in patches)
    corners = np.array([[round(float(v)) for v in _source_voxels(p)[:, 0, 0, 0]] for p in patches])
    high = np.array(SHAPE) - np.array(PATCH)
    assert (corners >= 0).all() and (corners <= high).all()
    assert (corners.min(axis=0) <= high // 4).all() and (corners.max(axis=0) >= 3 * high // 4).all()
    # the ball covers ~3% of the case: label-balanced sampling would centre half the patches on it
    centres = corners + np.array(PATCH) // 2
    on_ball = np.linalg.norm((centres - CENTRE) * np.array(SPACING), axis=1) < RADIUS
    assert on_ball.mean() < 0.2


def test_move_modalities_shift_and_quarter_turn_by_hand():
    from smml_lightning.data.transforms import move_modalities

    image = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    # modality 0: shift by (2, 0, -1) voxels at spacing (1, 1, 2) mm; modality 1 stays
    shifts = torch.tensor([[2.0, 0.0, -2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = move_modalities(image, torch.zeros(2, 3, dtype=torch.float64), shifts, (1.0, 1.0, 2.0))
    assert torch.equal(out[1], image[1])
    torch.testing.assert_close(out[0, 0, 2:, :, :5], image[0, 0, :4, :, 1:], atol=1e-5, rtol=0)
    assert out[0, 0, :2].abs().max() < 1e-5 and out[0, 0, :, :, 5].abs().max() < 1e-5  # moved in from outside
    # 90 degrees about axis 0: output (j, k) reads input (k, n-1-j)
    angles = torch.tensor([[math.pi / 2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    turned = move_modalities(image, angles, torch.zeros(2, 3, dtype=torch.float64), (1.0, 1.0, 1.0))
    torch.testing.assert_close(turned[0], image[0].transpose(2, 3).flip(2), atol=1e-4, rtol=0)


def test_misalign_case_moves_by_the_given_amount_and_keeps_t1ce(case):
    from smml_lightning.data.transforms import misalign_case

    image = torch.from_numpy(np.load(case / "c" / "image.npy"))  # channels 0-2: voxel coordinates in mm
    moved = misalign_case(image, SPACING, shift_mm=3.0, degrees=0.0, seed=1)
    assert torch.equal(moved[1], image[1])  # T1ce is the reference
    assert torch.equal(misalign_case(image, SPACING, 3.0, 0.0, seed=1), moved)
    inner = (slice(5, -5), slice(5, -5), slice(3, -3))
    # channel k holds the axis-k coordinate, so a shift t reads as a constant -t_k on that channel
    t0 = float((image[0] - moved[0])[inner].mean())
    t2 = float((image[2] - moved[2])[inner].mean())
    assert (image[0] - moved[0])[inner].std() < 1e-3 and abs(t0) <= 3.0 + 1e-4 and abs(t2) <= 3.0 + 1e-4
    assert not torch.equal(moved[3], image[3])


def test_training_jitter_moves_every_modality_but_t1ce_with_its_priors(case):
    patches = _patches(case, augment=False, n=6, jitter_mm=3.0)
    inner = (slice(4, -4), slice(4, -4), slice(3, -3))
    fractions = []
    for p in patches:
        own = p["image"].data
        # T1ce (channel 1 holds the axis-1 coordinate in mm) is an exact crop: whole millimetres
        assert torch.equal(own[1], own[1].round())
        # FLAIR (channel 0, the axis-0 coordinate) moved by one sub-voxel shift for the whole patch
        frac = own[0][inner] - own[0][inner].floor()
        assert frac.std() < 1e-3
        fractions.append(float(frac.mean()))
        torch.testing.assert_close(p["prior"].data[0::2].float(), own, atol=0.02, rtol=1e-2)  # priors follow
    assert max(min(f, 1 - f) for f in fractions) > 0.01
