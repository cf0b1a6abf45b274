"""The `smml` command as a user meets it: its command list, configs by name from any folder, one run
folder per fit (config, checkpoints, logs, summary, test reports) that resuming and testing reuse without
overwriting anything, the per-epoch summary line, and a wheel that carries the configs."""

import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import TINY_DATA_ARGS, TINY_NETWORK_ARGS, prepared_cache
from smml_lightning import __version__
from smml_lightning.cli import COMMANDS, lightning_main, main
from smml_lightning.experiments import EXPERIMENTS_DIR, available, chain, experiment_name

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    "synthetic_single",
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.init_args.save_dir=.",
    *TINY_NETWORK_ARGS,
    *TINY_DATA_ARGS,
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.precision=32-true",
    "--trainer.check_val_every_n_epoch=2",
    "--trainer.log_every_n_steps=1",
]
LISTED = ["synth", "prepare", "priors", "fit", "validate", "test", "predict", "demo", "sweep", "evaluate"]


def test_help_lists_every_command_with_a_summary(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert set(LISTED) <= set(COMMANDS)
    for name, command in COMMANDS.items():
        assert re.search(rf"^  {name} +{re.escape(command.summary)}$", out, re.MULTILINE), name
        assert command.summary and "\n" not in command.summary


def test_unknown_command_is_named_and_lists_them_all(capsys):
    with pytest.raises(SystemExit) as info:
        main(["foo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'foo'" in err and all(f"  {name} " in err for name in COMMANDS)


def test_version(capsys):
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"smml-lightning {__version__}"


def test_configs_resolve_by_name_and_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"brats2018", "brats2020", "synthetic", "synthetic_maml", "ablations/no_prior"} <= set(available())
    assert not any(name.startswith("_base") for name in available())
    assert (
        chain("experiments/brats2020.yaml") == chain("brats2020") == chain(EXPERIMENTS_DIR / "brats2020.yaml")
    )
    assert experiment_name(["--config", "brats2018", "--config=ablations/no_prior"]) == "brats2018+no_prior"
    own = tmp_path / "mine.yaml"
    own.write_text("# base: synthetic_maml\ndata:\n  batch_size: 3\n")
    cli = lightning_main(["--config", str(own), "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "MAMLModule" and cli.datamodule.hparams.batch_size == 3
    assert cli.datamodule.hparams.patch_size == 32  # from _base/synthetic, two bases up
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "nope"])
    assert "'nope'" in str(info.value.code) and "brats2018" in str(info.value.code)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return prepared_cache(tmp_path_factory.mktemp("cli"), 4, seed=6)


def test_run_folder_holds_the_run_and_nothing_is_overwritten(cache_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    cli = lightning_main(
        ["fit", *TINY, f"--data.cache_dir={cache_dir}", "--trainer.max_epochs=3", "--run_name=first"]
    )
    run = tmp_path / "runs" / "synthetic_single" / "first"
    assert Path(cli.trainer.default_root_dir).resolve() == run
    assert (run / "checkpoints" / "last.ckpt").is_file() and list(run.glob("checkpoints/best-*.ckpt"))
    fit_config = (run / "config.yaml").read_text()
    assert yaml.safe_load(fit_config)["trainer"]["max_epochs"] == 3
    # The logger got every config value as hyperparameters (CSVLogger writes them to hparams.yaml).
    hparams = yaml.safe_load(next(run.glob("lightning_logs/version_*/hparams.yaml")).read_text())
    assert hparams["data"]["cache_dir"] == str(cache_dir) and hparams["trainer"]["max_epochs"] == 3
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["monitor"] == "val/dice_mean"
    assert Path(summary["best_model_path"]).parent == run / "checkpoints"

    # One line per epoch; validation figures only on the epoch that validated (2 of 3).
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(" |")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert ["val/dice_mean" in line for line in lines] == [False, True, False]

    # Resuming continues in the same folder; test reports land there; the fit's config stays as it was.
    lightning_main(
        [
            "fit",
            *TINY,
            f"--data.cache_dir={cache_dir}",
            "--trainer.max_epochs=4",
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    assert (run / "config.yaml").read_text() == fit_config
    assert len(list(run.glob("config-fit-*.yaml"))) == 1
    assert yaml.safe_load((run / "summary.json").read_text())["global_step"] == 8
    # The test with the config's own logger, W&B (offline here): every hyperparameter, the subset table
    # with HD95 and the heatmap reach the W&B run, which lies in the run folder with the report.
    wandb_args = [a for a in TINY if not a.startswith("--trainer.logger")]
    tested = lightning_main(
        [
            "test",
            *wandb_args,
            f"--data.cache_dir={cache_dir}",
            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    logged = tested.trainer.logger.experiment.config  # the W&B run's config, as W&B holds it
    assert logged["data"]["cache_dir"] == str(cache_dir) and logged["model"]["class_path"].endswith(
        "SingleBranch"
    )
    assert logged["trainer"]["check_val_every_n_epoch"] == 2 and logged["seed_everything"] == 0
    tested.trainer.logger.experiment.finish()
    assert (run / "config.yaml").read_text() == fit_config and len(list(run.glob("config-test-*.yaml"))) == 1
    assert len(list(run.glob("test-*/per_case.csv"))) == 1
    (files,) = run.glob("wandb/offline-run-*/files")
    (table,) = files.glob("media/table/test/subsets_*.table.json")
    columns = json.loads(table.read_text())["columns"]
    assert {"subset", "WT_dice", "WT_hd95", "ET_hd95"} <= set(columns)
    assert list(files.glob("media/images/test/heatmap_*.png"))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["synthetic_single"]
    assert sorted(p.name for p in (tmp_path / "runs" / "synthetic_single").iterdir()) == ["first"]


def test_wheel_carries_configs_license_and_entry_point(tmp_path):
    # Built from a copy, so that the build's egg-info and build/ never land in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("smml_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"smml_lightning/{p.relative_to(EXPERIMENTS_DIR.parent).as_posix()}"
        for p in EXPERIMENTS_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped <= names, sorted(shipped - names)
    assert {
        "smml_lightning/experiments/_base/synthetic.yaml",
        "smml_lightning/experiments/brats2018.yaml",
        "smml_lightning/experiments/ablations/no_prior.yaml",
        "smml_lightning/resources/published.csv",
        "smml_lightning/__main__.py",
    } <= names
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.startswith(dist_info) and n.endswith("LICENSE") for n in names)
    assert (
        "smml = smml_lightning.cli:main"
        in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    )


def test_run_names_agree_across_processes_and_never_collide(tmp_path, monkeypatch):
    from smml_lightning.lit.lightning_cli import RUN_NAME_ENV, default_run_name, run_folder_of

    for var in (
        "LOCAL_RANK",
        "NODE_RANK",
        "WORLD_SIZE",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(RUN_NAME_ENV, "from-rank-0")
    name, shared = default_run_name()
    assert re.fullmatch(r"\d{8}-\d{6}", name) and not shared  # rank 0 ignores a stale name from earlier
    monkeypatch.setenv("LOCAL_RANK", "1")  # a child started by Lightning's DDP launcher
    assert default_run_name() == ("from-rank-0", True)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "8")  # srun starts every rank itself
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert default_run_name() == ("job-4242", True)
    assert (
        run_folder_of(str(tmp_path / "runs" / "x" / "r1" / "checkpoints" / "last.ckpt"))
        == tmp_path / "runs" / "x" / "r1"
    )
    assert run_folder_of(str(tmp_path / "best.ckpt")) is None and run_folder_of("last") is None

    # Two fits started in the same second get two folders.
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("smml_lightning.lit.lightning_cli.default_run_name", lambda: ("same", False))
    first = lightning_main(["--config", "synthetic", "--trainer.logger=false"], run=False)
    Path(first.trainer.default_root_dir).mkdir(parents=True)
    second = lightning_main(["--config", "synthetic", "--trainer.logger=false"], run=False)
    assert [Path(c.trainer.default_root_dir).name for c in (first, second)] == ["same", "same-2"]
