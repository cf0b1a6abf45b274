"""End to end through the `smml` CLI on tiny synthetic BraTS data: fit (bf16, W&B offline) -> test (all
15 subsets, report files) -> predict raw cases with missing modalities back into the original grid;
and a 2-process DDP fit and test on CPU (gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from smml_lightning.cli import lightning_main, training_names
from smml_lightning.data.prepare import prepare
from smml_lightning.data.synthetic import synthesize
from smml_lightning.models.sam_prior import save_tiny_sam_checkpoint
from smml_lightning.priors import run_priors

pytestmark = pytest.mark.slow
SHAPE = (32, 32, 32)
TINY = [
    "--model.init_args.network.init_args.base_width=4",
    "--model.init_args.network.init_args.transformer_dim=16",
    "--model.init_args.network.init_args.num_heads=2",
    "--model.init_args.refiner.init_args.width=4",
    "--model.init_args.warmup_epochs=1",
    "--data.patch_size=32",
    "--data.batch_size=1",
    "--data.samples_per_volume=2",
    "--data.queue_length=4",
    "--data.num_workers=1",
    "--data.val_fraction=0.25",
    "--data.test_fraction=0.25",
    "--trainer.check_val_every_n_epoch=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    synthesize(root / "raw", 8, layout="brats2018", shape=SHAPE, seed=3)
    prepare(root / "raw", root / "cache", min_size=SHAPE, progress=False)
    ckpt = save_tiny_sam_checkpoint(root / "sam.pth", seed=0)
    train = training_names(root / "cache", None, 0.25, 0.25, 0)
    run_priors(root / "cache", checkpoint=ckpt, model_type="tiny", epochs=1, train_names=train)
    return root


def _common(root: Path) -> list[str]:
    return [
        "--config",
        "synthetic",
        f"--data.cache_dir={root / 'cache'}",
        f"--trainer.default_root_dir={root / 'fit'}",
        f"--checkpoint.dirpath={root / 'fit' / 'ckpt'}",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        *TINY,
    ]


def test_fit_test_predict_end_to_end(data, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cli = lightning_main(["fit", *_common(data), "--trainer.max_epochs=2", "--trainer.precision=bf16-mixed"])
    assert (
        cli.trainer.global_step == 2 * 4 * 2
    )  # epochs x train cases (8 - 2 val - 2 test) x 2 patches, batch 1
    assert (data / "fit" / "ckpt" / "last.ckpt").is_file()
    assert 0.0 <= float(cli.trainer.callback_metrics["val/dice_mean"]) <= 1.0
    assert list((data / "logs" / "wandb").glob("offline-run-*")), "W&B should log offline by default"

    report = data / "report"
    lightning_main(
        [
            "test",
            *_common(data),
            f"--ckpt_path={data / 'fit' / 'ckpt' / 'last.ckpt'}",
            f"--model.init_args.report_dir={report}",
        ]
    )
    per_case = pd.read_csv(report / "per_case.csv")
    assert per_case["subset"].nunique() == 15 and per_case["case"].nunique() == 2
    assert set(per_case["region"]) == {"WT", "TC", "ET", "ET_post"}
    assert per_case["dice"].between(0, 1).all()
    assert (report / "heatmap.png").stat().st_size > 0 and "Average" in (report / "report.md").read_text()

    # Raw cases with one, two and three modalities missing (2018 layout: ET written back as 4).
    raw = data / "predict_raw"
    cases = sorted(p for p in (data / "raw").rglob("Brats18_*") if p.is_dir())[:3]
    drops = [("t1",), ("t1", "t2"), ("flair", "t1ce", "t2")]
    for case, drop in zip(cases, drops):
        dest = raw / case.name
        shutil.copytree(case, dest)
        for m in drop:
            (dest / f"{case.name}_{m}.nii.gz").unlink()
        (dest / f"{case.name}_seg.nii.gz").unlink()
    out = data / "pred"
    lightning_main(
        [
            "predict",
            *_common(data),
            f"--ckpt_path={data / 'fit' / 'ckpt' / 'last.ckpt'}",
            f"--data.predict_root={raw}",
            f"--data.predict_dir={data / 'predict_cache'}",
            f"--prediction.output_dir={out}",
        ]
    )
    for case in cases:
        seg = nib.load(out / f"{case.name}_seg.nii.gz")
        ref = nib.load(case / f"{case.name}_flair.nii.gz")
        assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
        assert (out / f"{case.name}_overlay.png").is_file()
    metas = {c.name: json.loads((data / "predict_cache" / c.name / "meta.json").read_text()) for c in cases}
    assert [sum(m["available"]) for m in metas.values()] == [3, 2, 1]


def test_ddp_two_processes_fit_and_test(data, tmp_path):
    """A real 2-process DDP run on CPU (gloo): fit, then test with cases sharded and gathered once."""
    repo = Path(__file__).resolve().parents[1]
    common = [
        "--config",
        "synthetic",
        f"--data.cache_dir={data / 'cache'}",
        *TINY,
        "--data.use_prior=false",
        "--model.init_args.use_prior=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.precision=32",
        f"--trainer.default_root_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = [sys.executable, "-m", "smml_lightning.cli"]
    fit = subprocess.run(
        [*run, "fit", *common, "--trainer.max_epochs=1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    # One patch per rank: the inter-sample HCC relates the two ranks' patches (alone it would be 0).
    logged = pd.concat(pd.read_csv(f) for f in tmp_path.glob("lightning_logs/*/metrics.csv"))
    assert logged["train/hcc_sample_epoch"].dropna().gt(0).all()
    report = tmp_path / "report"
    test = subprocess.run(
        [
            *run,
            "test",
            *common,
            f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}",
            f"--model.init_args.report_dir={report}",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    rows = pd.read_csv(report / "per_case.csv")
    assert rows["case"].nunique() == 2  # both test cases, from two ranks, each once
    assert len(rows) == 2 * 15 * 4 and not rows.duplicated(["case", "subset", "region"]).any()
