"""Evaluation reports in the layout of the papers' 15-subset tables.

Input is one row per (case, subset, region) with that case's Dice (fraction, 0..1) and HD95 (mm).
Outputs: ``per_case.csv`` (the rows), ``summary.csv`` (subset x region means plus the 15-subset
average), ``report.md`` (the papers' table, how the figures were computed, published comparison rows),
``heatmap.png`` and ``modality_gains.csv`` (what adding each modality changes, with bootstrap
intervals over cases). Rows of WT, TC and ET may also carry the BraTS challenge figures of
:mod:`~smml_lightning.evaluation.lesionwise` (``lesion_dice``, ``lesion_hd95``, ...); then
``lesionwise_per_case.csv``, ``lesionwise_summary.csv`` and a lesion-wise table in ``report.md`` come too. Every file is written atomically and nothing is overwritten unless asked, so a
finished report is never clobbered by a later run pointed at the same folder.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from smml_lightning.data.modalities import (
    MODALITIES,
    MODALITY_LABELS,
    SUBSET_NAMES,
    SUBSETS,
    parse_subset,
    subset_name,
)
from smml_lightning.evaluation.lesionwise import METRICS as LESION_METRICS
from smml_lightning.evaluation.lesionwise import challenge_rules
from smml_lightning.io import atomic_write_bytes, atomic_write_text

REPORT_REGIONS: tuple[str, ...] = ("WT", "TC", "ET", "ET_post")
"""Regions a report knows, in column order; ``ET_post`` is ET after the small-ET post-processing."""

AVERAGE = "Average"
ROW_COLUMNS: tuple[str, ...] = ("case", "subset", "region", "dice", "hd95")
FILES: dict[str, str] = {
    "per_case": "per_case.csv",
    "summary": "summary.csv",
    "report": "report.md",
    "heatmap": "heatmap.png",
    "modality_gains": "modality_gains.csv",
}
LESIONWISE_FILES: dict[str, str] = {
    "lesionwise_per_case": "lesionwise_per_case.csv",
    "lesionwise_summary": "lesionwise_summary.csv",
}


def _subset_label(value: Any) -> str:
    """Canonical subset name from an index into SUBSETS, a mask, or a '+'-joined name."""
    if isinstance(value, (int, np.integer)):
        if not 0 <= int(value) < len(SUBSETS):
            raise ValueError(f"subset index {value} is outside 0..{len(SUBSETS) - 1}")
        return SUBSET_NAMES[int(value)]
    if isinstance(value, str):
        return subset_name(parse_subset(value))
    return subset_name(value)


def rows_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Validated rows as a frame sorted by case, table subset order and region order."""
    if not rows:
        raise ValueError("no metric rows to report")
    frame = pd.DataFrame(list(rows))
    missing = [c for c in ROW_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"metric rows lack columns {missing}; each row needs {list(ROW_COLUMNS)}")
    frame = frame[list(ROW_COLUMNS)].copy()
    frame["subset"] = [_subset_label(v) for v in frame["subset"]]
    unknown = sorted(set(frame["region"]) - set(REPORT_REGIONS))
    if unknown:
        raise ValueError(f"unknown regions {unknown}; expected some of {list(REPORT_REGIONS)}")
    dup = frame.duplicated(["case", "subset", "region"], keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        raise ValueError(
            f"duplicate metric rows, e.g. case {first['case']!r}, {first['subset']}, {first['region']}"
        )
    frame["dice"] = frame["dice"].astype(float)
    frame["hd95"] = frame["hd95"].astype(float)
    return _in_table_order(frame)


def _in_table_order(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (subset names, regions) with ordered subset and region categories, sorted by case, table
    subset order and region order."""
    frame["subset"] = pd.Categorical(frame["subset"], categories=SUBSET_NAMES, ordered=True)
    frame["region"] = pd.Categorical(frame["region"], categories=REPORT_REGIONS, ordered=True)
    return frame.sort_values(["case", "subset", "region"], kind="stable").reset_index(drop=True)


def _per_subset_table(frame: pd.DataFrame, stats: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """``stats`` (indexed by subset and region, one column per metric) as one row per subset with
    ``n_cases`` (from ``frame``) and ``<region>_<metric>`` for each region present, then ``Average``: the
    unweighted mean of the subset rows, with every case of ``frame`` counted."""
    wide = stats.unstack("region")
    regions = [r for r in REPORT_REGIONS if r in wide.columns.get_level_values("region")]
    table = pd.DataFrame(index=wide.index.astype(str))
    table["n_cases"] = frame.groupby("subset", observed=True)["case"].nunique().to_numpy()
    for region in regions:
        for metric in metrics:
            table[f"{region}_{metric}"] = wide[(metric, region)].to_numpy()
    average = table.drop(columns="n_cases").mean(axis=0)
    average["n_cases"] = frame["case"].nunique()
    table.loc[AVERAGE] = average[table.columns]
    table["n_cases"] = table["n_cases"].astype(int)
    return table.rename_axis("subset").reset_index()


def summary_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean Dice (fraction) and HD95 (mm) per subset and region, plus the average over subsets.

    One row per subset present (table order), then ``Average``: the unweighted mean of the subset rows,
    i.e. the papers' 15-subset average. Columns ``subset``, ``n_cases``, then ``<region>_dice`` and
    ``<region>_hd95`` for each region present. NaN metrics are skipped in the means.
    """
    frame = rows_frame(rows)
    means = frame.groupby(["subset", "region"], observed=True)[["dice", "hd95"]].mean()
    return _per_subset_table(frame, means, ("dice", "hd95"))


def lesionwise_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame | None:
    """The rows that carry challenge figures, as ``case, subset, region`` and those figures; None if none do."""
    picked = [r for r in rows if "lesion_dice" in r]
    if not picked:
        return None
    frame = pd.DataFrame(picked)[["case", "subset", "region", *LESION_METRICS]].copy()
    frame["subset"] = [_subset_label(v) for v in frame["subset"]]
    return _in_table_order(frame)


def lesionwise_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame | None:
    """Mean of each challenge figure per subset and region (``<region>_<figure>``), then ``Average``.

    Lesion counts are summed over cases; the average row is the mean of the subset rows, as in
    :func:`summary_table`. None when no row carries challenge figures.
    """
    frame = lesionwise_frame(rows)
    if frame is None:
        return None
    grouped = frame.groupby(["subset", "region"], observed=True)
    counts = [m for m in LESION_METRICS if m.startswith("n_")]
    stats = grouped[list(LESION_METRICS)].mean()
    stats[counts] = grouped[counts].sum()
    return _per_subset_table(frame, stats, LESION_METRICS)


def _lesionwise_markdown(table: pd.DataFrame, challenge: str) -> list[str]:
    """The lesion-wise table (subset rows as in the legacy table) and how its figures are computed."""
    rules = challenge_rules(challenge)
    lines = _subset_rows(table, "lesion_dice", "lesion_hd95")
    return [
        "",
        f"## BraTS challenge scoring: lesion-wise Dice (%) and HD95 (mm), {rules.name} rules",
        "",
        *lines,
        "",
        (
            f"Lesion-wise figures follow the BraTS 2023 challenge code: lesions are 26-connected components of "
            f"the truth (merged within {rules.dilation} dilations), each scored against the predicted "
            f"components touching it after {rules.dilation} dilations; missed lesions and unmatched predicted "
            f"components score Dice 0 and HD95 374 mm; lesions of at most {rules.min_volume:g} mm³ are left "
            "out; a case with neither lesions nor predictions scores Dice 1, HD95 0. HD95 is the challenge's "
            "(area-weighted, marching-cubes surfaces). lesionwise_summary.csv adds the challenge's legacy "
            "Dice/HD95, sensitivity, specificity (over the original grid) and summed lesion counts."
        ),
    ]


def subset_ranking(summary: pd.DataFrame, regions: Sequence[str] = ("WT", "TC", "ET")) -> pd.Series:
    """Mean Dice over ``regions`` per subset, best first (the average row left out).

    The sanity check a reader makes first: with all four modalities a model should do best, and from
    T1 alone (which shows the tumor least) worst.
    """
    rows = summary[summary["subset"] != AVERAGE].set_index("subset")
    columns = [f"{r}_dice" for r in regions if f"{r}_dice" in rows.columns]
    return rows[columns].mean(axis=1).sort_values(ascending=False, kind="stable")


def _gain_interval(gains: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean gain over cases; NaN with fewer than two cases."""
    if len(gains) < 2:
        return np.nan, np.nan
    if np.ptp(gains) == 0:  # every resample has the same mean
        return float(gains[0]), float(gains[0])
    result = stats.bootstrap(
        (gains,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def modality_gains(
    rows: Sequence[Mapping[str, Any]],
    regions: Sequence[str] = ("WT", "TC", "ET"),
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Dice gained by adding each modality, paired by case, with a bootstrap interval over cases.

    Two questions a reader of the 15-subset table asks: does a modality help at all ("any": the mean,
    over the up-to-7 evaluated subsets it can join, of Dice with it minus Dice without it), and does it
    still help once the other three are there ("last": all four minus the other three; a negative gain
    is why all four modalities may not rank first). Differences are taken per case, then averaged over
    cases, so case difficulty cancels; the interval is a percentile bootstrap of that mean over cases
    (case-level noise only: a second training seed varies more). Columns: ``modality``, ``added``
    ("any" or "last"), ``region``, ``n_cases``, ``gain``, ``ci_low``, ``ci_high`` (Dice fractions).
    Pairs whose two subsets were not both evaluated are left out; a modality without any is absent.
    """
    frame = rows_frame(rows)
    tables = {}
    for region in regions:
        tables[region] = frame[frame["region"] == region].pivot(index="case", columns="subset", values="dice")
        tables[region].columns = tables[region].columns.astype(str)
    records = []
    for k, modality in enumerate(MODALITY_LABELS[m] for m in MODALITIES):
        without = [mask for mask in SUBSETS if not mask[k]]
        pairs = {
            "any": [
                (subset_name(m), subset_name(tuple(v or i == k for i, v in enumerate(m)))) for m in without
            ],
            "last": [(subset_name(tuple(i != k for i in range(len(MODALITIES)))), SUBSET_NAMES[-1])],
        }
        for region, dice in tables.items():
            for added, subset_pairs in pairs.items():
                present = [(a, b) for a, b in subset_pairs if a in dice.columns and b in dice.columns]
                if not present:
                    continue
                per_case = pd.concat([dice[b] - dice[a] for a, b in present], axis=1).mean(axis=1).dropna()
                gains = per_case.to_numpy(dtype=float)
                if not len(gains):
                    continue
                low, high = _gain_interval(gains, confidence, n_resamples, seed)
                records.append(
                    {
                        "modality": modality,
                        "added": added,
                        "region": region,
                        "n_cases": len(gains),
                        "gain": float(gains.mean()),
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
    return pd.DataFrame.from_records(
        records, columns=["modality", "added", "region", "n_cases", "gain", "ci_low", "ci_high"]
    )


def load_published(dataset: str | None = None) -> pd.DataFrame:
    """Published 15-subset Dice averages (%) from ``resources/published.csv``, optionally one dataset's."""
    text = resources.files("smml_lightning").joinpath("resources/published.csv").read_text()
    table = pd.read_csv(io.StringIO(text))
    return table if dataset is None else table[table["dataset"] == dataset].reset_index(drop=True)


def _fmt(value: float, scale: float = 1.0) -> str:
    return "–" if pd.isna(value) else f"{value * scale:.1f}"


def _subset_rows(table: pd.DataFrame, dice: str, hd95: str) -> list[str]:
    """Markdown rows of a subset table (one row per subset in table order, then the average): the
    modality marks, then ``<region>_<dice>`` (as %) and ``<region>_<hd95>`` (mm) per region present."""
    regions = [r for r in REPORT_REGIONS if f"{r}_{dice}" in table.columns]
    by_subset = table.set_index("subset")
    head = ["#", *(MODALITY_LABELS[m] for m in MODALITIES)]
    head += [f"Dice {r}" for r in regions] + [f"HD95 {r}" for r in regions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (name, mask) in enumerate(zip(SUBSET_NAMES, SUBSETS), start=1):
        row = by_subset.loc[name] if name in by_subset.index else None
        cells = [str(i), *("●" if on else "○" for on in mask)]
        cells += [_fmt(np.nan if row is None else row[f"{r}_{dice}"], 100) for r in regions]
        cells += [_fmt(np.nan if row is None else row[f"{r}_{hd95}"]) for r in regions]
        lines.append("| " + " | ".join(cells) + " |")
    avg = by_subset.loc[AVERAGE]
    cells = [f"**{AVERAGE}**", "", "", "", ""]
    cells += [f"**{_fmt(avg[f'{r}_{dice}'], 100)}**" for r in regions]
    cells += [f"**{_fmt(avg[f'{r}_{hd95}'])}**" for r in regions]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def _markdown(
    summary: pd.DataFrame,
    method_name: str,
    n_cases: int,
    dataset_layout: str | None,
    compare: bool,
    et_min_voxels: int,
    settings: Mapping[str, Any] | None,
    gains: pd.DataFrame,
    lesion_table: pd.DataFrame | None = None,
    challenge: str = "gli",
    original_grid: bool = False,
) -> str:
    by_subset = summary.set_index("subset")
    avg = by_subset.loc[AVERAGE]
    lines = _subset_rows(summary, "dice", "hd95")

    n_subsets = len(by_subset) - 1
    ranking = subset_ranking(summary)
    all_four = SUBSET_NAMES[-1]
    rank_note = (
        f"Mean Dice over WT, TC and ET: best {ranking.index[0]} ({_fmt(ranking.iloc[0], 100)}), "
        f"worst {ranking.index[-1]} ({_fmt(ranking.iloc[-1], 100)})"
    )
    if all_four in ranking.index and n_subsets > 1:
        rank_note += f"; all four modalities rank {list(ranking.index).index(all_four) + 1} of {n_subsets}"
    where = f" on {dataset_layout}" if dataset_layout else ""
    sw = ", ".join(f"{k}={v}" for k, v in (settings or {}).items()) or "not recorded"
    parts = [
        f"# {method_name}: Dice (%) and HD95 (mm) per available-modality subset",
        "",
        f"{n_cases} cases{where}; {n_subsets} of 15 subsets evaluated (● available, ○ missing).",
        "",
        *lines,
        "",
        rank_note + ".",
        *([] if lesion_table is None else _lesionwise_markdown(lesion_table, challenge)),
        *_gains_markdown(gains),
        "",
        "## How these figures were computed",
        "",
        "- Dice per case on the argmax labels, regions WT = NCR+ED+ET, TC = NCR+ET, ET; "
        "an empty prediction against an empty truth scores 1. Each cell is the mean over cases; "
        "the average row is the unweighted mean of the subset rows.",
        "- HD95 in mm (voxel spacing from the case's header; MONAI, the larger of the two directed 95th "
        "percentiles); empty/empty gives 0, exactly one empty gives the diagonal of the "
        + ("case's original, uncropped grid" if original_grid else "evaluated grid")
        + " in mm (373.1 mm for a full 240x240x155 grid at 1 mm). NaN values are skipped in the means.",
        f"- ET_post: a predicted ET of fewer than {et_min_voxels} voxels is relabelled NCR, which empties "
        'ET and leaves TC and WT unchanged (the community\'s "enhancing_postpro").',
        f"- Whole-case sliding-window inference: {sw}.",
    ]
    if compare:
        published = load_published(dataset_layout)
        parts += ["", "## Published 15-subset averages (Dice %)", ""]
        if published.empty:
            parts.append(f"No published figures for {dataset_layout} in resources/published.csv.")
        else:
            parts += ["| Method | Dataset | WT | TC | ET | Source |", "|---|---|---|---|---|---|"]
            for rec in published.itertuples(index=False):
                dice = " | ".join(f"{v:.1f}" for v in (rec.wt, rec.tc, rec.et))
                parts.append(f"| {rec.method} | {rec.dataset} | {dice} | {rec.source} |")
            ours = [_fmt(avg.get(f"{r}_dice", np.nan), 100) for r in ("WT", "TC", "ET")]
            parts.append(
                f"| **{method_name}** (this run) | {dataset_layout or '–'} | {' | '.join(ours)} "
                "| this report |"
            )
            parts += [
                "",
                "Published figures are means over the papers' own splits; they are indicative, "
                "not a paired comparison with this run.",
            ]
    return "\n".join(parts) + "\n"


def _gains_markdown(gains: pd.DataFrame) -> list[str]:
    """The modality-gain table: one row per modality, "any" then "last" columns per region."""
    if gains.empty:
        return []
    cells = gains.set_index(["modality", "added", "region"])
    columns = [(added, region) for added in ("any", "last") for region in dict.fromkeys(gains["region"])]
    head = [
        "added modality",
        *(f"{r} {'to any subset' if a == 'any' else 'to the other three'}" for a, r in columns),
    ]
    lines = [
        "",
        "## What each modality adds",
        "",
        "Dice points with the modality minus without it, paired by case, mean over cases [95% bootstrap "
        "interval over cases]. *To any subset*: averaged over the subsets it can join; *to the other "
        "three*: all four against the other three (below zero, all four modalities cannot rank first). "
        "The interval covers case-to-case variation only (a retrained model varies more) and is too narrow "
        "with few cases (a percentile bootstrap under about 20).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for modality in dict.fromkeys(gains["modality"]):
        row = [modality]
        for key in columns:
            if (modality, *key) not in cells.index:
                row.append("–")
                continue
            gain, low, high = cells.loc[(modality, *key), ["gain", "ci_low", "ci_high"]]
            interval = "" if pd.isna(low) else f" [{low * 100:+.1f}, {high * 100:+.1f}]"
            row.append(f"{gain * 100:+.1f}{interval}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _heatmap_png(summary: pd.DataFrame, method_name: str) -> bytes:
    regions = [r for r in REPORT_REGIONS if f"{r}_dice" in summary.columns]
    values = summary[[f"{r}_dice" for r in regions]].to_numpy(dtype=float) * 100
    fig = Figure(figsize=(1.2 * len(regions) + 3, 0.38 * len(summary) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(regions)), regions)
    ax.set_yticks(range(len(summary)), summary["subset"].tolist())
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j,
            i,
            "–" if np.isnan(v) else f"{v:.1f}",
            ha="center",
            va="center",
            color="black" if v >= 60 else "white",
            fontsize=8,
        )
    ax.set_title(f"{method_name}: mean Dice (%)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path | str,
    method_name: str,
    dataset_layout: str | None = None,
    compare: bool = True,
    overwrite: bool = False,
    et_min_voxels: int = 500,
    settings: Mapping[str, Any] | None = None,
    challenge: str = "gli",
    original_grid: bool = False,
) -> dict[str, Path]:
    """Write per_case.csv, summary.csv, modality_gains.csv, report.md and heatmap.png into ``out_dir``.

    Returns the paths written, keyed as in :data:`FILES` (and :data:`LESIONWISE_FILES` when rows carry
    challenge figures, scored with the rules of ``challenge``). ``original_grid`` says the HD95 of one
    empty side is the original grid's diagonal (the note in the report follows it).

    ``dataset_layout`` (e.g. ``brats2018``) selects the published comparison rows; ``None`` shows all.
    ``settings`` (roi_size, overlap, mode, ...) are quoted in the report's notes as passed.
    """
    out_dir = Path(out_dir)
    lesion_frame = lesionwise_frame(rows)
    files = FILES if lesion_frame is None else {**FILES, **LESIONWISE_FILES}
    paths = {key: out_dir / name for key, name in files.items()}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"report files already exist: {existing}; pass overwrite=True to replace them")
    frame = rows_frame(rows)
    summary = summary_table(rows)
    gains = modality_gains(rows)
    lesion_table = lesionwise_table(rows)

    per_case = frame.astype({"subset": str, "region": str})
    atomic_write_text(paths["per_case"], per_case.to_csv(index=False))
    atomic_write_text(paths["summary"], summary.to_csv(index=False))
    atomic_write_text(paths["modality_gains"], gains.to_csv(index=False))
    if lesion_frame is not None and lesion_table is not None:
        lesion_rows = lesion_frame.astype({"subset": str, "region": str})
        atomic_write_text(paths["lesionwise_per_case"], lesion_rows.to_csv(index=False))
        atomic_write_text(paths["lesionwise_summary"], lesion_table.to_csv(index=False))
    markdown = _markdown(
        summary,
        method_name,
        frame["case"].nunique(),
        dataset_layout,
        compare,
        et_min_voxels,
        settings,
        gains,
        lesion_table,
        challenge,
        original_grid,
    )
    atomic_write_text(paths["report"], markdown)
    png = _heatmap_png(summary, method_name)
    atomic_write_bytes(paths["heatmap"], lambda f: f.write(png))
    return paths
