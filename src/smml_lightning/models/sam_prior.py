"""Frozen SAM image encoder applied slice by slice, and the light 3D decoder that turns its features into
per-modality class priors (SMML's semantic priors, SAM3D style: no prompts).

SAM is a 2D model, so each axial slice (last spatial axis, ``k``) of one modality goes through the
encoder on its own, prepared the way SAM expects (3 channels, 0..255, pixel mean/std, longest side
resized to ``img_size``, zero padding bottom/right). The features of all slices are stacked back into a
volume and a small 3D decoder, trained on top with the encoder frozen, predicts class logits on the case
grid. ``model_type="tiny"`` builds a small random SAM from the same ``segment_anything`` classes so that
tests and the demo exercise the real checkpoint path on a CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.io import atomic_write_bytes

SAM_MODEL_TYPES: tuple[str, ...] = ("vit_b", "vit_l", "vit_h", "tiny")
TINY_NUM_HEADS = 2
"""Fixed for tiny SAMs: it leaves no trace in the weights' shapes, so a checkpoint cannot carry it."""

CHECKPOINT_HELP = (
    "Download a checkpoint from the official SAM release "
    "(https://github.com/facebookresearch/segment-anything#model-checkpoints: sam_vit_b_01ec64.pth, "
    "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth) or MedSAM (https://github.com/bowang-lab/MedSAM: "
    "medsam_vit_b.pth, use --model_type vit_b) and pass it with "
    "`smml priors --sam_checkpoint PATH --model_type vit_b`."
)


def build_tiny_sam(
    img_size: int = 64, patch_size: int = 8, embed_dim: int = 48, depth: int = 2, out_chans: int = 32
) -> Sam:
    """A whole, randomly initialised ``Sam`` small enough for CPU tests; its state dict is a real SAM
    checkpoint (image encoder, prompt encoder and mask decoder), loadable the way ``build_sam`` loads."""
    if img_size % patch_size:
        raise ValueError(f"tiny SAM: img_size {img_size} must be a multiple of patch_size {patch_size}")
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=TINY_NUM_HEADS,
            mlp_ratio=4,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=1, embedding_dim=out_chans, mlp_dim=2 * out_chans, num_heads=2
            ),
            transformer_dim=out_chans,
            iou_head_depth=2,
            iou_head_hidden_dim=out_chans,
        ),
    )
    return sam.eval()


def save_tiny_sam_checkpoint(path: str | Path, seed: int = 0, **kwargs: int) -> Path:
    """Write a seeded tiny SAM's state dict to ``path`` (atomically), like an official checkpoint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_tiny_sam(**kwargs)
    path = Path(path)
    atomic_write_bytes(path, lambda f: torch.save(sam.state_dict(), f))
    return path


def _tiny_geometry(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read a tiny SAM's build arguments back from its weights' shapes."""
    pos = state["image_encoder.pos_embed"]
    patch = int(state["image_encoder.patch_embed.proj.weight"].shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    return {
        "img_size": int(pos.shape[1]) * patch,
        "patch_size": patch,
        "embed_dim": int(pos.shape[-1]),
        "depth": len(blocks),
        "out_chans": int(state["image_encoder.neck.0.weight"].shape[0]),
    }


def _load_tiny_sam(path: Path) -> Sam:
    with open(path, "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    sam = build_tiny_sam(**_tiny_geometry(state))
    sam.load_state_dict(state)
    return sam


def load_sam_image_encoder(checkpoint: str | Path, model_type: str = "vit_b") -> ImageEncoderViT:
    """Load a SAM checkpoint and return its image encoder, frozen and in eval mode.

    ``vit_b``/``vit_l``/``vit_h`` go through ``segment_anything.sam_model_registry`` (MedSAM checkpoints
    are ``vit_b``); ``tiny`` reads a checkpoint written by :func:`save_tiny_sam_checkpoint`.
    """
    if model_type not in SAM_MODEL_TYPES:
        raise ValueError(f"unknown SAM model_type {model_type!r}; expected one of {list(SAM_MODEL_TYPES)}")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path} not found. {CHECKPOINT_HELP}")
    try:
        sam = (
            _load_tiny_sam(path)
            if model_type == "tiny"
            else sam_model_registry[model_type](checkpoint=str(path))
        )
    except Exception as err:  # torch.load and load_state_dict raise many types; all mean a bad file here
        raise ValueError(
            f"{path}: not a readable SAM {model_type} checkpoint, or one of another model type "
            f"({type(err).__name__}: {str(err)[:300]}). {CHECKPOINT_HELP}"
        ) from err
    encoder = sam.image_encoder
    encoder.requires_grad_(False)
    return encoder.eval()


class SliceEncoder(nn.Module):
    """Run a frozen SAM image encoder on every axial slice of a volume and stack the features.

    Input ``(B, 1, D, H, K)`` (one modality) or ``(B, D, H, K)`` (e.g. a cached case, its modalities as the
    batch). Each ``(D, H)`` slice is min-max scaled to 0..255 on its own, so a slice's features depend on
    that slice only, as in SAM's 2D use. Output ``(B, out_chans, D', H', K)``: the encoder's grid over
    the part of the padded input the slice covers (``D' = ceil(resized D / patch)``).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, encoder: ImageEncoderViT, chunk_size: int = 32, bf16: bool = False) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.img_size = int(encoder.img_size)
        self.patch_size = int(encoder.patch_embed.proj.kernel_size[0])
        self.out_chans = int(encoder.neck[0].out_channels)
        self.chunk_size = chunk_size
        self.bf16 = bf16
        # SAM's ImageNet pixel statistics (``Sam.pixel_mean``/``pixel_std``), for 0..255 RGB input.
        self.register_buffer("pixel_mean", torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1), False)

    def train(self, mode: bool = True) -> SliceEncoder:
        """Keep the frozen encoder in eval mode whatever the caller asks."""
        super().train(mode)
        self.encoder.eval()
        return self

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """SAM's ResizeLongestSide: the longest side becomes ``img_size``, the aspect ratio is kept."""
        scale = self.img_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def feature_shape(self, height: int, width: int) -> tuple[int, int]:
        """In-plane size of the output for slices of ``height x width`` voxels."""
        rh, rw = self.resized_shape(height, width)
        return math.ceil(rh / self.patch_size), math.ceil(rw / self.patch_size)

    def cell_size(self, height: int, width: int) -> tuple[float, float]:
        """Extent of one feature cell in case voxels, per in-plane axis (to align features with the case)."""
        rh, rw = self.resized_shape(height, width)
        return self.patch_size * height / rh, self.patch_size * width / rw

    def _prepare(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, D, H)`` slices -> ``(N, 3, img_size, img_size)`` SAM input."""
        flat = slices.flatten(1)
        lo = flat.min(1).values.view(-1, 1, 1)
        span = flat.max(1).values.view(-1, 1, 1) - lo
        scaled = (
            torch.where(span > 0, (slices - lo) / span.clamp_min(1e-12), torch.zeros_like(slices)) * 255.0
        )
        size = self.resized_shape(*slices.shape[1:])
        rgb = F.interpolate(scaled[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)
        rgb = (rgb.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std
        return F.pad(rgb, (0, self.img_size - size[1], 0, self.img_size - size[0]))

    @torch.no_grad()
    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.dim() == 5:
            if volume.shape[1] != 1:
                raise ValueError(
                    f"SliceEncoder takes one modality per item (B, 1, D, H, K), got {tuple(volume.shape)}"
                )
            volume = volume[:, 0]
        if volume.dim() != 4:
            raise ValueError(f"SliceEncoder takes (B, 1, D, H, K) or (B, D, H, K), got {tuple(volume.shape)}")
        b, d, h, k = volume.shape
        fd, fh = self.feature_shape(d, h)
        slices = volume.float().permute(0, 3, 1, 2).reshape(b * k, d, h)
        out = []
        device_type = slices.device.type
        for start in range(0, b * k, self.chunk_size):
            x = self._prepare(slices[start : start + self.chunk_size])
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
                feats = self.encoder(x)
            out.append(feats[:, :, :fd, :fh].float())
        features = torch.cat(out)  # (B*K, C, D', H')
        return features.view(b, k, self.out_chans, fd, fh).permute(0, 2, 3, 4, 1).contiguous()


def align_to_case(features: torch.Tensor, shape: Sequence[int], cell_size: Sequence[float]) -> torch.Tensor:
    """Resample a ``(B, C, D', H', K)`` slice-feature volume onto the case grid ``shape`` (trilinear).

    Feature cell ``i`` covers case voxels ``[i * cell, (i + 1) * cell)`` in plane (the resized slice
    starts at the top-left of SAM's padded input), and axis ``K`` is already on the case grid, so the map
    is an exact affine one; plain ``interpolate`` to ``shape`` would stretch the partly covered last cell.
    """
    b, _, fd, fh, fk = features.shape
    d, h, k = shape
    if fk != k:
        raise ValueError(f"feature volume has {fk} slices, the case has {k}")
    # Normalised output coords x_out (align_corners=False) map to x_in = a * x_out + (a - 1).
    a_d, a_h = d / (cell_size[0] * fd), h / (cell_size[1] * fh)
    theta = features.new_tensor([[1.0, 0, 0, 0], [0, a_h, 0, a_h - 1], [0, 0, a_d, a_d - 1]]).expand(b, 3, 4)
    grid = F.affine_grid(theta, [b, 1, d, h, k], align_corners=False)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


class PriorDecoder3D(nn.Module):
    """Light 3D decoder: slice features of one modality -> class logits on the case grid.

    One decoder is shared by the four modalities, with a learnt modality embedding added to its input:
    the frozen features live in one space for all contrasts, sharing gives every weight four times the
    training volumes (few cases are labelled), and the embedding still lets a class look different per
    contrast (ET is bright on T1ce only). SAM's features are coarse in plane (1/16 for the official
    models), so a small full-resolution stem on the modality's own image restores boundaries; it is
    modulated per modality too (scale and shift, zero-initialised), since the context alone arrives
    only through the upsampled path.
    """

    def __init__(
        self, in_channels: int, num_classes: int = 4, width: int = 16, num_modalities: int = NUM_MODALITIES
    ):
        super().__init__()
        conv = partial(Convolution, spatial_dims=3, kernel_size=3, act="LEAKYRELU")
        self.project = nn.Conv3d(in_channels, width, kernel_size=1)
        self.modality_embedding = nn.Embedding(num_modalities, width)
        # The full-resolution part dominates the cost: narrow channels there, and no normalisation
        # (the input is z-scored and the low-resolution context is already instance-normalised).
        self.context = conv(in_channels=width, out_channels=width // 2, norm="INSTANCE")
        self.stem = nn.Conv3d(1, width // 4, kernel_size=3, padding=1)
        # Per-modality scale and shift of the stem: what an intensity means depends on the contrast.
        self.stem_film = nn.Embedding(num_modalities, 2 * (width // 4))
        nn.init.zeros_(self.stem_film.weight)
        self.fuse = conv(in_channels=width // 2 + width // 4, out_channels=width // 2, norm=None)
        self.head = nn.Conv3d(width // 2, num_classes, kernel_size=1)

    def forward(
        self, features: torch.Tensor, image: torch.Tensor, modality: torch.Tensor, cell_size: Sequence[float]
    ) -> torch.Tensor:
        """``features (B, F, D', H', K)``, ``image (B, 1, D, H, K)``, ``modality (B,)`` long -> ``(B, C, D, H, K)``."""
        x = self.project(features) + self.modality_embedding(modality)[:, :, None, None, None]
        x = align_to_case(self.context(x), image.shape[2:], cell_size)
        scale, shift = self.stem_film(modality)[:, :, None, None, None].chunk(2, dim=1)
        skip = F.leaky_relu(self.stem(image) * (1 + scale) + shift, 0.01)
        return self.head(self.fuse(torch.cat([x, skip], dim=1)))
