"""``smml evaluate``: score a folder of predictions against BraTS reference labels as the challenge does.

References are found with the release layouts of :mod:`~smml_lightning.data.layouts` (any supported
release, the case folders or a flat folder of ``*seg.nii.gz`` files); their label values follow the
layout's convention. A prediction is matched to a case by file name: ``<case>.nii.gz`` or
``<case>_seg.nii.gz`` (what ``smml predict`` writes), or, for BraTS 2023 case names, any file whose name
ends in the case id ``<5 digits>-<3 digits>.nii.gz`` (the organisers' rule). Prediction labels may use
either release convention (ET = 4 or 3); the values present decide. A case without a prediction scores
as the worst (:func:`~smml_lightning.evaluation.lesionwise.worst_scores`).

Outputs in ``out``: ``per_case.csv`` (one row per case and region), ``summary.csv`` (means per region),
``report.md`` (the table and how each figure is computed). Nothing is written until every file has been
read and scored, each file is written atomically, and existing reports are kept unless ``overwrite``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from smml_lightning.data.labels import REGIONS, to_internal
from smml_lightning.data.layouts import discover
from smml_lightning.evaluation.lesionwise import MAX_HD95, METRICS, challenge_metrics, challenge_rules
from smml_lightning.io import atomic_write_text

FILES: dict[str, str] = {"per_case": "per_case.csv", "summary": "summary.csv", "report": "report.md"}
_CASE_ID = re.compile(r"(\d{5}-\d{3})$")
_NIFTI = re.compile(r"\.nii(\.gz)?$")


def _stem(path: Path) -> str:
    return _NIFTI.sub("", path.name)


def _read_labels(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Integer label array and voxel spacing of a NIfTI file; ValueError naming the file otherwise."""
    try:
        image: Any = nib.load(str(path))  # a NIfTI image (nibabel types load() as any image format)
        data = np.asanyarray(image.dataobj)
        spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    except Exception as err:  # nibabel raises many kinds for a damaged file
        raise ValueError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from err
    if data.ndim != 3:
        raise ValueError(f"{path}: a label map must be 3-D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer) and not np.all(np.equal(np.mod(data, 1), 0)):
        raise ValueError(f"{path}: label values must be whole numbers")
    return data.astype(np.int64), spacing


def prediction_convention(labels: np.ndarray, path: Path, fallback: str) -> str:
    """Release convention of a prediction from its values: ET = 4 (brats2018) or 3 (brats2023)."""
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1, 2, 3, 4}:
        raise ValueError(
            f"{path}: label values {sorted(values - {0, 1, 2, 3, 4})} are not BraTS labels "
            "(0, 1, 2 and 4 or 3)"
        )
    if 3 in values and 4 in values:
        raise ValueError(f"{path}: holds both 3 and 4; BraTS releases use one of them for ET")
    if 4 in values:
        return "brats2018"
    if 3 in values:
        return "brats2023"
    return fallback


def match_predictions(case_names: Sequence[str], pred_dir: Path) -> tuple[dict[str, Path], list[Path]]:
    """Prediction file of each case (absent when none), and the prediction files no case claimed."""
    files = sorted(p for p in pred_dir.rglob("*") if p.is_file() and _NIFTI.search(p.name))
    found: dict[str, Path] = {}
    for name in case_names:
        case_id = _CASE_ID.search(name)
        hits = [
            p
            for p in files
            if _stem(p) in (name, f"{name}_seg", f"{name}-seg")
            or (case_id is not None and _stem(p).endswith(case_id.group(1)))
        ]
        if len(hits) > 1:
            raise ValueError(f"case {name}: several predictions match: {', '.join(str(h) for h in hits)}")
        if hits:
            found[name] = hits[0]
    claimed = set(found.values())
    return found, [p for p in files if p not in claimed]


def score_folders(
    pred_dir: Path | str, ref_dir: Path | str, challenge: str = "gli", layout: str = "auto"
) -> tuple[pd.DataFrame, list[Path]]:
    """Rows ``case, region, prediction, METRICS...`` for every labelled reference case, and unmatched files."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for what, folder in (("--pred", pred_dir), ("--ref", ref_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {folder}: not a folder")
    cases = [c for c in discover(ref_dir, layout) if c.label is not None]
    if not cases:
        raise ValueError(f"{ref_dir}: no reference label files (*seg.nii.gz) found")
    predictions, unmatched = match_predictions([c.name for c in cases], pred_dir)
    rows = []
    for case in cases:
        raw, spacing = _read_labels(case.label)  # type: ignore[arg-type]
        try:
            truth = to_internal(raw, case.convention)
        except ValueError as err:
            raise ValueError(f"{case.label}: {err}") from err
        path = predictions.get(case.name)
        pred = None
        if path is not None:
            raw_pred, _ = _read_labels(path)
            if raw_pred.shape != truth.shape:
                raise ValueError(
                    f"{path}: shape {raw_pred.shape} differs from the reference {case.label} {truth.shape}"
                )
            pred = to_internal(raw_pred, prediction_convention(raw_pred, path, case.convention))
        for region, values in challenge_metrics(pred, truth, spacing, challenge).items():
            rows.append(
                {
                    "case": case.name,
                    "region": region,
                    "prediction": "" if path is None else str(path),
                    **values,
                }
            )
    return pd.DataFrame(rows, columns=["case", "region", "prediction", *METRICS]), unmatched


def summary_frame(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per region: cases, missing predictions, the mean of each score and the total lesion counts."""
    records = []
    for region in REGIONS:
        part = per_case[per_case["region"] == region]
        record: dict[str, object] = {
            "region": region,
            "n_cases": len(part),
            "n_missing": int((part["prediction"] == "").sum()),
        }
        for metric in METRICS:
            values = part[metric]
            record[metric] = int(values.sum()) if metric.startswith("n_") else float(values.mean())
        records.append(record)
    return pd.DataFrame(records)


def _markdown(
    summary: pd.DataFrame,
    per_case: pd.DataFrame,
    unmatched: list[Path],
    challenge: str,
    pred_dir: Path,
    ref_dir: Path,
) -> str:
    rules = challenge_rules(challenge)
    head = [
        "Region",
        "Lesion-wise Dice",
        "Lesion-wise HD95 (mm)",
        "Legacy Dice",
        "Legacy HD95 (mm)",
        "Sensitivity",
        "Specificity",
        "TP",
        "FP",
        "FN",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in summary.itertuples(index=False):
        lines.append(
            f"| {rec.region} | {rec.lesion_dice * 100:.2f} | {rec.lesion_hd95:.2f} | "
            f"{rec.legacy_dice * 100:.2f} | {rec.legacy_hd95:.2f} | {rec.sensitivity * 100:.2f} | "
            f"{rec.specificity * 100:.3f} | {rec.n_tp} | {rec.n_fp} | {rec.n_fn} |"
        )
    missing = sorted(set(per_case.loc[per_case["prediction"] == "", "case"]))
    n_cases = per_case["case"].nunique()
    notes = [
        (
            f"- Lesion-wise (the BraTS 2023 challenge rules, {rules.name}): lesions are 26-connected components "
            f"of the truth, merged when they share a component of the truth dilated {rules.dilation} times "
            "(18-connected element); a predicted component counts for a lesion when it touches that lesion so "
            "dilated. Each lesion scores the Dice and HD95 of it against its matched components; a missed "
            f"lesion scores Dice 0 and HD95 {MAX_HD95:g} mm; lesions of at most {rules.min_volume:g} mm³ are "
            f"left out; every unmatched predicted component adds a Dice 0 / HD95 {MAX_HD95:g} mm entry. "
            "A case's score is the mean of its entries (Dice 1, HD95 0 when truth and prediction are empty)."
        ),
        (
            "- HD95 as the challenge computes it: area-weighted 95th percentile of the distances between the "
            f"marching-cubes surfaces, larger direction; exactly one side empty gives {MAX_HD95:g} mm."
        ),
        (
            "- Legacy: Dice and HD95 of the whole region, voxel-wise sensitivity and specificity over the "
            "reference grid; TP/FP/FN count lesions (summed over cases)."
        ),
        (
            f"- A missing prediction scores Dice 0, HD95 {MAX_HD95:g} mm, sensitivity and specificity 0, "
            "and its kept lesions count as false negatives."
        ),
        "- No subset heatmap: the predictions carry no modality subset.",
    ]
    intro = (
        f"{n_cases} reference cases from {ref_dir}; {n_cases - len(missing)} with a prediction, "
        f"{len(missing)} missing (scored as the worst). Dice and sensitivity in %, means over cases."
    )
    parts = [
        f"# {rules.name} scoring of {pred_dir}",
        "",
        intro,
        "",
        *lines,
        "",
        "## How these figures were computed",
        "",
        *notes,
    ]
    if missing:
        parts += ["", "## Missing predictions", "", *(f"- {name}" for name in missing)]
    if unmatched:
        parts += [
            "",
            "## Prediction files matching no reference case (not scored)",
            "",
            *(f"- {p}" for p in unmatched),
        ]
    return "\n".join(parts) + "\n"


def evaluate(
    pred: str | None = None,
    ref: str | None = None,
    out: str | None = None,
    challenge: str = "gli",
    layout: str = "auto",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Score a folder of predictions against BraTS reference labels (lesion-wise and legacy metrics).

    Args:
        pred: folder of predictions: ``<case>_seg.nii.gz`` (smml predict), ``<case>.nii.gz``, or BraTS 2023
            names ending in the case id (``...-00000-000.nii.gz``).
        ref: BraTS folder with a ``*seg.nii.gz`` per case (any supported release layout).
        out: report folder (per_case.csv, summary.csv, report.md).
        challenge: gli, ssa, ped, men or met (dilation and lesion size threshold of that challenge).
        layout: the reference layout, or ``auto`` to detect it.
        overwrite: replace report files that exist in ``out``.
    """
    if pred is None or ref is None or out is None:
        raise ValueError("smml evaluate needs --pred DIR --ref DIR --out DIR")
    challenge_rules(challenge)  # reject an unknown challenge before reading anything
    out_dir = Path(out)
    paths = {key: out_dir / name for key, name in FILES.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"report files already exist: {existing}; pass --overwrite true to replace them"
        )
    per_case, unmatched = score_folders(pred, ref, challenge, layout)
    summary = summary_frame(per_case)
    markdown = _markdown(summary, per_case, unmatched, challenge, Path(pred), Path(ref))
    atomic_write_text(paths["per_case"], per_case.to_csv(index=False))
    atomic_write_text(paths["summary"], summary.to_csv(index=False))
    atomic_write_text(paths["report"], markdown)
    n_missing = int(summary["n_missing"].iloc[0])
    print(f"scored {per_case['case'].nunique()} cases ({n_missing} missing predictions) into {out_dir}")
    return paths
