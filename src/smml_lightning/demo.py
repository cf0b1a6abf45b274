"""The main job on the embedded default: synthetic BraTS cases -> prepare -> SAM priors -> fit SMML ->
test on all 15 subsets -> report. Every step is resumable: a re-run skips what is finished and resumes
an interrupted fit from its last checkpoint.

No SAM checkpoint can be downloaded here, so the demo's priors come from a tiny randomly initialised
SAM image encoder (frozen) with a trained 3D prior decoder: the pipeline is the real one, the priors are
weaker than a pretrained SAM's. Pass ``--sam_checkpoint`` and ``--model_type vit_b`` to use a real one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .data.cache import is_done as done, mark_done


def demo(out: str = "runs/demo", config: str = "experiments/synthetic.yaml", cases: int = 24,
         shape: tuple[int, int, int] = (64, 64, 48), seed: int = 0, sam_checkpoint: str | None = None,
         model_type: str = "tiny", prior_epochs: int = 30, fit_args: list[str] | None = None) -> None:
    """Run the whole pipeline on synthetic data with offline logging.

    Args:
        out: everything goes under this folder (raw/, cache/, priors, fit/, report-*/).
        config: experiment config for fit and test.
        cases: number of synthetic cases (split 2/3 train, 1/6 val, 1/6 test by the datamodule's seed).
        shape: synthetic volume shape (a downsampled head; 240x240x155 is full size).
        seed: seed of the data, the split and training.
        sam_checkpoint: a real SAM/MedSAM checkpoint; default: a tiny random SAM saved under ``out``.
        model_type: SAM type of the checkpoint (tiny, vit_b, vit_l, vit_h).
        prior_epochs: training epochs of the SAM prior decoder (on a few small cases it is still
            learning TC and ET at 8-20 epochs; 30 take about a minute here).
        fit_args: extra Lightning CLI arguments for fit and test (e.g. ``--trainer.max_epochs=2``).
    """
    from .cli import find_experiment, lightning_main, training_names
    from .data.prepare import prepare
    from .data.synthetic import synthesize
    from .models.sam_prior import save_tiny_sam_checkpoint
    from .priors import run_priors

    root = Path(out)
    config_path = str(find_experiment(config))
    raw, cache = root / "raw", root / "cache"
    started = time.time()

    def step(name: str) -> None:
        print(f"\n== {name} ({time.time() - started:.0f} s)", flush=True)

    step(f"synthetic data: {cases} cases of {shape[0]}x{shape[1]}x{shape[2]} in {raw}")
    if not done(raw):
        synthesize(raw, cases, layout="brats2020", shape=tuple(shape), seed=seed)
        mark_done(raw, {"cases": cases, "shape": list(shape), "seed": seed})
    step(f"prepare -> {cache}")
    patch = _patch_size(_config(config_path))
    prepare(raw, cache, min_size=(patch,) * 3, workers=2)
    step("SAM semantic priors")
    if sam_checkpoint is None:
        sam_checkpoint = str(root / "sam_tiny_random.pth")
        if not Path(sam_checkpoint).is_file():
            save_tiny_sam_checkpoint(sam_checkpoint, seed=seed)
    data_cfg = _config(config_path).get("data", {})
    train = training_names(cache, None, data_cfg.get("val_fraction", 0.1), data_cfg.get("test_fraction", 0.2),
                           seed)
    run_priors(cache, checkpoint=sam_checkpoint, model_type=model_type, epochs=prior_epochs, train_names=train)

    common = ["--config", config_path, f"--data.cache_dir={cache}", f"--seed_everything={seed}", f"--data.seed={seed}",
              f"--trainer.default_root_dir={root / 'fit'}", f"--checkpoint.dirpath={root / 'fit' / 'checkpoints'}",
              f"--trainer.logger.init_args.save_dir={root}",
              *(fit_args or [])]
    fit_dir = root / "fit"
    if not done(fit_dir):
        step("fit SMML")
        last = fit_dir / "checkpoints" / "last.ckpt"
        resume = [f"--ckpt_path={last}"] if last.is_file() else []
        cli = lightning_main(["fit", *common, *resume])
        best = cli.trainer.checkpoint_callback.best_model_path or str(last)
        mark_done(fit_dir, {"best": best, "val_dice_mean": float(cli.trainer.checkpoint_callback.best_model_score
                                                                  or float("nan"))})
    best = json.loads((fit_dir / ".done").read_text())["best"]
    step(f"test on all 15 subsets with {best}")
    report = root / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    lightning_main(["test", *common, f"--ckpt_path={best}", f"--model.init_args.report_dir={report}"])
    step("done")
    md = report / "report.md"
    if md.is_file():
        print(md.read_text())
    print(f"report: {report}")


def _config(config_path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(config_path).read_text())


def _patch_size(cfg: dict) -> int:
    patch = cfg.get("data", {}).get("patch_size", 128)
    return int(patch if isinstance(patch, int) else max(patch))
