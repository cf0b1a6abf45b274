"""Reliability of training runs on a tiny synthetic cache: exact resumption (at epoch boundaries and
mid-epoch), SIGTERM and SIGKILL, non-finite losses, determinism, and prediction inputs without any
modality."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import prepared_cache, quiet_cpu_trainer, tiny_network
from smml_lightning.cli import lightning_main
from smml_lightning.data.datamodule import BratsDataModule
from smml_lightning.data.prepare import prepare
from smml_lightning.data.synthetic import synthesize
from smml_lightning.lit.base import NonFiniteLossError
from smml_lightning.lit.smml import SMML

SHAPE = (32, 32, 32)
PATCH = 32
STEPS_PER_EPOCH = 3  # 5 training cases x 1 patch in batches of 2


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return prepared_cache(tmp_path_factory.mktemp("reliability"), 6, seed=5, shape=SHAPE)


def write_config(path: Path, cache: Path, out: Path, max_epochs: int = 2, **trainer: object) -> Path:
    """A tiny SMML fit (no priors, fp32, no logger) whose checkpoints go to ``out/ckpt``."""
    config = {
        "seed_everything": 0,
        "trainer": quiet_cpu_trainer(out, max_epochs=max_epochs, log_every_n_steps=1, **trainer),
        "checkpoint": {"dirpath": str(out / "ckpt"), "save_last": True},
        "model": {
            "class_path": "smml_lightning.lit.smml.SMML",
            "init_args": {
                "network": tiny_network(PATCH),
                "use_prior": False,
                "warmup_epochs": 1,
                "lr": 1e-3,
                "val_subsets": ["all"],
                "compare_published": False,
            },
        },
        "data": {
            "cache_dir": str(cache),
            "patch_size": PATCH,
            "batch_size": 2,
            "samples_per_volume": 1,
            "queue_length": 8,
            "num_workers": 0,
            "val_fraction": 0.17,
            "test_fraction": 0.0,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"parameter {key} differs")


def test_resume_from_epoch_end_gives_the_uninterrupted_weights(cache_dir, tmp_path):
    from lightning.pytorch.callbacks import Callback

    class Stop(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    full = write_config(tmp_path / "full.yaml", cache_dir, tmp_path / "full")
    lightning_main(["fit", f"--config={full}"])
    reference = checkpoint(tmp_path / "full" / "ckpt" / "last.ckpt")
    assert reference["global_step"] == 2 * STEPS_PER_EPOCH

    part = write_config(tmp_path / "part.yaml", cache_dir, tmp_path / "part")
    cli = lightning_main([f"--config={part}"], run=False)
    cli.trainer.callbacks.append(Stop())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    stopped = checkpoint(tmp_path / "part" / "ckpt" / "last.ckpt")
    assert stopped["global_step"] == STEPS_PER_EPOCH

    lightning_main(["fit", f"--config={part}", f"--ckpt_path={tmp_path / 'part' / 'ckpt' / 'last.ckpt'}"])
    resumed = checkpoint(tmp_path / "part" / "ckpt" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"]
    assert_same_weights(resumed["state_dict"], reference["state_dict"], atol=1e-6)


def _epoch_loader(cache: Path, workers: int):
    torch.manual_seed(3)
    dm = BratsDataModule(
        cache_dir=str(cache),
        patch_size=16,
        batch_size=2,
        samples_per_volume=2,
        queue_length=3,
        num_workers=workers,
        val_fraction=0,
        test_fraction=0,
    )
    dm.setup("fit")
    return dm.train_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_replays_from_a_mid_epoch_loader_state(cache_dir, workers):
    """The loader state of a checkpoint written after batch k gives the epoch's remaining batches exactly;
    queue_length 3 with 2 patches per case splits cases across refills."""
    loader = _epoch_loader(cache_dir, workers)
    before = torch.get_rng_state()
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        epochs.append(list(loader))
    assert torch.equal(torch.get_rng_state(), before), "the data drew from the global generator"
    assert len(epochs[1]) == len(loader) == 6
    assert not torch.equal(epochs[0][0]["image"], epochs[1][0]["image"]), "two epochs gave the same batches"
    assert loader.state_dict() == {"epoch": 1, "batches": 6}

    resumed = _epoch_loader(cache_dir, workers)
    resumed.load_state_dict({"epoch": 1, "batches": 2})
    resumed.sampler.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == 4
    for i, (got, want) in enumerate(zip(rest, epochs[1][2:])):
        for key in ("image", "label", "masks"):
            assert torch.equal(got[key], want[key]), f"batch {i + 2}: {key} differs"
    resumed.sampler.set_epoch(2)  # the checkpoint's position is used once, for its own epoch
    assert len(list(resumed)) == 6


def test_resume_mid_epoch_gives_the_uninterrupted_weights(cache_dir, tmp_path):
    """A SIGTERM after step 2 (epoch 0, batch 2 of 3), then a crash after the periodic checkpoint of
    step 4 (epoch 1, batch 1 of 3); each resumed from its checkpoint ends where the uninterrupted run does."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    every_step = "--checkpoint.every_n_train_steps=1"
    full = write_config(tmp_path / "full.yaml", cache_dir, tmp_path / "full")
    lightning_main(["fit", f"--config={full}", every_step])
    reference = checkpoint(tmp_path / "full" / "ckpt" / "last.ckpt")
    assert reference["global_step"] == 2 * STEPS_PER_EPOCH

    class Crash(Exception):
        pass

    class Interrupt(Callback):
        def __init__(self, sigterm_after: int = -1, crash_before: int = -1) -> None:
            self.sigterm_after, self.crash_before = sigterm_after, crash_before

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.sigterm_after:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this batch

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == self.crash_before:
                raise Crash  # like SIGKILL: only the periodic checkpoint of the last step is left

    part = write_config(tmp_path / "part.yaml", cache_dir, tmp_path / "part")
    last = tmp_path / "part" / "ckpt" / "last.ckpt"

    def run(interrupt: Interrupt, ckpt: Path | None, raises: type[BaseException] | None) -> tuple[int, dict]:
        cli = lightning_main([f"--config={part}", every_step], run=False)
        cli.trainer.callbacks.append(interrupt)
        with pytest.raises(raises) if raises else contextlib.nullcontext():
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        saved = checkpoint(last)
        position = saved["BratsDataModule"]["train_stream"]  # what the next resume replays to
        assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]
        return saved["global_step"], position

    steps = [
        run(Interrupt(sigterm_after=2), None, SIGTERMException),
        run(Interrupt(crash_before=4), last, Crash),
        run(Interrupt(), last, None),
    ]
    # where each run stopped, and the training stream's position in its epoch at that point
    assert steps == [
        (2, {"epoch": 0, "batches": 2}),
        (4, {"epoch": 1, "batches": 1}),
        (6, {"epoch": 1, "batches": 3}),
    ]
    saved = checkpoint(last)
    assert_same_weights(saved["state_dict"], reference["state_dict"], atol=1e-6)
    for got, want in zip(
        saved["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()
    ):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert saved["lr_schedulers"] == reference["lr_schedulers"]


def _start_fit(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smml_lightning.cli",
            "fit",
            f"--config={config}",
            "--checkpoint.every_n_train_steps=1",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"fit exited early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < end, f"no checkpoint after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    time.sleep(0.5)  # let the first write finish


def _resume(config: Path, ckpt: Path, extra_steps: int) -> tuple[int, int]:
    """Resume from ``ckpt`` for ``extra_steps`` more steps; (global step at the start, at the end)."""
    from lightning.pytorch.callbacks import Callback

    start = checkpoint(ckpt)["global_step"]
    seen: list[int] = []

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.global_step)

    cli = lightning_main([f"--config={config}", f"--trainer.max_steps={start + extra_steps}"], run=False)
    cli.trainer.callbacks.append(FirstStep())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
    return seen[0], cli.trainer.global_step


@pytest.mark.slow  # two subprocess fits, ~80 s on a shared 2-core machine
def test_sigterm_writes_last_checkpoint_and_sigkill_resumes_from_the_periodic_one(cache_dir, tmp_path):
    procs = {}
    for name in ("term", "kill"):
        config = write_config(tmp_path / f"{name}.yaml", cache_dir, tmp_path / name, max_epochs=100)
        procs[name] = (config, _start_fit(config, tmp_path / f"{name}.log"))
    try:
        for name, (_config, proc) in procs.items():
            _wait_for(tmp_path / name / "ckpt" / "last.ckpt", proc, tmp_path / f"{name}.log")
        procs["term"][1].send_signal(signal.SIGTERM)
        procs["kill"][1].send_signal(signal.SIGKILL)
        term_code = procs["term"][1].wait(timeout=60)
        assert procs["kill"][1].wait(timeout=30) == -signal.SIGKILL
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    log = (tmp_path / "term.log").read_text()
    assert term_code == 143, log[-3000:]
    assert "SIGTERM at epoch" in log
    for name in ("term", "kill"):
        ckpt = tmp_path / name / "ckpt" / "last.ckpt"
        stopped_at = checkpoint(ckpt)["global_step"]
        assert stopped_at >= 1
        first, last = _resume(tmp_path / f"{name}.yaml", ckpt, extra_steps=2)
        assert first == stopped_at, f"{name}: resumed at step {first}, checkpoint was at {stopped_at}"
        assert last == stopped_at + 2


def _short_fit(cache: Path, out: Path, tmp_path: Path, **model: object):
    config = write_config(
        tmp_path / f"{out.name}.yaml", cache, out, max_epochs=1, limit_val_batches=0, deterministic=True
    )
    args = [f"--config={config}"] + [f"--model.init_args.{k}={v}" for k, v in model.items()]
    return lightning_main(args, run=False)


def _nan_at_second_step(module: SMML) -> None:
    original = module.training_losses

    def losses(batch):
        terms = original(batch)
        if module.global_step == 1:
            terms["seg_fused"] = terms["seg_fused"] * float("nan")
        return terms

    module.training_losses = losses


def test_nonfinite_loss_raise_names_the_term(cache_dir, tmp_path):
    cli = _short_fit(cache_dir, tmp_path / "raise", tmp_path, on_nonfinite="raise")
    _nan_at_second_step(cli.model)
    with pytest.raises(NonFiniteLossError, match=r"\['seg_fused'\].*step 1"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_nonfinite_loss_skip_leaves_weights_unchanged(cache_dir, tmp_path):
    from lightning.pytorch.callbacks import Callback

    cli = _short_fit(cache_dir, tmp_path / "skip", tmp_path, on_nonfinite="skip")
    _nan_at_second_step(cli.model)
    snapshots: dict[tuple[int, str], dict] = {}

    class Snap(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            snapshots[batch_idx, "before"] = {k: v.clone() for k, v in module.state_dict().items()}
            snapshots[batch_idx, "adam steps"] = _adam_steps(trainer)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            snapshots[batch_idx, "after"] = {k: v.clone() for k, v in module.state_dict().items()}
            snapshots[batch_idx, "adam steps after"] = _adam_steps(trainer)

    def _adam_steps(trainer):
        return [float(state["step"]) for state in trainer.optimizers[0].state.values()]

    cli.trainer.callbacks.append(Snap())
    with pytest.warns(UserWarning, match="skipping step"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == STEPS_PER_EPOCH
    assert_same_weights(snapshots[1, "before"], snapshots[1, "after"])
    # nor the optimizer's state: Adam's step counters stand still (they move on the finite steps)
    assert snapshots[1, "adam steps"] == snapshots[1, "adam steps after"] and snapshots[1, "adam steps"]
    assert snapshots[2, "adam steps after"] != snapshots[2, "adam steps"]
    for idx in (0, 2):  # the finite steps do train
        changed = [
            k
            for k in snapshots[idx, "before"]
            if not torch.equal(snapshots[idx, "before"][k], snapshots[idx, "after"][k])
        ]
        assert changed, f"step {idx} changed no weight"
    assert all(torch.isfinite(v).all() for v in cli.model.state_dict().values() if v.is_floating_point())


def test_same_seed_deterministic_fits_are_identical(cache_dir, tmp_path):
    results = []
    for name in ("a", "b"):
        config = write_config(
            tmp_path / f"{name}.yaml", cache_dir, tmp_path / name, max_epochs=1, deterministic=True
        )
        cli = lightning_main(["fit", f"--config={config}"])
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        results.append((metrics, {k: v.clone() for k, v in cli.model.state_dict().items()}))
    assert results[0][0] and results[0][0] == results[1][0]
    assert_same_weights(results[0][1], results[1][1])


def test_prediction_case_without_modalities_is_named(tmp_path):
    case = synthesize(tmp_path / "raw", 1, shape=SHAPE, seed=2)[0]
    for path in case.iterdir():
        if "seg" not in path.name:
            path.unlink()
    with pytest.raises(RuntimeError, match=f"{case.name}.*no modality file found"):
        prepare(
            case, tmp_path / "cache", min_size=SHAPE, require_all=False, require_label=False, progress=False
        )
    synthesize(tmp_path / "raw", 2, shape=SHAPE, seed=2, overwrite=True)
    for path in case.iterdir():
        if "seg" not in path.name:
            path.unlink()
    summary = prepare(
        tmp_path / "raw",
        tmp_path / "cache",
        min_size=SHAPE,
        require_all=False,
        require_label=False,
        progress=False,
    )
    assert case.name in summary.failed and "no modality" in summary.failed[case.name]
