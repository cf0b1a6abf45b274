"""Lightning glue shared by every method: optimisation, whole-case validation, the 15-subset test
(rows here, the report in :mod:`smml_lightning.lit.test_report`), prediction, channels-last inputs and
the non-finite-loss guard.

A method subclass provides :meth:`training_losses` (named, already weighted loss terms) and
:meth:`inference_models` (the networks whose logits are averaged at inference).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

from ..data.cache import CaseMeta
from ..data.labels import REGION_CLASSES, REGIONS
from ..data.modalities import SUBSETS, parse_subset, subset_index, subset_name
from ..data.resample import is_resampled, logits_to_box, native_label, resampled_spacing
from ..evaluation.inference import predict_subsets
from ..evaluation.lesionwise import challenge_metrics, challenge_rules
from ..evaluation.metrics import case_metrics, dice, image_diagonal
from ..losses.segmentation import SegmentationLoss
from ..models.base import MaskedSegmenter, predicted_labels
from ..models.numerics import guard_small_bf16_convs
from .hparams import checkpoint_class, record_hyperparameters
from .test_report import TestReport

INPUT_SPACING = "smml_input_spacing"  # checkpoint key of MissingModalityModule.input_spacing


def _subset_indices(names: Sequence[str] | None) -> list[int]:
    """Subset names (``"flair+t1ce"`` or ``"all"``) to indices into :data:`SUBSETS`; ``None`` = all 15."""
    if names is None:
        return list(range(len(SUBSETS)))
    out = []
    for name in names:
        out.append(len(SUBSETS) - 1 if name.strip().lower() == "all" else subset_index(parse_subset(name)))
    return out


def channels_last_weights(module: torch.nn.Module) -> None:
    """Store 5-D weights (3-D convolutions) as ``channels_last_3d``; other tensors are left alone."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.dim() == 5:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)


class CompiledForward:
    """A module's ``forward`` through ``torch.compile`` (inductor), falling back to eager with one warning
    line if compiling or running the compiled code fails (compilation happens at the first call)."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.eager = module.forward
        self.compiled = torch.compile(self.eager)
        self.name = name
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever the compiler raised, eager decides
            out = self.eager(*args, **kwargs)  # an error of the model itself raises here, unchanged
            self.failed = True
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"torch.compile of {self.name} failed ({type(error).__name__}: {reason}); "
                "running it eagerly (model.init_args.compile=false silences this)",
                stacklevel=2,
            )
            return out


def compile_networks(module: torch.nn.Module) -> list[str]:
    """Route the ``forward`` of every outermost :class:`MaskedSegmenter` in ``module`` through
    :class:`CompiledForward`; returns their names. Training calls ``forward``; whole-case inference
    calls ``encode`` and ``decode_subsets``, which stay eager."""
    names = []

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, MaskedSegmenter):
                if not isinstance(child.forward, CompiledForward):
                    child.forward = CompiledForward(child, path)  # type: ignore[method-assign]
                names.append(path)
            else:
                visit(child, path + ".")

    visit(module, "")
    return names


def check_weights(**weights: float) -> None:
    """Loss weights are config values: a negative one is a mistake, named in the error."""
    for key, value in weights.items():
        if value < 0:
            raise ValueError(f"model.{key} must be >= 0, got {value}")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite."""


class MissingModalityModule(pl.LightningModule):
    """Base LightningModule for segmentation from any subset of the four modalities.

    Args:
        roi_size: sliding-window size for whole-case inference (linked to ``data.patch_size`` by the CLI).
        sw_overlap: window overlap (0.5 in the community's protocol).
        sw_mode: window blending, ``"gaussian"`` or ``"constant"``.
        sw_batch_size: windows per network call. 2 by default: on CPU PyTorch sends a batch of one
            float32 3D convolution with few channels to a slow non-oneDNN kernel (about 6x slower on the
            development machine); GPUs with memory to spare go faster with more.
        val_subsets: subsets scored during validation (``None``: all 15, cheap thanks to encoder reuse).
        test_subsets: subsets scored by ``test`` (``None``: all 15).
        et_min_voxels: ET post-processing threshold for the ``ET_post`` region.
        challenge: BraTS challenge whose lesion-wise rules the test report adds (``gli``, ``ssa``, ``ped``,
            ``men``, ``met``; see :mod:`~smml_lightning.evaluation.lesionwise`); ``None`` leaves them out.
        test_grid: where ``test`` scores a case prepared at a resampled spacing: ``"native"`` (its
            original grid, logits resampled before the argmax: what a user's figures mean) or ``"cache"``
            (the resampled grid the network sees; several times cheaper at full size, for benchmarks that
            compare methods on one grid). Cases kept on their own grid are scored there either way.
        optimizer: ``"adam"`` (Adam with amsgrad, as SMML) or ``"sgd"`` (Nesterov 0.99, as nnU-Net/MAML).
        lr, weight_decay, poly_power: learning rate, weight decay and poly decay exponent (per step).
        channels_last: keep 5-D weights and inputs in ``channels_last_3d``. Off by default: measured on
            an AMX CPU (benchmarks/speed.py) it made the whole MMFormer step slower, because PyTorch's CPU
            norm kernels are slow on that layout or convert it back; try it on tensor-core GPUs.
        compile: run each network's training forward through ``torch.compile`` (inductor), compiled at
            the first step (minutes on a CPU), falling back to eager with one warning line if that
            fails. Off by default: on the development CPU the compiled step gained less than the
            minutes of compiling cost over a short run (docs/benchmarks.md); whole-case inference
            stays eager.
        on_nonfinite: ``"raise"`` stops with the name of the offending term; ``"skip"`` skips the step
            (weights and optimizer state untouched). Under DDP the ranks decide together: a NaN on one
            rank stops, or skips the step on, all of them.
        report_dir: where ``test`` writes its report (default: ``<log_dir>/test-<time>``; see
            :class:`~smml_lightning.lit.test_report.TestReport`).
        compare_published: add published BraTS figures of the same release to the report (turn off
            for synthetic data, where they do not apply).
        method_name: name in reports (default: the class name).
        seg_loss: the supervised segmentation loss of every output (default: :class:`SegmentationLoss` with
            its defaults; ``class_weighted_ce=true, include_background=true`` is the public code's).
    """

    def __init__(
        self,
        roi_size: int | Sequence[int] = 128,
        sw_overlap: float = 0.5,
        sw_mode: Literal["gaussian", "constant"] = "gaussian",
        sw_batch_size: int = 2,
        val_subsets: list[str] | None = None,
        test_subsets: list[str] | None = None,
        et_min_voxels: int = 500,
        challenge: str | None = "gli",
        test_grid: Literal["native", "cache"] = "native",
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        channels_last: bool = False,
        compile: bool = False,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        report_dir: str | None = None,
        compare_published: bool = True,
        method_name: str | None = None,
        seg_loss: SegmentationLoss | None = None,
    ) -> None:
        super().__init__()
        # Every constructor argument, the subclass's included, in a form that rebuilds the model from
        # its checkpoint alone (see lit/hparams.py). Modules given as arguments (a loss) are recorded
        # as class_path/init_args, so Lightning's advice to leave them out does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        record_hyperparameters(self)
        self._skip_update = False  # set by a skipped non-finite step, read before the update
        # Voxel spacing (mm) of the cache the model was trained on, when resampled (``prepare --spacing``).
        self.input_spacing: tuple[float, float, float] | None = None
        if not 0.0 <= sw_overlap < 1.0:
            raise ValueError(f"model.sw_overlap must be in [0, 1), got {sw_overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"model.sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(roi_size)
        self.sw_overlap = sw_overlap
        self.sw_mode = sw_mode
        self.sw_batch_size = sw_batch_size
        self.val_subset_ids = _subset_indices(val_subsets)
        self.test_subset_ids = _subset_indices(test_subsets)
        self.et_min_voxels = et_min_voxels
        self.challenge = None if challenge is None else challenge_rules(challenge).name
        if test_grid not in ("native", "cache"):
            raise ValueError(f"model.test_grid must be 'native' or 'cache', got {test_grid!r}")
        self.test_grid = test_grid
        self.optimizer_name = optimizer
        self.lr, self.weight_decay, self.poly_power = lr, weight_decay, poly_power
        self.channels_last = channels_last
        self.compile_networks = compile
        self.on_nonfinite = on_nonfinite
        self.report_dir = report_dir
        self.compare_published = compare_published
        self.method_name = method_name or type(self).__name__
        self.seg_loss = seg_loss or SegmentationLoss()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Rebuild the model a checkpoint holds, from the checkpoint alone (any method when called on
        this base class); keyword arguments override stored hyperparameters."""
        if isinstance(checkpoint_path, (str, Path)):
            method = checkpoint_class(checkpoint_path, cls, __name__.split(".")[0])
            if method is not None and method is not cls:
                return method.load_from_checkpoint(checkpoint_path, *args, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ---- what a method provides -------------------------------------------------------------
    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Named loss terms, each already multiplied by its weight; the total is their sum."""
        raise TypeError(f"{type(self).__name__} must implement training_losses")

    def inference_models(self) -> list[MaskedSegmenter]:
        """Networks whose logits are averaged at inference."""
        raise TypeError(f"{type(self).__name__} must implement inference_models")

    # ---- helpers ------------------------------------------------------------------------------
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return (
            x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last and x.dim() == 5 else x
        )

    def setup(self, stage: str) -> None:
        guard_small_bf16_convs(self)  # before the optimizer is built; see models/numerics.py
        if self.channels_last:
            channels_last_weights(self)
        if stage == "fit":
            self.input_spacing = self._training_spacing()
            if self.compile_networks:
                compile_networks(self)

    def _training_spacing(self) -> tuple[float, float, float] | None:
        """The voxel spacing of the training cache when ``smml prepare --spacing`` resampled it, else None."""
        # ``_trainer``: ``self.trainer`` raises when the module is set up without one (benchmarks, tests).
        datamodule: Any = getattr(self._trainer, "datamodule", None)
        names = (getattr(datamodule, "splits", None) or {}).get("train") or []
        if not names or not hasattr(datamodule, "case_meta"):
            return None
        return resampled_spacing(datamodule.case_meta(names[0]))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The grid the model was trained on: prediction from a checkpoint alone resamples new cases to it.
        checkpoint[INPUT_SPACING] = None if self.input_spacing is None else list(self.input_spacing)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spacing = checkpoint.get(INPUT_SPACING)
        self.input_spacing = (
            None if spacing is None else (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        )

    def in_warmup(self) -> bool:
        """True before the epoch at which the mutual/consistency terms switch on."""
        return self.current_epoch < getattr(self, "warmup_epochs", 0)

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        batch = dict(batch, image=self._layout(batch["image"]))
        terms = self.training_losses(batch)
        bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
        # Under DDP all ranks must skip (or stop) together: a rank that skipped its backward alone would
        # leave the others' gradient all-reduce paired with its next step's, or waiting for ever.
        any_bad = (
            bool(bad)
            if self._trainer is None
            else self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False)
        )
        if any_bad:
            found = (
                f"non-finite loss term(s) {bad} (values: { {k: float(terms[k].detach()) for k in bad} })"
                if bad
                else "a non-finite loss term on another rank"
            )
            message = f"{found} at epoch {self.current_epoch}, step {self.global_step}"
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    message + "; set model.init_args.on_nonfinite=skip to skip such steps"
                )
            # The rank that found the terms names them; the others' notice is said once.
            (warnings.warn if bad else rank_zero_warn)(f"skipping step: {message}")
            return self._skipped_step_loss()
        total = torch.stack(list(terms.values())).sum()
        bsz = batch["image"].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True, batch_size=bsz)
        self.log("train/loss", total.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=bsz)
        return total

    def _skipped_step_loss(self) -> torch.Tensor:
        """A zero loss on every trainable weight, and a note to drop the gradients before the update.

        Lightning refuses a ``None`` step under DDP, and DDP's backward must still meet the other ranks'
        all-reduce: so the skipped step runs a backward of zeros, and :meth:`on_before_optimizer_step`
        then sets the gradients to ``None``, which torch optimizers read as "leave this weight and its
        optimizer state alone": the step changes nothing, as if it had not been taken.
        """
        self._skip_update = True
        return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:
            optimizer.zero_grad(set_to_none=True)
            self._skip_update = False

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        params = [p for p in self.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, amsgrad=True)
        else:
            opt = torch.optim.SGD(
                params, lr=self.lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True
            )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        power = self.poly_power

        def poly(step: int) -> float:
            if not math.isfinite(total) or total <= 0:
                return 1.0
            return max(0.0, 1.0 - step / total) ** power

        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log(
            "train/lr",
            self.trainer.optimizers[0].param_groups[0]["lr"],
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    # ---- whole-case inference -----------------------------------------------------------------
    def predict_case(
        self, image: torch.Tensor, subset_ids: Sequence[int], native: CaseMeta | None = None
    ) -> dict[int, torch.Tensor]:
        """Internal label maps ``(D, H, W)`` per subset index for one whole (cropped) case.

        Given ``native``, the metadata of a case cached on a resampled grid, the maps lie on its crop
        box in native voxels instead: the logits are resampled there before the argmax
        (:func:`~smml_lightning.data.resample.logits_to_box`).
        """
        logits = predict_subsets(
            self.inference_models(),
            self._layout(image),
            [SUBSETS[i] for i in subset_ids],
            roi_size=self.roi_size,
            overlap=self.sw_overlap,
            mode=self.sw_mode,
            sw_batch_size=self.sw_batch_size,
        )
        if native is not None and is_resampled(native):
            return {sid: torch.from_numpy(logits_to_box(logits[sid][0], native)) for sid in subset_ids}
        return {sid: predicted_labels(logits[sid])[0] for sid in subset_ids}

    @staticmethod
    def _within(subset_ids: Sequence[int], batch: dict[str, Any]) -> list[int]:
        """The subsets a case can be scored on: those made only of modalities it has."""
        have = batch["available"][0].tolist() if "available" in batch else [True] * len(SUBSETS[0])
        return [i for i in subset_ids if all(h or not s for h, s in zip(have, SUBSETS[i]))]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        preds = self.predict_case(batch["image"], self._within(self.val_subset_ids, batch))
        label = batch["label"][0, 0]
        scores: dict[str, list[float]] = {r: [] for r in REGIONS}
        for pred in preds.values():
            for region in REGIONS:
                classes = torch.tensor(REGION_CLASSES[region], device=label.device)
                scores[region].append(
                    dice(torch.isin(pred, classes).cpu().numpy(), torch.isin(label, classes).cpu().numpy())
                )
        means = {r: sum(v) / len(v) for r, v in scores.items()}
        for region, value in means.items():
            self.log(f"val/dice_{region}", value, on_epoch=True, sync_dist=True, batch_size=1)
        self.log(
            "val/dice_mean",
            sum(means.values()) / len(means),
            on_epoch=True,
            sync_dist=True,
            prog_bar=True,
            batch_size=1,
        )

    # ---- test: all subsets; the report is written by the TestReport callback ---------------------
    def configure_callbacks(self) -> list[pl.Callback]:
        """The test report (:class:`~smml_lightning.lit.test_report.TestReport`) comes with every method."""
        return [TestReport()]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[dict[str, Any]]]:
        """``{"rows": ...}``: one case's report rows (written by
        :class:`~smml_lightning.lit.test_report.TestReport`): Dice and HD95 per subset it can be scored
        on and per region, and for WT, TC and ET the challenge figures
        (:func:`~smml_lightning.evaluation.lesionwise.challenge_metrics`) unless ``challenge`` is None.
        The case is scored on its crop, as if on its original grid: an HD95 with one side empty is that
        grid's diagonal, and specificity counts the voxels outside the crop. A case cached on a resampled
        grid is scored on its native grid: logits resampled before the argmax, against the label read
        again from its source file, distances in native millimetres (unless ``test_grid`` is ``"cache"``:
        then on the resampled grid, as if it were the original)."""
        name = batch["name"][0]
        meta = self._meta(name)
        resampled = meta is not None and is_resampled(meta) and self.test_grid == "native"
        truth = native_label(meta) if meta is not None and resampled else None
        if meta is not None and truth is not None:
            spacing, label, native = tuple(meta.native_spacing or meta.spacing), truth, meta
        else:
            spacing, label, native = self._spacing(name), batch["label"][0, 0].cpu().numpy(), None
        grid = self._original_shape(name) or label.shape
        if meta is not None and is_resampled(meta) and native is None:  # test_grid "cache"
            grid = label.shape
        diagonal = image_diagonal(grid, spacing)
        rows = []
        subsets = self._within(self.test_subset_ids, batch)
        for sid, pred in self.predict_case(batch["image"], subsets, native).items():
            labels = pred.cpu().numpy()
            metrics = case_metrics(
                labels, label, spacing, et_min_voxels=self.et_min_voxels, empty_distance=diagonal
            )
            challenge = (
                {}
                if self.challenge is None
                else challenge_metrics(labels, label, spacing, self.challenge, grid_voxels=math.prod(grid))
            )
            for region, values in metrics.items():
                rows.append(
                    {
                        "case": name,
                        "subset": subset_name(SUBSETS[sid]),
                        "region": region,
                        "dice": values["dice"],
                        "hd95": values["hd95"],
                        **challenge.get(region, {}),
                    }
                )
        return {"rows": rows}

    def inference_settings(self) -> dict[str, Any]:
        """The whole-case inference settings, as a test report quotes them."""
        return {
            "roi_size": list(self.roi_size),
            "overlap": self.sw_overlap,
            "blend": self.sw_mode,
            "sw_batch_size": self.sw_batch_size,
            "et_min_voxels": self.et_min_voxels,
            "branches_averaged": len(self.inference_models()),
        }

    def _meta(self, name: str, stage: str = "fit") -> CaseMeta | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "case_meta"):
            return datamodule.case_meta(name, stage=stage)
        return None

    def _original_shape(self, name: str) -> tuple[int, int, int] | None:
        meta = self._meta(name)
        return None if meta is None else meta.original_shape

    def _spacing(self, name: str) -> tuple[float, float, float]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "case_meta"):
            return tuple(datamodule.case_meta(name).spacing)
        return (1.0, 1.0, 1.0)

    # ---- predict ------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        available = tuple(bool(v) for v in batch["available"][0].tolist())
        if not any(available):
            raise ValueError(f"case {batch['name'][0]}: no modality is available, nothing to segment from")
        sid = SUBSETS.index(available)
        labels = self.predict_case(batch["image"], [sid], self._meta(batch["name"][0], stage="predict"))[sid]
        return {
            "name": batch["name"][0],
            "labels": labels.to(torch.uint8).cpu(),
            "subset": subset_name(available),
        }
