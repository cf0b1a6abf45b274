"""Two peers of the same network run as one: each convolutional layer is one grouped kernel for both.

SMML's two branches are the same :class:`~smml_lightning.models.backbone.MMFormer` with different weights.
A convolution of two peers on their own inputs is one convolution with twice the groups over the
channel-concatenated inputs, with the peers' weights concatenated along the output (for transposed
convolutions, input) dimension; an instance norm (one group per channel) likewise. So the convolutional
parts (the four-modality encoders, the skip fusions, the fused decoder and the shared auxiliary decoder)
run as one module built with doubled groups, evaluated with :func:`torch.func.functional_call` on the
peers' concatenated parameters: the parameters stay each branch's own (optimiser, checkpoints and
gradients unchanged), and every layer launches one kernel for both peers instead of two.

The transformers (per-modality and inter-modal) run per peer, in the plain path's order (peer 0's
intra-modal then inter-modal, then peer 1's), so dropout draws the same random numbers as the plain path
and the fused forward is the plain forward up to float rounding (``tests/models/test_peers.py``).

Training mode only (evaluation encodes and decodes each peer separately, see
:mod:`smml_lightning.evaluation.inference`), and both peers must be MMFormers of the same shape with the
auxiliary decoder on every modality (``aux_all_modalities``), so both peers' auxiliary batches align.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .backbone import (
    GroupedEncoder,
    MMFormer,
    UNetDecoder,
    check_image,
    check_mask,
    conv_norm_act,
    mask_modalities,
)
from .base import SegmentationOutput


def _stacked_parameters(modules: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """The peers' parameters, concatenated along dim 0 name by name (output channels / groups first)."""
    named = [dict(m.named_parameters()) for m in modules]
    return {name: torch.cat([p[name] for p in named]) for name in named[0]}


class FusedPeers:
    """Runs ``len(nets)`` MMFormers of one shape as one network in training (see the module docstring).

    Not an ``nn.Module``: it holds no parameters, only parameter-free templates (on the meta device) of
    the convolutional parts with ``len(nets)`` times the groups; the networks themselves are passed to
    :meth:`__call__`, so moving or copying the model needs nothing from here.
    """

    def __init__(self, net: MMFormer, peers: int = 2) -> None:
        if type(net) is not MMFormer:
            raise ValueError(f"model.init_args.fuse_peers needs MMFormer branches, got {type(net).__name__}")
        if not net.aux_all_modalities:
            raise ValueError(
                "model.init_args.fuse_peers needs the network's aux_all_modalities=true (the peers' "
                "auxiliary decoders then see the same modality pairs)"
            )
        m, p = net.in_modalities, peers
        widths = [
            w.shape[0] // m for name, w in net.encoder.named_parameters() if name.endswith("down.conv.weight")
        ]
        self.peers = peers
        self.shape = self.signature(net)
        with torch.device("meta"):
            self.encoder = GroupedEncoder(widths, groups=p * m)
            self.skip_fusion = [conv_norm_act(p * m * w, p * w, groups=p) for w in widths[:-1]]
            self.decoder = UNetDecoder(widths, net.num_classes, groups=p, deep_supervision=True)
            self.aux_decoder = UNetDecoder(widths, net.num_classes, groups=p, deep_supervision=False)
        for template in (self.encoder, *self.skip_fusion, self.decoder, self.aux_decoder):
            template.requires_grad_(False)

    @staticmethod
    def signature(net: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
        """Parameter names and shapes: peers fuse only when theirs are equal."""
        return [(name, tuple(p.shape)) for name, p in net.named_parameters()]

    def _call(self, template: nn.Module, parts: Sequence[nn.Module], *args: object) -> Any:
        return functional_call(template, _stacked_parameters(parts), args)

    def __call__(
        self, nets: Sequence[MMFormer], image: torch.Tensor, masks: Sequence[torch.Tensor]
    ) -> list[SegmentationOutput]:
        """Each peer's training output for the same ``image`` under its own ``masks[k]``, as
        ``nets[k](image, masks[k])`` computes it."""
        if len(nets) != self.peers or len(masks) != self.peers:
            raise ValueError(
                f"FusedPeers was built for {self.peers} peers, got {len(nets)} and {len(masks)} masks"
            )
        if any(not n.training for n in nets) or any(self.signature(n) != self.shape for n in nets):
            raise ValueError("FusedPeers runs peers of the shape it was built for, in training mode")
        lead = nets[0]
        check_image(image, lead.in_modalities)
        b, m, p = image.shape[0], lead.in_modalities, self.peers
        masks = [check_mask(mask, b, m) for mask in masks]

        features = self._call(
            self.encoder, [n.encoder for n in nets], image.repeat(1, p, *[1] * (image.ndim - 2))
        )
        per_peer = [f.chunk(p, dim=1) for f in features]  # per stage, one tensor per peer
        skips = [[stage[k] for stage in per_peer[:-1]] for k in range(p)]
        tokens_maps, inter_features, bottoms = [], [], []
        for k, net in enumerate(nets):  # the plain path's order: dropout draws the same numbers
            tokens_maps.append(net.intra_modal(per_peer[-1][k]))
            feats, bottom = net.inter_modal(tokens_maps[k], masks[k])
            inter_features.append(feats)
            bottoms.append(bottom)

        fused_skips = [
            self._call(
                template,
                [n.skip_fusion[i] for n in nets],
                torch.cat([mask_modalities(skips[k][i], masks[k]) for k in range(p)], dim=1),
            )
            for i, template in enumerate(self.skip_fusion)
        ]
        fused = self._call(
            self.decoder, [n.decoder for n in nets], fused_skips, torch.cat(bottoms, dim=1), True
        )
        logits = fused.logits.chunk(p, dim=1)
        deep = [d.chunk(p, dim=1) for d in fused.deep_logits]

        own_skips = [
            torch.cat([s[i].unflatten(1, (m, -1)).flatten(0, 1) for s in skips], dim=1)
            for i in range(len(skips[0]))
        ]
        own_bottom = torch.cat(
            [n.aux_in(t.unflatten(1, (m, -1)).flatten(0, 1)) for n, t in zip(nets, tokens_maps)], dim=1
        )
        aux = self._call(self.aux_decoder, [n.aux_decoder for n in nets], own_skips, own_bottom).logits.chunk(
            p, dim=1
        )
        return [
            SegmentationOutput(
                logits=logits[k],
                aux_logits=list(aux[k].unflatten(0, (b, m)).unbind(1)),
                deep_logits=[d[k] for d in deep],
                bottleneck=inter_features[k],
                aux_mask=torch.ones_like(masks[k]),
            )
            for k in range(p)
        ]
