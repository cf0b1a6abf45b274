"""mmFormer-style backbone used by each SMML branch, plus the building blocks MAML shares.

Layout (Zhang et al., mmFormer, as used by SMML): four modality-specific 5-stage 3D conv encoders, an
intra-modal transformer per modality at the bottleneck, masking of missing modalities at every scale,
an inter-modal transformer over the tokens of the available modalities, per-scale skip fusion, a fused
decoder with deep supervision, and a shared auxiliary decoder applied to each modality alone.

The four encoders are one stack of grouped convolutions (``groups=4``): mathematically four separate
encoders, but one kernel launch per layer, which is what makes them fast on CPU (bf16,
``channels_last_3d``) and GPU. Channels of every per-modality tensor are modality-major: channels
``[k * C, (k + 1) * C)`` belong to modality ``k`` in :data:`~smml_lightning.data.modalities.MODALITIES`
order.

Design choices, documented because mmFormer's public code differs in places:

* Norm is instance norm with affine parameters everywhere (no BatchNorm: statistics must not mix
  samples or modalities), computed as a one-group-per-channel ``GroupNorm`` (:func:`instance_norm`).
  Training therefore needs a bottleneck of more than one voxel: patches of at least 32.
* Convolutions pad with zeros (mmFormer reflects), so that tiny bottlenecks work.
* Skip fusion is one 3x3x3 conv (+ norm, activation) over the concatenated masked modality features;
  the inter-modal transformer does the bottleneck fusion. The public mmFormer and SMML code fuse each
  skip with ``fusion_prenorm`` (three convs, each after a norm and an activation); that form and a
  voxel-wise attention over the available modalities were measured without a quality gain beyond the
  seed spread and with slower fits (docs/quality-history.md), so the plain form stays.
* Positional embeddings are learnt per modality for a reference grid (``patch_size / 16``) and
  trilinearly resized to the actual grid, so sliding windows and tiny test patches share weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from smml_lightning.data.labels import NUM_CLASSES
from smml_lightning.data.modalities import NUM_MODALITIES
from smml_lightning.models.base import MaskedSegmenter, SegmentationOutput

ModuleT = TypeVar("ModuleT", bound=nn.Module)

NUM_STAGES = 5
DOWNSAMPLING = 2 ** (NUM_STAGES - 1)


def conv_norm_act(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> Convolution:
    """Conv3d -> instance norm (affine) -> LeakyReLU(0.2), mmFormer's basic unit (grouped if asked).

    The instance norm is a ``GroupNorm`` with one group per channel (see :func:`instance_norm`).
    """
    return use_group_instance_norms(
        Convolution(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            strides=stride,
            kernel_size=kernel_size,
            groups=groups,
            act=("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
            norm=("instance", {"affine": True}),
        )
    )


def instance_norm(channels: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """Instance normalisation as ``GroupNorm(channels, channels)``: the same maths and parameters.

    Why not ``InstanceNorm3d``: PyTorch computes it as a batch norm over a reshaped copy of the input,
    while group norm has its own kernels; on the development CPU (AMX, bf16) the group form ran a
    forward + backward 2.5x faster and the whole SMML training step about 8% faster. The parameter
    names (``weight``, ``bias``) are those of ``InstanceNorm3d(affine=True)``, so checkpoints load either way.
    """
    return nn.GroupNorm(channels, channels, eps=eps, affine=affine)


def use_group_instance_norms(module: ModuleT) -> ModuleT:
    """Replace every ``InstanceNorm1d/2d/3d`` without running statistics in ``module`` (in place) by
    :func:`instance_norm`, keeping its parameters; for networks built by MONAI with instance norm."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            norm = instance_norm(child.num_features, child.eps, child.affine)
            if child.affine:
                norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            use_group_instance_norms(child)
    return module


def conv_of(block: nn.Module) -> nn.Conv3d:
    """The convolution of a :func:`conv_norm_act` block."""
    return cast(nn.Conv3d, block.conv)


def norm_act_of(block: nn.Module) -> nn.Module:
    """The norm and activation that follow the convolution of a :func:`conv_norm_act` block."""
    return cast(nn.Module, block.adn)


def pointwise_conv(conv: nn.Conv3d, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """A 1x1x1 ungrouped ``conv`` as a matrix product over channels: the same map, run by the CPU's
    matrix kernels; PyTorch's CPU bf16 convolution reorders these few-channel tensors and ran 3-5x
    slower than the product. ``bias=False`` leaves the bias out, for a ``conv`` followed by an instance
    norm (see :func:`instance_norm`)."""
    weight = conv.weight.flatten(1)
    # Autocast casts as it does the convolution; the bias is added inside the product (baddbmm), which
    # saves a pass over the output.
    if bias and conv.bias is not None:
        out = torch.baddbmm(conv.bias.view(1, -1, 1), weight.expand(x.shape[0], -1, -1), x.flatten(2))
    else:
        out = torch.matmul(weight, x.flatten(2))
    return out.view(x.shape[0], -1, *x.shape[2:])


def upsample_conv(up: nn.ConvTranspose3d, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """An ungrouped ``ConvTranspose3d`` with kernel 2 and stride 2 as a matrix product and a shuffle of
    its outputs into the 2x finer grid: each input voxel writes its own 2x2x2 block, so the two are
    the same map; on the CPU the product and the shuffle ran about 2.7x faster in bf16.

    ``out``: a channels-last destination (e.g. the upsampled half of :func:`channels_last_cat`'s
    tensor). The product is then taken voxel-major with the bias inside it (``baddbmm``), so that the
    shuffle copies runs of channels into the channels-last rows: at 128^3 this wrote the half about
    1.3x faster than shuffling channel-major, adding the bias and concatenating. Without ``out`` the
    channel-major product gives a contiguous tensor (the voxel-major one shuffles slower into it)."""
    n, _, d, h, w = x.shape
    out_ch = up.weight.shape[1]
    if out is None:
        y = torch.matmul(up.weight.flatten(1).t(), x.flatten(2))  # (N, out * 8, D * H * W)
        y = y.view(n, out_ch, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = y.reshape(n, out_ch, 2 * d, 2 * h, 2 * w)
        if up.bias is not None:
            y = y + up.bias.to(y.dtype).view(1, -1, 1, 1, 1)
        return y
    weight = up.weight.permute(0, 2, 3, 4, 1).reshape(up.weight.shape[0], -1)  # columns (i, j, k, out)
    voxels = x.flatten(2).transpose(1, 2)  # (N, D * H * W, in), a view
    if up.bias is not None:  # autocast casts as it does the convolution
        y = torch.baddbmm(up.bias.repeat(8).view(1, 1, -1), voxels, weight.expand(n, -1, -1))
    else:
        y = torch.matmul(voxels, weight)
    blocks = y.view(n, d, h, w, 2, 2, 2, out_ch).permute(0, 7, 1, 4, 2, 5, 3, 6)
    # Splitting each fine axis into (coarse, 2) is a view of any strided layout.
    out.unflatten(2, (d, 2)).unflatten(4, (h, 2)).unflatten(6, (w, 2)).copy_(blocks)
    return out


def channels_last_empty(like: torch.Tensor, channels: int, *others: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``like``'s batch and grid with ``channels`` channels, channels-last, of the
    dtype the next convolution computes in: autocast's, else the common type of ``like`` and ``others``."""
    kind = like.device.type
    dtype = like.dtype
    for other in others:
        dtype = torch.promote_types(dtype, other.dtype)
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
    return torch.empty(
        (like.shape[0], channels, *like.shape[2:]),
        dtype=dtype,
        device=like.device,
        memory_format=torch.channels_last_3d,
    )


def channels_last_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], 1)`` written straight into a channels-last tensor of the dtype the next
    convolution computes in (autocast's, else the two's common type): the values the convolution would
    read after concatenating and casting, laid out for oneDNN's channels-last kernel. On the CPU in bf16
    a decoder's full-resolution merge (concatenation, 3x3x3 convolution, norm) ran about 1.6x faster
    this way in eval and 1.3x with its backward in training; the plain concatenation also cast the skip
    to bf16 in a second copy."""
    out = channels_last_empty(a, a.shape[1] + b.shape[1], b)
    out[:, : a.shape[1]] = a
    out[:, a.shape[1] :] = b
    return out


def fused_skip(fuse: nn.Module, summed: torch.Tensor) -> torch.Tensor:
    """A skip-fusion block's output from its convolution's output without the bias (``summed``, e.g.
    the sum of the modalities' shares): norm and activation only. The block's instance norm subtracts
    each channel's mean over the grid, which removes the per-channel bias exactly, so it is not added
    (a full-resolution pass saved in inference)."""
    return cast(torch.Tensor, norm_act_of(fuse)(summed))


def stage_widths(base_width: int) -> list[int]:
    """Per-stage channel widths ``base * [1, 2, 4, 8, 16]``."""
    return [base_width * 2**i for i in range(NUM_STAGES)]


def check_image(image: torch.Tensor, in_modalities: int) -> None:
    """Reject images the 5-stage networks cannot process, naming the problem."""
    if image.ndim != 5 or image.shape[1] != in_modalities:
        raise ValueError(f"image must be (B, {in_modalities}, D, H, W), got {tuple(image.shape)}")
    bad = [s for s in image.shape[2:] if s % DOWNSAMPLING]
    if bad:
        raise ValueError(
            f"every spatial size must be divisible by {DOWNSAMPLING} (4 downsamplings), "
            f"got {tuple(image.shape[2:])}"
        )


def check_mask(mask: torch.Tensor, batch: int, modalities: int = NUM_MODALITIES) -> torch.Tensor:
    """Validate an availability mask ``(B, M)`` and return it as bool.

    Every sample must keep at least one modality: otherwise the attention over available tokens has
    nothing to attend to and the fused prediction is undefined.
    """
    if mask.shape != (batch, modalities):
        raise ValueError(f"availability mask must be ({batch}, {modalities}), got {tuple(mask.shape)}")
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"samples {empty} have no available modality: every mask needs at least one True")
    return mask


def mask_modalities(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the channels of missing modalities in a modality-major tensor ``(B, M * C, *s)``."""
    b, m = mask.shape
    weights = mask.to(x.dtype).view(b, m, *([1] * (x.ndim - 1)))
    return (x.unflatten(1, (m, -1)) * weights).flatten(1, 2)


def group_cat(a: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """Concatenate channels group by group, so grouped convs after it keep groups separate."""
    if groups == 1:
        return torch.cat([a, b], dim=1)
    return torch.cat([a.unflatten(1, (groups, -1)), b.unflatten(1, (groups, -1))], dim=2).flatten(1, 2)


class _EncoderStage(nn.Module):
    """One mmFormer encoder stage: a (strided) conv, then two convs with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.down = conv_norm_act(in_channels, out_channels, stride=stride, groups=groups)
        self.body = nn.Sequential(
            conv_norm_act(out_channels, out_channels, groups=groups),
            conv_norm_act(out_channels, out_channels, groups=groups),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.body(x)


class GroupedEncoder(nn.Module):
    """``groups`` independent 5-stage encoders as one stack of grouped convolutions.

    Input ``(B, groups * in_per_group, *S)``; output one tensor per stage, ``(B, groups * w_i, *S / 2^i)``.
    """

    def __init__(self, widths: Sequence[int], groups: int = NUM_MODALITIES, in_per_group: int = 1) -> None:
        super().__init__()
        self.groups = groups
        channels = [in_per_group, *widths]
        self.stages = nn.ModuleList(
            _EncoderStage(groups * channels[i], groups * channels[i + 1], 1 if i == 0 else 2, groups)
            for i in range(len(widths))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


@dataclass
class DecoderOutput:
    """Full-resolution features and logits of a decoder, plus deep-supervision logits (coarsest first)."""

    features: torch.Tensor
    logits: torch.Tensor
    deep_logits: list[torch.Tensor]


class UNetDecoder(nn.Module):
    """mmFormer-style U-Net decoder, optionally as ``groups`` independent decoders in grouped convs.

    Each level: x2 transposed convolution to the level's width -> concatenate the skip -> 3x3x3 conv ->
    1x1x1 conv. (mmFormer upsamples trilinearly and then convolves at the fine scale; the learnt 2x2x2
    transposed convolution, as in nnU-Net, does the same job at a fraction of the cost: it was about a
    third of a CPU training step.) Deep-supervision heads sit on the three coarser decoder levels (1/8,
    1/4, 1/2 resolution); their logits keep their own resolution, so the loss resizes the labels.
    """

    def __init__(
        self, widths: Sequence[int], num_classes: int, groups: int = 1, deep_supervision: bool = True
    ) -> None:
        super().__init__()
        self.groups = groups
        levels = range(len(widths) - 2, -1, -1)  # coarse to fine
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(groups * widths[i + 1], groups * widths[i], 2, stride=2, groups=groups)
            for i in levels
        )
        self.merges = nn.ModuleList(
            nn.Sequential(
                conv_norm_act(2 * groups * widths[i], groups * widths[i], groups=groups),
                conv_norm_act(groups * widths[i], groups * widths[i], kernel_size=1, groups=groups),
            )
            for i in levels
        )
        self.head = nn.Conv3d(groups * widths[0], groups * num_classes, 1, groups=groups)
        self.deep_heads = (
            nn.ModuleList(
                nn.Conv3d(groups * widths[i], groups * num_classes, 1, groups=groups) for i in levels if i > 0
            )
            if deep_supervision
            else nn.ModuleList()
        )

    def forward(
        self, skips: Sequence[torch.Tensor], bottom: torch.Tensor, deep: bool = False
    ) -> DecoderOutput:
        """``skips`` finest first (one per level above the bottleneck); ``deep`` computes deep logits."""
        if deep and not len(self.deep_heads):
            raise ValueError("this decoder was built without deep-supervision heads")
        # Inference runs the 1x1x1 and transposed convolutions as matrix products (same maps, faster on
        # CPU; see pointwise_conv, upsample_conv); training keeps the convolution modules.
        # The 1x1x1 convolution's bias is left out there: the instance norm after it removes it exactly.
        matmul = not self.training and self.groups == 1 and not torch.is_grad_enabled()
        x = bottom
        deep_logits = []
        for j, (up, merge) in enumerate(zip(self.ups, self.merges)):
            skip = skips[len(skips) - 1 - j]
            conv3, conv1 = cast(nn.Sequential, merge)
            # On the CPU the 3x3x3 convolution reads a channels-last input (channels_last_cat; in
            # inference the upsampling writes its half directly) and hands the norm a contiguous output,
            # since group norm is slow on the channels-last layout.
            if matmul and x.device.type == "cpu":
                up_channels = cast(nn.ConvTranspose3d, up).weight.shape[1]
                merged = channels_last_empty(skip, up_channels + skip.shape[1], x)
                upsample_conv(cast(nn.ConvTranspose3d, up), x, out=merged[:, :up_channels])
                merged[:, up_channels:] = skip
                y = conv_of(conv3)(merged).contiguous()
            elif self.groups == 1 and x.device.type == "cpu":
                y = conv_of(conv3)(channels_last_cat(up(x), skip)).contiguous()
            else:
                upsampled = upsample_conv(cast(nn.ConvTranspose3d, up), x) if matmul else up(x)
                y = conv_of(conv3)(group_cat(upsampled, skip, self.groups))
            y = norm_act_of(conv3)(y)
            x = norm_act_of(conv1)(
                pointwise_conv(conv_of(conv1), y, bias=False) if matmul else conv_of(conv1)(y)
            )
            if deep and j < len(self.deep_heads):
                deep_logits.append(self.deep_heads[j](x))
        logits = pointwise_conv(self.head, x) if matmul else self.head(x)
        return DecoderOutput(features=x, logits=logits, deep_logits=deep_logits)


class _Transformer(nn.Module):
    """Pre-norm transformer; positions are re-added before every layer, as in mmFormer."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, num_heads, mlp_dim, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, tokens: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens + pos, src_key_padding_mask=key_padding_mask)
        return self.norm(tokens)


class MMFormer(MaskedSegmenter):
    """mmFormer-style network; one SMML branch.

    ``encode(image)`` returns a list of 5 per-modality tensors (modality-major channels): the four conv
    stages ``(B, 4 * w_i, *S / 2^i)`` and the intra-transformer output at the bottleneck
    ``(B, 4 * transformer_dim, *S / 16)``. Nothing in ``encode`` mixes modalities.

    In eval mode the four stage tensors are instead each modality's *share* of the skip-fusion
    convolution (see :meth:`skip_shares`): the fusion conv is linear in its masked input, so a subset's
    fused skip is the sum of its available modalities' shares (plus the bias, which the instance norm
    after it removes, see :func:`fused_skip`). Decoding 15 subsets from
    one ``encode`` then costs a sum per subset instead of a full-width convolution (same parameters,
    same result to float rounding). So ``encode`` and ``decode`` must run in the same mode.

    ``decode(features, mask)`` in training mode returns fused ``logits``, ``aux_logits`` (the shared
    auxiliary decoder on each modality's own features, canonical order, for the modalities in
    ``aux_mask``: all four by default, see ``aux_all_modalities``), ``deep_logits`` (fused decoder at
    1/8, 1/4, 1/2 resolution, coarsest first) and ``bottleneck`` (the fused inter-modal features
    ``(B, 16 * base_width, *S / 16)`` before the instance norm and activation that feed the decoder).
    In eval mode the aux and deep outputs are skipped.
    """

    def __init__(
        self,
        in_modalities: int = NUM_MODALITIES,
        num_classes: int = NUM_CLASSES,
        base_width: int = 8,
        transformer_dim: int = 512,
        transformer_depth: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 8.0,
        dropout: float = 0.1,
        patch_size: int | Sequence[int] = 128,
        aux_all_modalities: bool = True,
    ) -> None:
        """The transformer defaults are mmFormer's and SMML's public code: width 512, 8 heads, depth 1,
        MLP 4096 wide (``mlp_ratio`` 8) and dropout 0.1 in attention and MLP.

        ``aux_all_modalities``: the auxiliary decoder reads every modality of the (complete) training
        input, kept by the mask or not, as in mmFormer's, RFNet's and SMML's public code: the mask
        simulates missing modalities for the fused path, and each encoder is still supervised on every
        sample. ``False`` restricts it to the modalities the mask keeps (cheaper; a masked modality's
        encoder then gets no gradient at all)."""
        super().__init__()
        sizes = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        if len(sizes) != 3 or any(s % DOWNSAMPLING for s in sizes):
            raise ValueError(
                f"patch_size must be one or three sizes divisible by {DOWNSAMPLING}, got {patch_size}"
            )
        self.in_modalities = in_modalities
        self.num_classes = num_classes
        self.transformer_dim = transformer_dim
        self.aux_all_modalities = aux_all_modalities
        widths = stage_widths(base_width)
        m, dim = in_modalities, transformer_dim

        self.encoder = GroupedEncoder(widths, groups=m)
        self.to_tokens = nn.Conv3d(m * widths[-1], m * dim, 1, groups=m)
        self.pos_embed = nn.Parameter(torch.zeros(m, dim, *(s // DOWNSAMPLING for s in sizes)))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        mlp_dim = int(dim * mlp_ratio)
        self.intra = nn.ModuleList(
            _Transformer(dim, transformer_depth, num_heads, mlp_dim, dropout) for _ in range(m)
        )
        self.inter = _Transformer(dim, transformer_depth, num_heads, mlp_dim, dropout)
        self.from_tokens = conv_norm_act(m * dim, widths[-1], kernel_size=1)
        self.skip_fusion = nn.ModuleList(conv_norm_act(m * w, w) for w in widths[:-1])
        self.decoder = UNetDecoder(widths, num_classes, deep_supervision=True)
        self.aux_in = conv_norm_act(dim, widths[-1], kernel_size=1)
        self.aux_decoder = UNetDecoder(widths, num_classes, deep_supervision=False)

    def _positions(self, grid: Sequence[int]) -> torch.Tensor:
        """Positional embeddings ``(M, N, dim)`` for a bottleneck grid, resized from the reference grid."""
        pos: torch.Tensor = self.pos_embed
        if tuple(pos.shape[2:]) != tuple(grid):
            pos = F.interpolate(pos, size=tuple(grid), mode="trilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        check_image(image, self.in_modalities)
        features = self.encoder(image)
        skips = features[:-1] if self.training else self.skip_shares(features[:-1])
        return [*skips, self.intra_modal(features[-1])]

    def intra_modal(self, last: torch.Tensor) -> torch.Tensor:
        """The last encoder stage ``(B, M * w, *s)`` -> tokens -> one transformer per modality -> the
        per-modality bottleneck map ``(B, M * transformer_dim, *s)``."""
        x = self.to_tokens(last)
        b, grid = x.shape[0], x.shape[2:]
        tokens = x.unflatten(1, (self.in_modalities, -1)).flatten(3).transpose(2, 3)  # (B, M, N, dim)
        pos = self._positions(grid)
        intra = torch.stack([t(tokens[:, k], pos[k]) for k, t in enumerate(self.intra)], dim=1)
        return intra.transpose(2, 3).reshape(b, -1, *grid)

    def skip_shares(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each modality's contribution to each skip-fusion conv, ``(B, M * w_i, *S / 2^i)``, no bias.

        The fusion conv's weight ``(w, M * w, k, k, k)`` is regrouped as a ``groups=M`` conv, so share
        ``k`` is the conv of modality ``k``'s features with that modality's slice of the weight.
        """
        m = self.in_modalities
        shares = []
        for fuse, skip in zip(self.skip_fusion, skips):
            conv = conv_of(fuse)
            w_out, _, *kernel = conv.weight.shape
            weight = conv.weight.view(w_out, m, -1, *kernel).transpose(0, 1).reshape(m * w_out, -1, *kernel)
            shares.append(F.conv3d(skip, weight, None, conv.stride, conv.padding, conv.dilation, groups=m))
        return shares

    def _fuse_skips(self, skips: Sequence[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """Fused skips under ``mask``: the fusion conv on the masked features (training), or the sum of
        the available modalities' precomputed shares (eval, see :meth:`skip_shares`, :func:`fused_skip`)."""
        if self.training:
            return [fuse(mask_modalities(s, mask)) for fuse, s in zip(self.skip_fusion, skips)]
        m = self.in_modalities
        fused = []
        for fuse, shares in zip(self.skip_fusion, skips):
            weights = mask.to(shares.dtype).view(*mask.shape, *([1] * (shares.ndim - 1)))
            fused.append(fused_skip(fuse, (shares.unflatten(1, (m, -1)) * weights).sum(dim=1)))
        return fused

    def decode(self, encoded: list[torch.Tensor], mask: torch.Tensor) -> SegmentationOutput:
        *skips, tokens_map = encoded
        b, m = tokens_map.shape[0], self.in_modalities
        mask = check_mask(mask, b, m)
        inter_features, bottleneck = self.inter_modal(tokens_map, mask)
        fused = self.decoder(self._fuse_skips(skips, mask), bottleneck, deep=self.training)
        if not self.training:
            return SegmentationOutput(logits=fused.logits, bottleneck=inter_features)

        # Shared auxiliary decoder on each modality's own features, folded into the batch; pairs outside
        # aux_mask are not computed (zeros) and not scored.
        aux_mask = torch.ones_like(mask) if self.aux_all_modalities else mask
        pairs = aux_mask.flatten()
        own_skips = [s.unflatten(1, (m, -1)).flatten(0, 1)[pairs] for s in skips]
        own_bottom = self.aux_in(tokens_map.unflatten(1, (m, -1)).flatten(0, 1)[pairs])
        own_logits = self.aux_decoder(own_skips, own_bottom).logits
        aux = own_logits.new_zeros(b * m, *own_logits.shape[1:]).index_copy(
            0, pairs.nonzero()[:, 0], own_logits
        )
        aux = aux.unflatten(0, (b, m))
        return SegmentationOutput(
            logits=fused.logits,
            aux_logits=list(aux.unbind(1)),
            deep_logits=fused.deep_logits,
            bottleneck=inter_features,
            aux_mask=aux_mask,
        )

    def inter_modal(self, tokens_map: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inter-modal transformer over the available modalities' tokens (``mask`` checked): the fused
        features before any norm, which feature-level consistency relates, and the decoder's input."""
        b, m, grid = tokens_map.shape[0], self.in_modalities, tokens_map.shape[2:]
        if self.training:
            # Inter-modal attention over available tokens only: missing keys are padding, and missing
            # queries are zeroed again afterwards so nothing of a missing modality survives.
            tokens = mask_modalities(tokens_map, mask).unflatten(1, (m, -1)).flatten(3).transpose(2, 3)
            n = tokens.shape[2]
            pos = self._positions(grid).reshape(m * n, -1)
            padding = (~mask).repeat_interleave(n, dim=1)
            inter = self.inter(tokens.reshape(b, m * n, -1), pos, padding).reshape(b, m, n, -1)
            inter = inter * mask.to(inter.dtype)[:, :, None, None]
        else:
            inter = self._inter_available(tokens_map, mask)
        # from_tokens in two steps: its 1x1x1 conv gives the fused inter-modal features before any norm
        # (the public code's ``x5_inter``), which feature-level consistency relates; norm and activation
        # then give the decoder's input.
        inter_features = conv_of(self.from_tokens)(inter.transpose(2, 3).reshape(b, -1, *grid))
        return inter_features, norm_act_of(self.from_tokens)(inter_features)

    def _inter_available(self, tokens_map: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The inter-modal transformer on the available modalities' tokens alone, ``(B, M, N, dim)`` with
        zeros for missing modalities: what the padded form computes, without its padding.

        Samples with the same number of available modalities run as one batch of their gathered tokens,
        so attention has no padding mask: the same keys and queries as the padded form (missing keys
        are excluded there, missing queries zeroed), hence the same result to float rounding, at a
        fraction of the cost (CPU PyTorch's masked softmax over 4 * N padded keys was about a fifth of
        a 128^3 decode; see docs/benchmarks.md). Used in eval mode, where dropout is off.
        """
        b, m, grid = tokens_map.shape[0], self.in_modalities, tokens_map.shape[2:]
        tokens = tokens_map.unflatten(1, (m, -1)).flatten(3).transpose(2, 3)  # (B, M, N, dim)
        n, pos = tokens.shape[2], self._positions(grid)  # pos (M, N, dim)
        counts = mask.sum(dim=1)
        inter: torch.Tensor | None = None
        for k in counts.unique().tolist():
            rows = (counts == k).nonzero()[:, 0]
            kept = mask[rows].nonzero()[:, 1].view(-1, k)  # each row's available modalities, in order
            picked = tokens[rows[:, None], kept].reshape(len(rows), k * n, -1)
            out = self.inter(picked, pos[kept].reshape(len(rows), k * n, -1)).view(len(rows), k, n, -1)
            if inter is None:
                inter = out.new_zeros(b, m, n, out.shape[-1])
            inter[rows[:, None], kept] = out.to(inter.dtype)
        assert inter is not None  # check_mask: at least one sample
        return inter

    def decode_subsets(
        self, encoded: list[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Fused logits under each mask, decoded as one batch of ``len(masks) * B`` samples in eval mode.

        Each subset's fused skips are the mask-weighted sums of the per-modality shares (one batched
        product of the ``(B, S, M)`` masks with the shares), its inter-modal tokens are the shared
        bottleneck's, and one decoder call serves every subset: the CPU runs one large convolution far
        more efficiently than ``S`` small ones. The batch is sample-major (sample ``i``'s subsets side
        by side), the order the product writes, so no full-resolution copy reorders it; each returned
        tensor is a view. Same logits as :meth:`decode` per mask, to float rounding.
        """
        if self.training:
            return super().decode_subsets(encoded, masks)
        *shares, tokens_map = encoded
        b, m, s = tokens_map.shape[0], self.in_modalities, len(masks)
        stacked = torch.stack([check_mask(mask, b, m) for mask in masks], dim=1)  # (B, S, M)
        _, bottom = self.inter_modal(tokens_map.repeat_interleave(s, dim=0), stacked.flatten(0, 1))
        skips = []
        for fuse, share in zip(self.skip_fusion, shares):
            parts = share.unflatten(1, (m, -1)).flatten(2)  # (B, M, w * V)
            x = torch.bmm(stacked.to(parts.dtype), parts)  # (B, S, w * V)
            skips.append(fused_skip(fuse, x.view(b * s, -1, *share.shape[2:])))
        logits = self.decoder(skips, bottom).logits
        return list(logits.unflatten(0, (b, s)).unbind(1))
