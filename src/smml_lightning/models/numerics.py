"""Guards against numerical defects of particular kernels, applied to whole networks.

oneDNN's bfloat16 weight gradient of a 3D convolution whose input is smaller than its kernel (a
3x3x3 conv on the 2x2x2 bottleneck of a 32^3 patch) comes out as garbage on the development CPU
(PyTorch 2.14.1, AMX): values near 1e36, inf or NaN, from one call to the next. Adam (amsgrad) then
freezes the weight for good or, on an inf, turns the whole model into NaN a step later. The forward
pass and the input gradient are correct, and larger inputs are correct. :func:`guard_small_bf16_convs`
makes such convolutions compute in float32. They are tiny: an MMFormer branch's bf16 training step
on a 32^3 patch took 1.003x and 1.05x as long guarded as unguarded (two runs, medians of 30 and 12).
``tests/models/test_numerics.py`` checks the guarded gradients against float32.
"""

from __future__ import annotations

import torch
from torch import nn


def _bf16_on_cpu(x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast or x.dtype == torch.bfloat16


class SmallInputSafeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes in float32 when, on CPU in bfloat16, its input is smaller than its
    kernel in some dimension (see the module docstring); otherwise exactly ``nn.Conv3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = any(s < k for s, k in zip(x.shape[2:], self.kernel_size))
        if not (small and _bf16_on_cpu(x)):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast("cpu", enabled=False):
            y = self._conv_forward(x.float(), self.weight.float(), bias)  # honours padding_mode
        # Under autocast the next op casts as it needs; a pure-bf16 network gets bf16 back.
        return y if torch.is_autocast_enabled("cpu") else y.to(x.dtype)


def guard_small_bf16_convs(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` in ``module`` (in place) into :class:`SmallInputSafeConv3d`.

    The class is swapped on the existing objects, so parameters (and any optimizer holding them),
    state-dict keys and checkpoints are unchanged. Idempotent.
    """
    for child in module.modules():
        if type(child) is nn.Conv3d:
            child.__class__ = SmallInputSafeConv3d
    return module
