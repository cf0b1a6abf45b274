"""The README's real-data recipe runs as written: its fenced bash block under "Real BraTS data" runs in an
empty folder, with its variables (the download, the SAM checkpoint, the split, the new cases) set to a
tiny synthetic BraTS 2018 "download", a tiny random SAM and a split file written here, and options for
tiny sizes appended to its commands (later options win). A wrong path, a file the project does not ship
or a command that no longer exists fails here."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from smml_lightning.data.synthetic import synthesize
from smml_lightning.models.sam_prior import save_tiny_sam_checkpoint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
HEADING = "## Real BraTS data"
SHAPE = (32, 32, 32)
NETWORK = [
    "--model.init_args.network.init_args.base_width=4",
    "--model.init_args.network.init_args.transformer_dim=16",
    "--model.init_args.network.init_args.num_heads=2",
    "--model.init_args.refiner.init_args.width=4",
    "--data.patch_size=32",
    "--data.num_workers=0",
]
TINY = {  # appended to the commands that start so (after the README's own options, so they win)
    ".venv/bin/smml prepare": ["--min_size", "[32,32,32]", "--workers", "1"],
    ".venv/bin/smml priors": ["--model_type", "tiny", "--device", "cpu", "--epochs", "1"],
    "make train": [
        *NETWORK,
        "--data.batch_size=1",
        "--data.samples_per_volume=1",
        "--data.queue_length=2",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ],
    ".venv/bin/smml test": [
        *NETWORK,
        "--trainer.logger=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
    ],
    ".venv/bin/smml predict": [],
    ".venv/bin/smml evaluate": [],
}


def recipe() -> str:
    text = (REPO / "README.md").read_text()
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    block = re.search(r"```bash\n(.*?)```", text[text.index(HEADING) :], re.DOTALL)
    assert block, f"no bash block under {HEADING!r}"
    return block.group(1)


def commands(script: str) -> list[str]:
    """The script's lines with backslash continuations joined."""
    return script.replace("\\\n", " ").splitlines()


def tiny(line: str) -> str:
    """``line`` with the tiny sizes appended (inside ``ARGS="..."`` for ``make train``)."""
    stripped = line.strip()
    for start, extra in TINY.items():
        if stripped.startswith(start):
            if start == "make train":
                assert re.search(r'ARGS="[^"]*"', line), 'make train without ARGS="..."'
                appended = shlex.join(extra)
                line = re.sub(r'ARGS="([^"]*)"', lambda m, more=appended: f'ARGS="{m.group(1)} {more}"', line)
                # The test's folder holds no Makefile and no venv to (re)build: the repo's Makefile, as is.
                return line.replace(
                    "make train",
                    f"make -s -f {shlex.quote(str(REPO / 'Makefile'))} -o .venv/bin/smml train",
                    1,
                )
            return f"{line} {shlex.join(extra)}"
    return line


def test_readme_real_data_recipe_runs_as_written(tmp_path):
    script = recipe()
    lines = [line for line in commands(script) if line.strip() and not line.lstrip().startswith("#")]
    starts = [next((s for s in TINY if line.strip().startswith(s)), None) for line in lines]
    variables = [line.split("=", 1)[0] for line, start in zip(lines, starts) if start is None]
    assert all(re.fullmatch(r"[A-Z_]+", v) for v in variables), (
        f"README lines neither commands nor variables: {variables}"
    )
    assert [s for s in starts if s] == [s for s in TINY], "the recipe's steps changed: update TINY here"

    # The "download": BraTS 2018 cases, a split of them, new cases with modalities missing, and SAM.
    data = tmp_path / "data"
    synthesize(data / "MICCAI_BraTS_2018_Data_Training", 8, layout="brats2018", shape=SHAPE, seed=7)
    cases = sorted(p for p in (data / "MICCAI_BraTS_2018_Data_Training").glob("*/Brats18_*") if p.is_dir())
    names = [c.name for c in cases]
    split = data / "split.json"
    split.write_text(json.dumps({"train": names[:4], "val": names[4:6], "test": names[6:]}))
    new = data / "new_cases"
    for case, drop in zip(cases[6:], [("t1",), ("flair", "t2")]):
        shutil.copytree(case, new / case.name)
        for modality in drop:
            (new / case.name / f"{case.name}_{modality}.nii.gz").unlink()
    values = {
        "BRATS": data / "MICCAI_BraTS_2018_Data_Training",
        "SPLIT": split,
        "NEW": new,
        "SAM": save_tiny_sam_checkpoint(data / "sam_tiny.pth", seed=0),
    }
    assert set(variables) == set(values), f"the recipe's variables are {variables}: update this test"
    for name, value in values.items():
        script = re.sub(rf"^{name}=.*$", f"{name}={shlex.quote(str(value))}", script, flags=re.MULTILINE)
    script = "\n".join(tiny(line) for line in commands(script))

    # `.venv/bin/smml` of a checkout: this interpreter's smml_lightning.
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    shim = work / ".venv" / "bin" / "smml"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m smml_lightning "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, f"{script}\n---\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    runs = list((work / "runs").glob("brats2018/*/checkpoints/last.ckpt"))
    assert len(runs) == 1, "one run folder of brats2018 with its checkpoints"
    run = runs[0].parents[1]
    assert (run / "config.yaml").is_file()
    per_case = pd.read_csv(next(run.glob("test-*/per_case.csv")))
    assert set(per_case["case"]) == set(names[6:]) and per_case["subset"].nunique() == 15
    assert len(list((work / "predictions").glob("*.nii.gz"))) == 2, (
        "step 5 wrote one segmentation per new case"
    )
    assert list(work.rglob("scores/*")), "step 6 wrote its scores"
