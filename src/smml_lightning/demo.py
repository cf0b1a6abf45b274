"""The main job on the embedded default: synthetic BraTS cases -> prepare -> SAM priors -> fit SMML ->
test on all 15 subsets -> report. Every step is resumable: a re-run skips what is finished and resumes
an interrupted fit from its last checkpoint.

The cases come from the anatomy generator (:func:`~smml_lightning.data.synthetic.synthesize_anatomy`):
full-size 240x240x155 1 mm NIfTI files in the BraTS 2020 layout, as a real download. ``prepare`` resamples
them to a coarser ``spacing`` (training on CPU), and the test scores every case back on its native 1 mm
grid (logits resampled before the argmax, against the label read again from its source file), so the
report's Dice, HD95 and the ET post-processing's voxel count are those of the original scans.

No SAM checkpoint can be downloaded here, so the demo's priors come from a tiny randomly initialised
SAM image encoder (frozen) with a trained 3D prior decoder: the pipeline is the real one, the priors are
weaker than a pretrained SAM's. Pass ``--sam_checkpoint`` and ``--model_type vit_b`` to use a real one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .data.cache import is_done as done
from .data.cache import mark_done

SETTINGS = "demo.json"


def demo(
    out: str = "runs/demo",
    experiment: str = "synthetic",
    cases: int = 24,
    spacing: float = 3.0,
    seed: int = 0,
    sam_checkpoint: str | None = None,
    model_type: str = "tiny",
    prior_epochs: int = 30,
    fit_args: list[str] | None = None,
) -> None:
    """Run the whole pipeline on synthetic data with offline logging.

    Args:
        out: everything goes under this folder: raw/, cache/ (with the priors) and the run folder fit/
            (its config, checkpoints, W&B offline logs and test-<time>/ reports).
        experiment: experiment config for fit and test (a shipped name or a path). Not ``--config``:
            that option is the command line's own (a YAML file of this command's arguments).
        cases: number of synthetic cases (split 2/3 train, 1/6 val, 1/6 test by the datamodule's seed).
        spacing: voxel size (mm) that ``prepare`` resamples the 1 mm cases to for training; the test
            scores on the native 1 mm grid whatever this is.
        seed: seed of the data, the split and training.
        sam_checkpoint: a real SAM/MedSAM checkpoint; default: a tiny random SAM saved under ``out``.
        model_type: SAM type of the checkpoint (tiny, vit_b, vit_l, vit_h).
        prior_epochs: training epochs of the SAM prior decoder (on a few small cases it is still
            learning TC and ET at 8-20 epochs; 30 take about a minute here).
        fit_args: extra Lightning CLI arguments for fit and test (e.g. ``--trainer.max_epochs=2``).
    """
    from .cli import lightning_main, training_names
    from .data.prepare import prepare, target_spacing
    from .data.synthetic import synthesize_anatomy
    from .experiments import load, resolve
    from .models.sam_prior import save_tiny_sam_checkpoint
    from .priors import run_priors

    root = Path(out)
    resolve(experiment)  # an unknown name fails here, before any work
    target_spacing(spacing)  # so does a spacing that is not a positive number
    settings = load(experiment)
    claim_folder(
        root,
        {
            "experiment": experiment,
            "cases": cases,
            "spacing": spacing,
            "seed": seed,
            "sam_checkpoint": sam_checkpoint,
            "model_type": model_type,
            "prior_epochs": prior_epochs,
            "fit_args": list(fit_args or []),
        },
    )
    raw, cache = root / "raw", root / "cache"
    started = time.time()

    def step(name: str) -> None:
        print(f"\n== {name} ({time.time() - started:.0f} s)", flush=True)

    step(f"synthetic data: {cases} anatomy cases of 240x240x155 at 1 mm in {raw}")
    if not done(raw):
        synthesize_anatomy(raw, cases, layout="brats2020", seed=seed, workers=2, overwrite=True)
        mark_done(raw, {"cases": cases, "generator": "anatomy", "seed": seed})
    step(f"prepare at {spacing:g} mm -> {cache}")
    patch = _patch_size(settings)
    prepare(raw, cache, min_size=(patch,) * 3, workers=2, spacing=spacing)
    step("SAM semantic priors")
    if sam_checkpoint is None:
        sam_checkpoint = str(root / "sam_tiny_random.pth")
        if not Path(sam_checkpoint).is_file():
            save_tiny_sam_checkpoint(sam_checkpoint, seed=seed)
    data_cfg = settings.get("data", {})
    train = training_names(
        cache, None, data_cfg.get("val_fraction", 0.1), data_cfg.get("test_fraction", 0.2), seed
    )
    run_priors(
        cache, checkpoint=sam_checkpoint, model_type=model_type, epochs=prior_epochs, train_names=train
    )

    fit_dir = root / "fit"
    common = [
        "--config",
        experiment,
        f"--data.cache_dir={cache}",
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--trainer.default_root_dir={fit_dir}",
        *(fit_args or []),
    ]
    if not done(fit_dir):
        step("fit SMML")
        last = fit_dir / "checkpoints" / "last.ckpt"
        resume = [f"--ckpt_path={last}"] if last.is_file() else []
        cli = lightning_main(["fit", *common, *resume])
        best = cli.trainer.checkpoint_callback.best_model_path or str(last)
        mark_done(
            fit_dir,
            {
                "best": best,
                "val_dice_mean": float(cli.trainer.checkpoint_callback.best_model_score or float("nan")),
            },
        )
    best = json.loads((fit_dir / ".done").read_text())["best"]
    step(f"test on all 15 subsets with {best}, scored on the native 1 mm grid")
    report = fit_dir / f"test-{time.strftime('%Y%m%d-%H%M%S')}"
    lightning_main(["test", *common, f"--ckpt_path={best}", f"--model.init_args.report_dir={report}"])
    step("done")
    md = report / "report.md"
    if md.is_file():
        print(md.read_text())
    print(f"report: {report}")


def claim_folder(root: Path, settings: dict[str, Any]) -> None:
    """Record the demo's settings in ``<out>/demo.json``, or check them against the ones recorded there.

    Every step skips what a folder already holds, so a re-run with other settings would silently reuse
    data, priors and a fit made with the old ones while printing the new ones: it stops instead, naming
    what differs.
    """
    from .io import atomic_write_text

    path = root / SETTINGS
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable demo settings ({err}); use another --out") from err
        changed = [
            f"{key} {before.get(key)!r} -> {value!r}"
            for key, value in settings.items()
            if before.get(key) != value
        ]
        if changed:
            raise ValueError(
                f"{root} holds a demo made with other settings ({'; '.join(changed)}): use another "
                "--out, or remove that folder to start again"
            )
        return
    if root.is_dir() and any(root.iterdir()):
        raise ValueError(
            f"{root} is not empty and holds no {SETTINGS}: the demo writes only into a new or "
            "empty folder (use another --out)"
        )
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def _patch_size(cfg: dict) -> int:
    patch = cfg.get("data", {}).get("patch_size", 128)
    return int(patch if isinstance(patch, int) else max(patch))
