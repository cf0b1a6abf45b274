"""CMC end to end through the CLI on tiny synthetic data: fit (bf16), test on all 15 subsets, predict."""

from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest

from conftest import prepared_cache
from smml_lightning.cli import lightning_main
from smml_lightning.lit.cmc import CMC

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.init_args.network.init_args.base_width=2",
    "--model.init_args.warmup_epochs=0",
    "--data.patch_size=32",
    "--data.batch_size=2",
    "--data.samples_per_volume=1",
    "--data.queue_length=4",
    "--data.num_workers=1",
    "--data.val_fraction=0.25",
    "--data.test_fraction=0.25",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
]


def _common(root: Path) -> list[str]:
    return [
        "--config",
        "synthetic_cmc",
        f"--data.cache_dir={root / 'cache'}",
        f"--trainer.default_root_dir={root / 'fit'}",
        f"--checkpoint.dirpath={root / 'fit' / 'ckpt'}",
        f"--trainer.logger.init_args.save_dir={root / 'logs'}",
        *TINY,
    ]


def test_cmc_fit_test_predict(tmp_path, monkeypatch):
    prepared_cache(tmp_path, 8, seed=5)
    monkeypatch.chdir(REPO)
    cli = lightning_main(["fit", *_common(tmp_path), "--trainer.max_epochs=1"])
    assert isinstance(cli.model, CMC)
    assert cli.trainer.global_step == 2  # 4 training cases, one patch each, batch 2
    assert 0.0 <= float(cli.trainer.callback_metrics["val/dice_mean"]) <= 1.0
    ckpt = tmp_path / "fit" / "ckpt" / "last.ckpt"

    report = tmp_path / "report"
    lightning_main(
        ["test", *_common(tmp_path), f"--ckpt_path={ckpt}", f"--model.init_args.report_dir={report}"]
    )
    rows = pd.read_csv(report / "per_case.csv")
    assert rows["subset"].nunique() == 15 and rows["case"].nunique() == 2 and rows["dice"].between(0, 1).all()

    out = tmp_path / "pred"
    lightning_main(["predict", *_common(tmp_path), f"--ckpt_path={ckpt}", f"--prediction.output_dir={out}"])
    written = sorted(out.glob("*_seg.nii.gz"))
    assert len(written) == 2
    assert {int(v) for v in nib.load(written[0]).get_fdata().ravel()} <= {0, 1, 2, 4}


def test_cmc_semi_supervised_fit_logs_both_unlabeled_terms(tmp_path, monkeypatch):
    prepared_cache(tmp_path, 8, seed=6)
    monkeypatch.chdir(REPO)
    cli = lightning_main(
        [
            "fit",
            *_common(tmp_path),
            "--config",
            "labeled/labeled_20",
            f"--data.output_dir={tmp_path / 'out'}",
            "--trainer.max_epochs=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.check_val_every_n_epoch=2",
        ]
    )
    labeled = (tmp_path / "out" / "labeled.txt").read_text().split()
    assert labeled == cli.datamodule.labeled and len(labeled) == 1  # 20% of 4 training cases
    assert cli.trainer.global_step == 2  # as many steps as with every case labeled
    logged = pd.concat(pd.read_csv(f) for f in (tmp_path / "logs").rglob("metrics.csv"))
    for term in ("seg", "csc", "cac"):  # zero on a step whose unlabeled sample keeps one modality only
        values = logged[f"train/{term}_step"].dropna()
        assert len(values) == 2 and values.ge(0).all() and values.gt(0).any(), term


def test_supervised_method_refuses_unlabeled_cases(tmp_path, monkeypatch):
    prepared_cache(tmp_path, 8, seed=6)
    monkeypatch.chdir(REPO)
    args = [
        "fit",
        "--config",
        "synthetic_maml",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.logger=false",
        "--data.use_unlabeled=true",
        "--data.labeled_fraction=0.5",
    ]
    with pytest.raises(SystemExit, match="supervised only"):
        lightning_main(args)
