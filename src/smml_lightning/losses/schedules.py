"""Weight schedules of consistency terms: a supervised warm-up, a sigmoid ramp-up and a cosine ramp-down.

``current`` and ``length`` are in the same unit (epochs in our modules). The ramps are those of the
mean-teacher line of work that CMC's public code uses (``trainer.py``): the sigmoid ramp-up
``exp(-5 (1 - t)^2)`` of Laine and Aila (arXiv 1610.02242) and the cosine ramp-down
``(cos(pi t) + 1) / 2`` of SGDR (arXiv 1608.03983), with ``t = current / length`` clipped to [0, 1].
"""

from __future__ import annotations

import math


def _progress(current: float, length: float) -> float:
    if length < 0 or current < 0:
        raise ValueError(f"schedule: current and length must be >= 0, got {current} and {length}")
    return 1.0 if length == 0 else min(current / length, 1.0)


def after_warmup(current: float, warmup: float) -> float:
    """1 from ``current >= warmup`` on, 0 before (the supervised warm-up)."""
    if warmup < 0:
        raise ValueError(f"after_warmup: warmup must be >= 0, got {warmup}")
    return 1.0 if current >= warmup else 0.0


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)``, ``t = current / length`` clipped to [0, 1]: exp(-5) at 0, 1 from ``length`` on
    (1 throughout when ``length`` is 0)."""
    phase = 1.0 - _progress(current, length)
    return math.exp(-5.0 * phase * phase)


def cosine_rampdown(current: float, length: float) -> float:
    """``(cos(pi t) + 1) / 2``, ``t = current / length`` clipped to [0, 1]: 1 at 0, 0 from ``length`` on (0
    throughout when ``length`` is 0)."""
    return 0.5 * (math.cos(math.pi * _progress(current, length)) + 1.0)
