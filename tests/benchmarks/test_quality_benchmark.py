"""benchmarks/quality.py: its split of the seed spread against the two-way layout computed by hand, and a
quick run end to end whose tables are recomputed from the per-case reports."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smml_lightning.analysis import agreement, volumes
from smml_lightning.analysis.runs import benchmark_split, scored_cases

_SPEC = importlib.util.spec_from_file_location(
    "quality", Path(__file__).parents[2] / "benchmarks" / "quality.py"
)
quality = sys.modules["quality"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look it up
_SPEC.loader.exec_module(quality)


def rows_from(per_case: np.ndarray, method: str = "SMML", region: str = "ET") -> pd.DataFrame:
    """Per-case rows as ``test`` returns them: ``per_case[seed, case]`` is each case's mean Dice, spread
    over two subsets as value +- 0.1 (the subset mean is what the split reads)."""
    records = []
    for seed, scores in enumerate(per_case):
        for case, value in enumerate(scores):
            for subset, offset in (("T1ce", 0.1), ("FLAIR+T1ce", -0.1)):
                records.append(
                    {
                        "case": f"c{case}",
                        "subset": subset,
                        "region": region,
                        "dice": value + offset,
                        "method": method,
                        "seed": seed,
                    }
                )
    return pd.DataFrame(records)


def by_hand(x: np.ndarray) -> tuple[float, float, float]:
    """Seed std, interaction std of a run mean and the rest, with explicit sums over the cells."""
    k, n = x.shape
    grand = sum(sum(r) for r in x) / (k * n)
    seed_means = [sum(x[i]) / n for i in range(k)]
    case_means = [sum(x[i][j] for i in range(k)) / k for j in range(n)]
    ss = sum((x[i][j] - seed_means[i] - case_means[j] + grand) ** 2 for i in range(k) for j in range(n))
    ms_interaction = ss / ((k - 1) * (n - 1))
    seed_var = sum((m - sum(seed_means) / k) ** 2 for m in seed_means) / (k - 1)
    return (
        math.sqrt(seed_var),
        math.sqrt(ms_interaction / n),
        math.sqrt(max(0.0, seed_var - ms_interaction / n)),
    )


def test_spread_sources_matches_hand_computation():
    x = np.array([[0.9, 0.0, 1.0, 0.6, 0.7], [0.8, 1.0, 1.0, 0.5, 0.9], [0.7, 0.0, 0.0, 0.4, 0.8]])
    table = quality.spread_sources(rows_from(x), ["SMML"])
    row = table.iloc[0]
    assert (row["seeds"], row["cases"]) == (3, 5)
    assert (row["seed_std"], row["test_cases"], row["training"]) == pytest.approx(by_hand(x))
    assert row["seed_std"] ** 2 == pytest.approx(row["test_cases"] ** 2 + row["training"] ** 2)


def test_spread_sources_separates_pure_shift_from_pure_flips():
    cases = np.array([0.2, 0.5, 0.9, 0.7])
    shifted = np.stack([cases + d for d in (0.0, 0.05, -0.03)])  # seeds differ on every case alike
    flips = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])  # same mean, cases swap
    table = pd.concat(
        [
            quality.spread_sources(rows_from(shifted, "shift"), ["shift"]),
            quality.spread_sources(rows_from(flips, "flips"), ["flips"]),
        ]
    ).set_index("method")
    assert table.loc["shift", "test_cases"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["shift", "training"] == pytest.approx(np.std([0.0, 0.05, -0.03], ddof=1))
    assert table.loc["flips", "seed_std"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["flips", "test_cases"] == pytest.approx(
        math.sqrt((8 * 0.25 / 3) / 4)
    )  # residuals +-0.5, 3 df, 4 cases
    assert table.loc["flips", "training"] == 0.0


def test_spread_sources_skips_one_seed_and_cases_missing_a_seed():
    one_seed = rows_from(np.array([[0.5, 0.6]]), "alone")
    two = rows_from(np.array([[0.5, 0.6, 0.1], [0.7, 0.6, 0.9]]), "two")
    two = two[~((two["seed"] == 1) & (two["case"] == "c2"))]  # case c2 scored in seed 0 only
    table = quality.spread_sources(pd.concat([one_seed, two]), ["alone", "two"])
    assert list(table["method"]) == ["two"]
    assert table.iloc[0]["cases"] == 2
    assert table.iloc[0]["seed_std"] == pytest.approx(np.std([0.55, 0.65], ddof=1))


def test_busy_cores_warning_only_when_the_cores_are_taken():
    assert quality.busy_cores_warning(0.0) is None
    message = quality.busy_cores_warning(float(quality.cores()))
    assert message is not None and "OMP_NUM_THREADS=1" in message and f"{quality.cores()} cores" in message


def test_peers_cover_smml_and_every_ablation_only():
    """--peers scores the peers of every two-peer model (SMML and each ablation), not the one-network methods."""
    chosen = {m.name: m for m in quality.methods(ablations=True, fp32=True)}
    two = {name for name, m in chosen.items() if quality.two_peers(m)}
    assert two == {name for name in chosen if name.startswith("SMML")}
    assert {"SMML independent_peers", "SMML fp32"} <= two
    assert not two & {"single-branch", "U-Net", "MAML", "CMC", "CMC labeled only"}
    assert chosen["CMC labeled only"].args == ("--data.use_unlabeled=false",)
    assert quality.peer_row("SMML") == "SMML one peer"  # the row name the docs' tables use


def test_parse_writes_to_the_current_result_folder_unless_told_otherwise(tmp_path, capsys):
    work = tmp_path / "work"
    full = quality.parse(["--work", str(work), "--jobs", "2"])
    assert full.out == quality.REPO / "benchmarks" / "results" / "quality"
    assert (full.steps, full.seeds, full.cases, full.heldout, full.jobs) == (600, (0, 1, 2), 32, 40, 2)
    assert full.work == work.resolve()
    assert [m.name for m in full.methods] == ["SMML", "single-branch", "U-Net", "MAML", "CMC"]
    assert full.command == f"python benchmarks/quality.py --work {work} --jobs 2"
    quick = quality.parse(["--quick", "--work", str(work)])
    assert quick.out == work.resolve() / "results"  # a smoke run is not the benchmark's current result
    assert (quick.steps, quick.seeds, quick.cases, quick.heldout) == (3, (0,), 8, 2)
    assert quality.parse(["--quick", "--out", str(tmp_path / "mine")]).out == tmp_path / "mine"

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(SystemExit) as stop:
        quality.parse(["--quick", "--out", str(mine)])
    assert stop.value.code == 2 and "no PROVENANCE.md" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(SystemExit):
        quality.parse(["--methods", "nope"])
    assert "unknown --methods ['nope']" in capsys.readouterr().err


def test_parse_data_and_methods(tmp_path, capsys):
    """The anatomy generator at 3 mm by default (quick 4 mm); the tiny one on its own grid; SMML brings the
    single branch for its gain table, other methods come alone."""
    work = ["--work", str(tmp_path)]
    assert quality.parse(work).data == quality.DataSpec("anatomy", (64, 64, 48), 3.0)
    assert quality.parse([*work, "--quick"]).data.spacing == 4.0
    assert quality.parse([*work, "--spacing", "2"]).data.spacing == 2.0
    # ET_post's 500 mm^3 in the scored grid's voxels: 500 / 27 at 3 mm, 500 / 8 at 2 mm.
    assert quality.parse(work).data.et_min_voxels() == 19
    assert quality.parse([*work, "--spacing", "2"]).data.et_min_voxels() == 62
    assert quality.parse([*work, "--generator", "tiny"]).data == quality.DataSpec("tiny", (64, 64, 48), None)
    with pytest.raises(SystemExit):
        quality.parse([*work, "--generator", "tiny", "--spacing", "2"])
    assert "for the anatomy generator only" in capsys.readouterr().err
    assert [m.name for m in quality.parse([*work, "--methods", "CMC", "MAML"]).methods] == ["MAML", "CMC"]
    assert [m.name for m in quality.parse([*work, "--methods", "SMML"]).methods] == ["SMML", "single-branch"]
    assert not quality.parse(work).finished_only and quality.parse([*work, "--finished-only"]).finished_only


def test_work_folder_of_another_generator_is_refused(tmp_path):
    """Runs on one generator's data are never mixed with another's in one work folder."""
    from smml_lightning.data.cache import mark_done

    raw = tmp_path / "raw"
    raw.mkdir()
    mark_done(
        raw, {"first": 0, "cases": 8, "shape": [48, 48, 32], "seed": 0}
    )  # a folder of before --generator
    with pytest.raises(SystemExit, match="holds tiny data"):
        quality.synthetic_cache(tmp_path, 8, quality.DataSpec("anatomy", (48, 48, 32), 4.0), 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.slow
def test_quick_benchmark_end_to_end_and_resumes(tmp_path):
    """`quality.py --quick` over two seeds: every table is recomputed here from the per-case reports,
    and a second run reuses every fit instead of training again."""
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [
        sys.executable,
        str(Path(quality.__file__)),
        "--quick",
        "--seeds",
        "0",
        "1",
        "--methods",
        "SMML",
        "--peers",
        "--jobs",
        "2",
        "--work",
        str(work),
        "--out",
        str(out),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    first = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    runs = pd.read_csv(out / "runs.csv").set_index(["method", "seed"])
    peer = quality.peer_row("SMML")
    assert sorted(runs.index) == [
        ("SMML", 0),
        ("SMML", 1),
        (peer, 0),
        (peer, 1),
        ("single-branch", 0),
        ("single-branch", 1),
    ]
    for (method, seed), row in runs.iterrows():
        # A peer row scores SMML's weights one peer at a time (report*-peer0, -peer1), the two pooled.
        is_peer = method == peer
        run_dir = work / f"{quality.slug(method.removesuffix(quality.PEER))}-seed{seed}-steps3"
        reports = [
            p for p in sorted(run_dir.glob("report*/per_case.csv")) if ("peer" in p.parent.name) == is_peer
        ]
        assert len(reports) == (4 if is_peer else 2)  # (each peer) x (the split's test cases, held out)
        cases = pd.concat([pd.read_csv(p) for p in reports])
        assert cases["case"].nunique() == 2 + 2  # the split's test cases (8 cases: 2) and 2 held out
        assert cases["subset"].nunique() == 15
        for region in ("WT", "TC", "ET"):
            part = cases[cases["region"] == region]
            expected = part.groupby("subset")["dice"].mean().mean()  # mean over cases, then over subsets
            assert row[region] == pytest.approx(expected, abs=1e-9)
            assert 0.0 <= row[region] <= 1.0

    spread = pd.read_csv(out / "spread_sources.csv").set_index(["method", "region"])
    for method in ("SMML", "single-branch"):
        for region in ("WT", "TC", "ET"):
            s = spread.loc[(method, region)]
            assert s["seeds"] == 2 and s["cases"] == 4
            assert s["seed_std"] == pytest.approx(runs.loc[method][region].std(ddof=1), abs=1e-9)
            if s["training"] > 0:
                assert s["test_cases"] ** 2 + s["training"] ** 2 == pytest.approx(s["seed_std"] ** 2)
    provenance = (out / "PROVENANCE.md").read_text()
    assert f"- Command: `python benchmarks/quality.py {' '.join(cmd[2:])}`" in provenance
    assert "- Commit: " in provenance and "- Host CPU: " in provenance and "- Date: " in provenance
    table = (out / "quality.md").read_text()
    smml_wt = runs.loc["SMML"]["WT"]
    assert f"| SMML | {100 * smml_wt.mean():.1f} ± {100 * smml_wt.std(ddof=1):.1f} " in table

    # The analyses' run loader rebuilds a run and predicts as its test did: Dice from the voxel counts
    # of `smml analyze volumes` is the report's, case by case, on every subset.
    run_dir = work / "smml-seed0-steps3"
    names = benchmark_split(work / "cache")["test"]
    counts = volumes.measure(work / "cache", names, run_dir, list(range(15)))
    merged = counts.merge(pd.read_csv(run_dir / "report" / "per_case.csv"), on=["case", "subset", "region"])
    assert len(merged) == len(counts) == len(names) * 15 * 3
    total = merged["pred"] + merged["true"]
    from_counts = np.where(total == 0, 1.0, 2 * merged["both"] / total.clip(lower=1))
    np.testing.assert_allclose(from_counts, merged["dice"], atol=1e-9)

    # `smml analyze agreement` predicts peer by peer as `smml test` with inference_branches=[k] did
    # (the report*-peer{k} folders of --peers): its Dice of each peer against the labels is theirs.
    cases = scored_cases(work)
    assert len(cases) == 2 + 2
    rows = agreement.measure(cases, run_dir)
    for k in (0, 1):
        report = pd.concat([pd.read_csv(p) for p in run_dir.glob(f"report*-peer{k}/per_case.csv")])
        merged = rows.merge(report, on=["case", "subset", "region"])
        assert len(merged) == len(rows) == 4 * 15 * 3
        np.testing.assert_allclose(merged[f"peer{k}"], merged["dice"], atol=1e-9)
    assert rows["agreement"].between(0.0, 1.0).all()

    fit_logs = {p: p.stat().st_mtime_ns for p in work.glob("*/fit.log")}
    assert len(fit_logs) == 4
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "fitting" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/fit.log")} == fit_logs
    assert (
        pd.read_csv(out / "runs.csv")
        .drop(columns="wall_seconds")
        .equals(runs.reset_index().drop(columns="wall_seconds"))
    )


def test_warmup_keeps_its_share_of_the_run_at_the_methods_own_batch_size(tmp_path):
    """CMC's warm-up (8 of 12 config epochs) over 600 steps of 22 cases: an epoch is 22 * 4 / 2 = 44 steps
    at the configs' batch of 2, so 400 steps are round(400 / 44) = 9 epochs; at a batch of 4 from an
    overlay an epoch is 22 steps and the same share is 18 epochs. Methods without a warm-up get none."""
    cmc = next(m for m in quality.methods(ablations=False) if m.name == "CMC")
    assert quality.warmup_args(cmc, 600, 22) == ["--model.init_args.warmup_epochs=9"]
    overlay = tmp_path / "batch4.yaml"
    overlay.write_text("data:\n  batch_size: 4\n")
    wide = quality.replace(cmc, configs=(*cmc.configs, overlay))
    assert quality.warmup_args(wide, 600, 22) == ["--model.init_args.warmup_epochs=18"]
    unet = next(m for m in quality.methods(ablations=False) if m.name == "U-Net")
    assert quality.warmup_args(unet, 600, 22) == []
