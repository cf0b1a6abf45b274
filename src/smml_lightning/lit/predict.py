"""Stand-alone prediction: ``smml predict -i INPUT -o OUTPUT -c CKPT`` segments new cases with only a
checkpoint (no training cache, no experiment config).

``INPUT`` is a folder of cases in any supported BraTS layout, or one case folder; modalities may be
missing. Each case is prepared (validated, cropped, z-scored) into a working cache named by the
input's absolute path and content (:func:`~smml_lightning.data.inputs.cache_name`, under
``OUTPUT/.smml-cache`` by default), segmented from the modalities it has, and written back into its
native grid with its own header (:func:`~smml_lightning.evaluation.predict.write_prediction`).

Every input case ends as one of ``written``, ``kept`` (its output was already there: not run through
the model again) or ``failed`` (with the reason); each is printed, and all are written to
``OUTPUT/predict_summary.json``. One failing case never stops the others; the command exits non-zero
when any failed. Outputs are atomic, and existing ones are never overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..data import cache
from ..data.inputs import cache_name, drop_bad_modalities
from ..data.layouts import Case, discover
from ..data.modalities import MODALITIES, SUBSETS
from ..data.prepare import _is_done, cache_lock, prepare_case
from ..data.resample import resample_labels
from ..evaluation.predict import prediction_name, write_overlay, write_prediction
from ..io import atomic_write_text
from .base import MissingModalityModule

SUMMARY = "predict_summary.json"


@dataclass
class CaseResult:
    """What happened to one input case."""

    case: str
    status: Literal["written", "kept", "failed"]
    output: str | None = None
    reason: str | None = None
    modalities: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass
class PredictSummary:
    """The outcome of one ``smml predict`` run, as written to ``OUTPUT/predict_summary.json``."""

    input: str
    output: str
    checkpoint: str
    cache: str
    cases: list[CaseResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.cases)

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.cases if r.status == "failed"]


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    if precision == "32":
        return contextlib.nullcontext()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: {err}"


def predict(
    input: str | Path,
    output: str | Path,
    checkpoint: str | Path,
    cache_root: str | Path | None = None,
    layout: str = "auto",
    missing_ok: bool = False,
    brats_names: bool = False,
    overwrite: bool = False,
    overlay: bool = False,
    device: str = "auto",
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32",
) -> PredictSummary:
    """Segment new cases with only a checkpoint (short form: ``smml predict -i INPUT -o OUTPUT -c CKPT``).

    Args:
        input: a folder of cases in any supported BraTS layout, or one case folder (-i).
        output: where segmentations and predict_summary.json go (-o).
        checkpoint: a checkpoint written by ``smml fit`` or ``Trainer.save_checkpoint`` (-c).
        cache_root: where the working cache goes (default OUTPUT/.smml-cache), one folder per input
            path and content.
        layout: the input's layout, or auto.
        missing_ok: treat a modality file that is unreadable, all zero or on another grid as missing
            (with a warning naming it) instead of failing the case.
        brats_names: name outputs <case>.nii.gz, as the BraTS challenges expect (default <case>_seg.nii.gz).
        overwrite: redo cases whose output exists (default: keep them, and do not run them again).
        overlay: also write a PNG overlay per case.
        device: auto (a GPU when there is one), cpu, cuda or cuda:N.
        precision: 32, bf16-mixed or 16-mixed.

    Returns:
        The summary, also written to OUTPUT/predict_summary.json. Raises only when the input holds no case
        or the checkpoint cannot be loaded, since then nothing can be predicted.
    """
    input, output, checkpoint = Path(input), Path(output), Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    cases = discover(input, layout)
    work = Path(cache_root) if cache_root is not None else output / ".smml-cache"
    work = work / cache_name(input, cases)
    summary = PredictSummary(
        input=str(input.resolve()),
        output=str(output.resolve()),
        checkpoint=str(checkpoint.resolve()),
        cache=str(work.resolve()),
    )
    todo = []
    for case in cases:
        path = output / prediction_name(case.name, brats_names)
        if path.exists() and not overwrite:
            summary.cases.append(CaseResult(case.name, "kept", str(path)))
        else:
            todo.append((case, path))

    model: MissingModalityModule | None = None
    where = _device(device)
    if todo:
        try:
            model = MissingModalityModule.load_from_checkpoint(checkpoint, map_location="cpu")
        except Exception as err:
            raise ValueError(
                f"checkpoint {checkpoint} cannot be loaded ({type(err).__name__}: {err})"
            ) from err
        model.setup("predict")
        model.to(where).eval()
        print(
            f"model {type(model).__name__} from {checkpoint}; {len(todo)} case(s) to segment on {where}, "
            f"{len(cases) - len(todo)} already written"
        )
    with contextlib.ExitStack() as stack:
        if todo:
            # a second run on the same input (or a prepare of this cache) stops, naming this one
            stack.enter_context(cache_lock(work, "smml predict"))
        for case, path in todo:
            assert model is not None
            summary.cases.append(
                _predict_case(
                    case, path, work, model, where, missing_ok, overwrite, overlay, precision, output
                )
            )
    summary.cases.sort(key=lambda r: r.case)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / SUMMARY, json.dumps(asdict(summary), indent=1))
    print(
        f"{len(cases)} case(s): {summary.count('written')} written, {summary.count('kept')} kept "
        f"(already there{'' if overwrite else '; --overwrite redoes them'}), {summary.count('failed')} failed; "
        f"summary in {output / SUMMARY}"
    )
    for result in summary.failed:
        print(f"  failed: {result.case}: {result.reason}")
    return summary


def _predict_case(
    case: Case,
    path: Path,
    work: Path,
    model: MissingModalityModule,
    where: torch.device,
    missing_ok: bool,
    overwrite: bool,
    overlay: bool,
    precision: str,
    output: Path,
) -> CaseResult:
    """Prepare, segment and write one case; a failure becomes the result's reason, never an exception."""
    started = time.time()
    result = CaseResult(case.name, "failed", str(path))
    try:
        if missing_ok:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nibabel's notes on odd headers; the reason is kept
                case, result.dropped = drop_bad_modalities(case)
            for file, why in result.dropped.items():
                warnings.warn(f"case {case.name}: {file} treated as missing: {why}", stacklevel=1)
        else:
            case = dataclasses.replace(case, label=None)  # labels are not needed to predict
        result.modalities = [m for m, have in zip(MODALITIES, case.available) if have]
        spacing = model.input_spacing  # a model trained at reduced spacing sees its inputs at that spacing
        if not _is_done(work, case, model.roi_size, require_label=False, spacing=spacing):
            prepare_case(
                case, work, min_size=model.roi_size, require_all=False, require_label=False, spacing=spacing
            )
        meta = cache.load_meta(work, case.name)
        image = torch.from_numpy(cache.load_image(work, case.name, mmap=False))[None].to(where)
        sid = SUBSETS.index(tuple(meta.available))
        with _autocast(where, precision):
            labels = model.predict_case(image, [sid], meta)[sid].cpu().numpy()  # on the native crop box
        write_prediction(labels, meta, path, overwrite=overwrite)
        if overlay:
            if labels.shape != image.shape[2:]:  # the overlay shows the cached grid
                labels = resample_labels(labels, image.shape[2:])
            write_overlay(
                image[0].float().cpu().numpy(),
                labels,
                meta.available,
                output / f"{case.name}_overlay.png",
                overwrite=True,
            )
        result.status, result.reason = "written", None
    except Exception as err:  # noqa: BLE001 - every failure is reported in the summary
        result.reason = _reason(err)
    detail = (
        result.reason
        if result.status == "failed"
        else (f"{'+'.join(result.modalities)} in {time.time() - started:.1f} s")
    )
    print(f"{case.name}: {result.status} ({detail})")
    return result


_SHORT = {"-i": "--input", "-o": "--output", "-c": "--checkpoint"}


def is_short_form(args: list[str]) -> bool:
    """Whether ``smml predict`` arguments are the short form's (``-i``/``--input``) and not the Lightning
    CLI's (``--config``, ``--ckpt_path``, ``--data.*``)."""
    return any(a in ("-i", "--input") or a.startswith(("--input=", "-i=")) for a in args)


def predict_command(args: list[str]) -> None:
    """``smml predict -i INPUT -o OUTPUT -c CKPT [options]``; exits with status 1 when a case failed."""
    from jsonargparse import CLI

    expanded = []
    for a in args:
        flag, eq, value = a.partition("=")
        expanded.append(_SHORT.get(flag, flag) + eq + value if flag in _SHORT else a)
    summary = CLI(predict, args=expanded, as_positional=False)
    if summary.failed:
        raise SystemExit(1)
