"""The 15-subset test report as a callback: the module's ``test_step`` returns metric rows
(``{"rows": [...]}``); this collects them, gathers them from every rank, writes the report files
(rank 0), logs the mean Dice (and the mean lesion-wise Dice of the challenge scoring, when the rows
carry it) per region and puts the subset tables, legacy and lesion-wise, into W&B.

Where the report goes and what it quotes are the module's settings (``report_dir``,
``compare_published``, ``method_name``, ``et_min_voxels``, ``challenge`` and the sliding-window
settings), so configs keep one place for them. :class:`~smml_lightning.lit.base.MissingModalityModule`
registers this callback itself (``configure_callbacks``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger

from ..evaluation.report import REPORT_REGIONS, lesionwise_table, summary_table, write_report

if TYPE_CHECKING:
    from .base import MissingModalityModule


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All ranks' rows (each case once: a padded sampler may score one on two ranks); as is in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return rows
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, rows)
    unique = {(r["case"], r["subset"], r["region"]): r for part in gathered for r in part}
    return list(unique.values())


class TestReport(pl.Callback):
    """Collect ``test_step``'s rows and write the report at the end of the test epoch, into the module's
    ``report_dir`` (default ``<log_dir>/test-<time>``)."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.written: dict[str, Path] = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = []
        self.written = {}

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs:
            self.rows.extend(outputs["rows"])

    # The callback serves MissingModalityModule only (its settings name the report), hence the narrower type.
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: MissingModalityModule) -> None:  # type: ignore[override]
        rows = gather_rows(self.rows)
        if not rows:
            return
        if trainer.is_global_zero:
            out = Path(pl_module.report_dir) if pl_module.report_dir else self._default_dir(trainer)
            self.written = write_report(
                rows,
                out,
                method_name=pl_module.method_name,
                dataset_layout=_layout_name(trainer),
                compare=pl_module.compare_published,
                et_min_voxels=pl_module.et_min_voxels,
                settings=pl_module.inference_settings(),
                challenge=pl_module.challenge or "gli",
                original_grid=hasattr(getattr(trainer, "datamodule", None), "case_meta"),
            )
            pl_module.print(
                f"test report written to {out} ({', '.join(p.name for p in self.written.values())})"
            )
            table = summary_table(rows)  # Dice and HD95 per subset and region, and their 15-subset average
            lesions = lesionwise_table(rows)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table(key="test/subsets", dataframe=table)
                    if lesions is not None:
                        logger.log_table(key="test/lesionwise", dataframe=lesions)
                    if "heatmap" in self.written:
                        logger.log_image(key="test/heatmap", images=[str(self.written["heatmap"])])
        means = {}
        for region in REPORT_REGIONS:
            values = [r["dice"] for r in rows if r["region"] == region]
            if values:
                means[f"test/dice_{region}"] = sum(values) / len(values)
            lesion = [r["lesion_dice"] for r in rows if r["region"] == region and "lesion_dice" in r]
            if lesion:
                means[f"test/lesion_dice_{region}"] = sum(lesion) / len(lesion)
        pl_module.log_dict(means, rank_zero_only=True, batch_size=1)

    @staticmethod
    def _default_dir(trainer: pl.Trainer) -> Path:
        base = Path(trainer.log_dir or trainer.default_root_dir)
        return base / f"test-{time.strftime('%Y%m%d-%H%M%S')}"


def _layout_name(trainer: pl.Trainer) -> str | None:
    """The release layout of the test cases (selects the published comparison rows), when known."""
    datamodule: Any = getattr(trainer, "datamodule", None)
    names = getattr(datamodule, "splits", None) or {}
    test = names.get("test") if isinstance(names, dict) else None
    if not test or not hasattr(datamodule, "case_meta"):
        return None
    return datamodule.case_meta(test[0]).layout
