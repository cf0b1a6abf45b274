"""benchmarks/speed.py item 3 at a toy size: every configuration runs, alternated, and the rows follow."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_NETWORK
from smml_lightning.data.modalities import SUBSETS
from smml_lightning.models.backbone import MMFormer

_SPEC = importlib.util.spec_from_file_location(
    "speed", Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
)
assert _SPEC is not None and _SPEC.loader is not None
speed = sys.modules["speed"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(speed)


def test_item_3_times_batched_and_subset_by_subset_side_by_side():
    settings = replace(speed.QUICK, eval_case=(32, 32, 48), eval_roi=32, naive_subsets=2)
    report = speed.Report()
    speed.bench_subsets(settings, report)
    raw = report.raw["subsets"]
    assert len(raw["reuse"]) == len(raw["reuse_subset_by_subset"]) == 2
    assert len(raw["single"]) == 2
    rows = {r.item: r for r in report.rows}
    ratio = rows["3. reuse / one subset"]
    assert ratio.target == "<= 3x" and ratio.passed == (ratio.value <= 3)
    batched = rows["3. all 15 with encoder reuse, subsets batched (s)"].value
    one_by_one = rows["3. all 15 with encoder reuse, subset by subset (s)"].value
    assert batched > 0 and one_by_one > 0
    assert abs(rows["3. subsets batched / subset by subset"].value - batched / one_by_one) < 1e-9


def test_flop_bound_matches_fifteen_plain_forward_passes() -> None:
    """The bound from one encode and batched decodes equals what 15 plain forward passes (one encode
    and one decode each) imply once 14 encodes are taken away."""

    torch.manual_seed(0)
    model = MMFormer(**TINY_NETWORK, dropout=0.0, patch_size=32).eval().requires_grad_(False)
    image = torch.randn(1, 4, 32, 32, 32)

    def flops(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    encode = flops(lambda: model.encode(image))
    every = flops(lambda: [model(image, torch.tensor([s])) for s in SUBSETS])
    one = flops(lambda: model(image, torch.tensor([SUBSETS[-1]])))
    bound = speed.subset_flop_bound(model, 32)
    assert 1 < bound < 15
    assert abs(bound - (every - 14 * encode) / one) < 0.02 * bound
