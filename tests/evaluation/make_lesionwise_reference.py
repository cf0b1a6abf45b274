"""Score the cases of ``lesionwise_cases.py`` with the organisers' BraTS 2023 lesion-wise code; write JSON.

The challenge code (``metrics.py`` and its ``surface_distance`` package, repository
rachitsaluja/BraTS-2023-Metrics) is not on the package registry and is not part of this repository;
it needs ``connected-components-3d`` and the pandas it pins (1.3.4: it calls ``DataFrame.append``, gone
in pandas 2, and its ``DataFrame.replace`` on a column of arrays fails in pandas 1.5), whose wheels stop
at Python 3.10, so it runs in its own Python 3.10 interpreter (about 70 s to build)::

    python3.10 -m venv /work/venv-brats
    /work/venv-brats/bin/pip install numpy==1.24.3 scipy==1.11.1 pandas==1.3.4 \\
        connected-components-3d==3.12.1 nibabel==5.1.0
    git clone https://github.com/rachitsaluja/BraTS-2023-Metrics /tmp/brats23   # commit 43c9052
    /work/venv-brats/bin/python tests/evaluation/make_lesionwise_reference.py \\
        --metrics-dir /tmp/brats23 --out tests/evaluation/data/lesionwise_reference.json

The JSON holds, per case and challenge, the official per-region figures, and its provenance (source
commit, package versions, command); ``test_lesionwise.py`` compares ours with it to 1e-6, and reruns
this script live when ``SMML_BRATS23_PYTHON`` and ``SMML_BRATS23_METRICS`` name the interpreter and the
checkout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesionwise_cases import NAMES, case

CHALLENGES = ("BraTS-GLI", "BraTS-MET", "BraTS-MEN")
FIELDS = {  # official column -> our RegionScores field
    "LesionWise_Score_Dice": "lesion_dice",
    "LesionWise_Score_HD95": "lesion_hd95",
    "Legacy_Dice": "legacy_dice",
    "Legacy_HD95": "legacy_hd95",
    "Sensitivity": "sensitivity",
    "Specificity": "specificity",
    "Num_TP": "n_tp",
    "Num_FP": "n_fp",
    "Num_FN": "n_fn",
    "GT_Complete_Volume": "gt_volume",
}


def _save(path: Path, label: np.ndarray, spacing: tuple[float, float, float]) -> None:
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-dir", required=True, help="checkout of rachitsaluja/BraTS-2023-Metrics")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.metrics_dir)
    import metrics as official  # the organisers' module

    try:
        commit = subprocess.run(
            ["git", "-C", args.metrics_dir, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            truth, pred, spacing = case(name)
            gt_path, pred_path = Path(tmp) / f"{name}-seg.nii.gz", Path(tmp) / f"{name}.nii.gz"
            _save(gt_path, truth, spacing)
            _save(pred_path, pred, spacing)
            results[name] = {}
            for challenge in CHALLENGES:
                frame = official.get_LesionWiseResults(str(pred_path), str(gt_path), challenge)
                results[name][challenge] = {
                    row["Labels"]: {ours: float(row[col]) for col, ours in FIELDS.items()}
                    for _, row in frame.iterrows()
                }
            print(name, {c: round(results[name][c]["WT"]["lesion_dice"], 4) for c in CHALLENGES})
    provenance = {
        "source": "https://github.com/rachitsaluja/BraTS-2023-Metrics metrics.py get_LesionWiseResults",
        "commit": commit,
        "packages": {
            p: metadata.version(p) for p in ("numpy", "scipy", "pandas", "connected-components-3d", "nibabel")
        },
        "python": sys.version.split()[0],
        "command": "python tests/evaluation/make_lesionwise_reference.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).write_text(json.dumps({"provenance": provenance, "cases": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
