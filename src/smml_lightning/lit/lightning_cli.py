"""The Lightning CLI behind ``smml fit|validate|test|predict``: checkpoints, prediction writer, resume
state and per-epoch summaries as top-level config groups, one folder per run, and checks that fail
before training starts.

Run folders: every command works in one folder, ``runs/<experiment>/<run name>/`` under the working
directory, holding its saved config, checkpoints (``checkpoints/``), logger files and test reports. The
experiment is named after the ``--config`` names (``brats2018``, ``synthetic+no_prior``; ``--experiment``
overrides it), so two experiments never share a folder; the run name is the start time (``--run_name``
overrides it). ``test``/``validate``/``predict`` and a resumed ``fit`` whose ``--ckpt_path`` lies in a run
folder's ``checkpoints/`` work in that run folder; ``--trainer.default_root_dir`` names the folder
outright. A logger's ``save_dir`` is the run folder when left out (W&B) and relative to it when relative
(``--trainer.logger.init_args.save_dir=.`` for TensorBoard or CSV). ``fit`` saves its resolved config as ``config.yaml``, every other command (or a second fit in
the same folder) as ``config-<command>-<time>.yaml``: nothing is overwritten; ``test`` writes its report
to ``test-<time>/`` there unless ``model.init_args.report_dir`` says otherwise. A finished ``fit`` also
writes ``summary.json`` (best checkpoint and score, last metrics) there, which ``smml sweep`` ranks by.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..data.datamodule import BratsDataModule
from ..experiments import expand_config_args, experiment_name
from .base import MissingModalityModule
from .callbacks import AtomicCheckpointIO, BestAndLastCheckpoint, EpochSummary, PredictionWriter
from .hparams import checkpoint_cli_args
from .resume import ResumeState, check_checkpoint

# Messages Lightning prints on every call that say nothing about the run (each filter matches one message):
# `smml` hands LightningCLI its (config-expanded) arguments, which differ from sys.argv by design;
warnings.filterwarnings(
    "ignore", message="LightningCLI's args parameter is intended to run from within Python"
)
# Lightning's own use of a torch API that torch deprecates (nothing a user can change);
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# the model summary counts parameters at 32 bits under bf16-mixed (its size column says so already);
warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
# MONAI's Hausdorff distance passing its own deprecated argument to get_mask_edges (MONAI 1.5).
warnings.filterwarnings("ignore", message=r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy")


class _DropTip(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger, printed at every trainer start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())

RUNS_ROOT = Path("runs")
RUN_NAME_ENV = "SMML_RUN_NAME"  # the run name a DDP launcher's child processes inherit from rank 0


def run_folder_of(ckpt_path: str | None) -> Path | None:
    """The run folder of a checkpoint saved by ``smml fit`` (``<run>/checkpoints/<file>.ckpt``), else None."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
        return None
    path = Path(ckpt_path)
    return path.resolve().parent.parent if path.parent.name == "checkpoints" else None


def default_run_name() -> tuple[str, bool]:
    """The start time, or the name rank 0 chose (DDP children started by Lightning's launcher), or the
    job's id when an external launcher (torchrun, srun) starts every rank on its own; and whether the
    name is shared with other processes (then the folder may already exist)."""
    child = int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("NODE_RANK", "0") or 0) > 0
    if child and os.environ.get(RUN_NAME_ENV):
        return os.environ[RUN_NAME_ENV], True
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if world > 1 and job and job != "none":
        return f"job-{job}", True
    return time.strftime("%Y%m%d-%H%M%S"), False


class RunConfigCallback(SaveConfigCallback):
    """Saves the resolved config into the run folder without ever overwriting one (``config.yaml`` for
    the first fit, ``config-<stage>-<time>.yaml`` otherwise) and gives every logger the full config as
    hyperparameters (W&B's run config then holds every value of the run)."""

    def __init__(self, parser: Any, config: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from ..io import atomic_write_text

        run = Path(trainer.default_root_dir)
        run.mkdir(parents=True, exist_ok=True)
        path = run / "config.yaml"
        if stage != "fit" or path.exists():
            path = run / f"config-{getattr(stage, 'value', stage)}-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        atomic_write_text(path, self.parser.dump(self.config, skip_none=False))
        values = self.config.clone().as_dict()
        values.pop("config", None)
        for logger in trainer.loggers:
            logger.log_hyperparams(values)


class SMMLCLI(LightningCLI):
    """LightningCLI with the data's patch size linked to the model's sliding-window size, run folders,
    and a clear error before ``fit`` when the data folder is missing."""

    def __init__(self, *args: Any, experiment: str | None = None, **kwargs: Any) -> None:
        self.default_experiment = experiment
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.patch_size", "model.init_args.roi_size")
        # Best (by validation Dice over the subsets) and last checkpoints, top-level as `checkpoint.*`.
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice_mean",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}",
            }
        )
        # Where `predict` writes NIfTI files, as `prediction.*`.
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.add_lightning_class_args(EpochSummary, "epoch_summary")
        # Random states in checkpoints (exact resumption) and last.ckpt on SIGTERM, as `resume.*`.
        parser.add_lightning_class_args(ResumeState, "resume")
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=self.default_experiment,
            help="the run folder's parent, runs/<experiment>/ (default: the --config names joined by '+')",
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="the run folder's name, runs/<experiment>/<run_name>/ (default: the start time)",
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        # `validate|test|predict --ckpt_path X` need neither the model's config nor the fit's data options.
        if args is None or isinstance(args, (list, tuple)):
            args = checkpoint_cli_args(sys.argv[1:] if args is None else args, __name__.split(".")[0])
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Nothing: :func:`checkpoint_cli_args` has put the checkpoint's options first, where the command
        line overrides them (Lightning's own merge would override the command line)."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = self._run_folder(cfg)
        os.environ[RUN_NAME_ENV] = run.name
        cfg.trainer.default_root_dir = str(run)
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(run / "checkpoints")
        model_args = getattr(cfg.model, "init_args", None)
        if self.subcommand == "test" and model_args is not None and model_args.get("report_dir", 0) is None:
            model_args.report_dir = str(run / f"test-{time.strftime('%Y%m%d-%H%M%S')}")
        logger = cfg.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is not None:
            if "save_dir" in init and (init.save_dir is None or not Path(init.save_dir).is_absolute()):
                init.save_dir = str(run / (init.save_dir or ""))
            if "name" in init and init.name is None and "project" in init:  # W&B's run name
                init.name = f"{run.parent.name}/{run.name}"

    def _run_folder(self, cfg: Any) -> Path:
        if cfg.trainer.default_root_dir:
            return Path(cfg.trainer.default_root_dir)
        from_ckpt = run_folder_of(cfg.get("ckpt_path"))
        if from_ckpt is not None:
            return from_ckpt
        experiment = cfg.get("experiment") or "default"
        name, shared = (cfg.get("run_name"), True) if cfg.get("run_name") else default_run_name()
        run = RUNS_ROOT / experiment / name
        if not shared and run.exists():  # two runs started in the same second
            i = 2
            while (RUNS_ROOT / experiment / f"{name}-{i}").exists():
                i += 1
            run = RUNS_ROOT / experiment / f"{name}-{i}"
        return run

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path:  # a wrong file ends in one line here, not in Lightning's restore
            check_checkpoint(ckpt_path, self.model)
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def after_fit(self) -> None:
        """``summary.json`` in the run folder: the best checkpoint, its score and the last metrics."""
        import json

        from ..io import atomic_write_text

        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        summary = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "monitor": getattr(ckpt, "monitor", None),
            "best_model_path": getattr(ckpt, "best_model_path", None) or None,
            "best_model_score": None if score is None else float(score),
            "last_model_path": getattr(ckpt, "last_model_path", None) or None,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        }
        atomic_write_text(
            Path(trainer.default_root_dir) / "summary.json", json.dumps(summary, indent=1) + "\n"
        )

    def before_fit(self) -> None:
        self.datamodule.check_ready()
        needed = 1 if getattr(self.model, "share_mask", False) else getattr(self.model, "n_masks", 1)
        if self.datamodule.hparams.n_masks < needed:
            raise SystemExit(
                f"data.n_masks={self.datamodule.hparams.n_masks}, but {type(self.model).__name__} "
                f"needs data.n_masks >= {needed} (one mask per branch; SMML's ablation "
                "model.init_args.share_mask=true needs 1)"
            )
        if self.datamodule.hparams.use_unlabeled and not getattr(self.model, "uses_unlabeled", False):
            raise SystemExit(
                f"data.use_unlabeled=true, but {type(self.model).__name__} is supervised only and "
                "cannot learn from unlabeled cases: set data.use_unlabeled=false (it then trains on "
                "the labeled cases alone) or use a semi-supervised method (CMC)"
            )


def lightning_main(args: Sequence[str] | None = None, run: bool = True) -> SMMLCLI:
    """Run the Lightning CLI (``fit``/``validate``/``test``/``predict``) with ``args`` (default: argv).

    Every ``--config`` may name a shipped config (``brats2018``, ``ablations/no_prior``) or a file; each
    is preceded by its ``# base:`` configs (see :mod:`smml_lightning.experiments`).
    """
    given = list(sys.argv[1:] if args is None else args)
    return SMMLCLI(
        MissingModalityModule,
        BratsDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_callback=RunConfigCallback,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=expand_config_args(given),
        run=run,
        experiment=experiment_name(given),
    )
