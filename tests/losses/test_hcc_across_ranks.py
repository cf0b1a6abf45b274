"""The inter-sample HCC across DDP ranks equals the same relation computed in one process.

Two gloo processes each hold part of a batch; the relation over the gathered batch must give every
rank its rows of the one-process similarity matrix, and (equal shares) the one-process loss and, after
DDP's gradient averaging, its gradients. Run as a script, this file is the 2-process program.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smml_lightning.losses.hcc import inter_sample_relation, sample_similarity

WORLD = 2
CASES = {"equal": [1, 1], "uneven": [2, 1]}


def _features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, 2, 2, 2, generator=g), torch.randn(n, 6, 2, 2, 2, generator=g)


def _rows(rank: int, sizes: list[int]) -> slice:
    """This rank's rows of the global batch."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result = {}
    for name, sizes in CASES.items():
        feat_a, feat_b = (f[_rows(rank, sizes)].clone().requires_grad_() for f in _features(sum(sizes)))
        loss = inter_sample_relation(feat_a, feat_b, across_ranks=True)
        loss.backward()
        result[name] = {
            "sim": sample_similarity(feat_b.detach(), across_ranks=True),
            "loss": loss.detach(),
            "grad_a": feat_a.grad,
            "grad_b": feat_b.grad,
        }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_relation_over_the_global_batch(tmp_path):
    from conftest import run_script  # here, not at the top: this file also runs as a script

    done = run_script(__file__, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for name, sizes in CASES.items():
        feat_a, feat_b = (f.requires_grad_() for f in _features(sum(sizes)))
        whole = sample_similarity(feat_b.detach())
        for r in range(WORLD):  # each rank has its rows of the global matrix
            torch.testing.assert_close(ranks[r][name]["sim"], whole[_rows(r, sizes)])
            assert ranks[r][name]["sim"].shape == (sizes[r], sum(sizes))

    # Equal shares: the mean of the ranks' losses is the one-process loss, and the ranks' gradients
    # averaged as DDP averages them are the one-process gradients (each rank's rows).
    feat_a, feat_b = (f.requires_grad_() for f in _features(WORLD))
    loss = inter_sample_relation(feat_a, feat_b)
    loss.backward()
    assert loss.item() > 1e-4  # random features: the two branches' relations differ
    torch.testing.assert_close(torch.stack([r["equal"]["loss"] for r in ranks]).mean(), loss.detach())
    for key, grad in (("grad_a", feat_a.grad), ("grad_b", feat_b.grad)):
        torch.testing.assert_close(torch.cat([r["equal"][key] for r in ranks]) / WORLD, grad)
    # Without the gather a rank with one sample has no pooled relation: the term would be zero.
    assert inter_sample_relation(feat_a[:1], feat_b[:1]).item() == 0.0


if __name__ == "__main__":
    out = Path(sys.argv[1])
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
