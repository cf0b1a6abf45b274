"""prepare's worker processes start clean after PyTorch has run in the parent (they used to hang)."""

import subprocess
import sys
import textwrap

from smml_lightning.data.synthetic import synthesize

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(2)
    x = torch.randn(1, 4, 48, 48, 48)
    torch.nn.functional.conv3d(x, torch.randn(8, 4, 3, 3, 3))  # OpenMP's pool now runs in this process
    torch.nn.functional.interpolate(x, size=(50, 50, 50), mode="trilinear")
    from smml_lightning.data.prepare import prepare
    summary = prepare(sys.argv[1], sys.argv[2], min_size=(16, 16, 16), workers=2, spacing=2.0, progress=False)
    print(len(summary.prepared))
    """
)


def test_prepare_with_workers_after_torch_ops_finishes(tmp_path):
    synthesize(tmp_path / "raw", 2, shape=(32, 32, 24), seed=1)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "raw"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "2"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted(
        p.name for p in (tmp_path / "raw").iterdir() if p.is_dir()
    )
