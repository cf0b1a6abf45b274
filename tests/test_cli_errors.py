"""Configuration mistakes end with a message that names the offending key or value and what is allowed."""

import re
import subprocess
from pathlib import Path

import pytest

from conftest import prepared_cache
from smml_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return prepared_cache(tmp_path_factory.mktemp("cli_errors"), 3, seed=4, shape=SHAPE)


def base(cache: Path | str) -> list[str]:
    return [
        "fit",
        "--config",
        "synthetic",
        "--trainer.logger=false",
        f"--data.cache_dir={cache}",
        "--data.use_prior=false",
        "--model.init_args.use_prior=false",
        "--data.num_workers=0",
        "--trainer.max_epochs=0",
    ]


def exit_message(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code not in (0, None)
    captured = capsys.readouterr()
    return captured.err + (info.value.code if isinstance(info.value.code, str) else "")


def test_unknown_key(tmp_path, capsys):
    message = exit_message(base(tmp_path) + ["--data.bogus=1"], capsys)
    assert "unrecognized arguments" in message and "--data.bogus=1" in message


def test_wrong_type(tmp_path, capsys):
    message = exit_message(base(tmp_path) + ["--data.batch_size=abc"], capsys)
    assert "data.batch_size" in message and "int" in message and "abc" in message


def test_mask_ratio_out_of_range(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(base(tmp_path) + ["--data.mask_ratio=1.5"])
    message = str(info.value.code)  # what the user sees: one message, no traceback
    assert message.startswith("smml: error: ") and "Traceback" not in message
    assert re.search(r"data\.mask_ratio must be null .* or in \[0, 1\], got 1\.5", message)


def test_missing_cache_says_how_to_get_data(tmp_path, capsys):
    message = exit_message(base(tmp_path / "nope"), capsys)
    assert str(tmp_path / "nope") in message and "smml prepare" in message and "smml synth" in message
    assert "brats" in message.lower()


def test_smml_with_one_mask(cache_dir, capsys):
    message = exit_message(base(cache_dir) + ["--data.n_masks=1"], capsys)
    assert "data.n_masks=1" in message and ">= 2" in message and "share_mask" in message


def test_patch_larger_than_cropped_volume(cache_dir, capsys):
    message = exit_message(base(cache_dir) + ["--data.patch_size=64"], capsys)
    assert re.search(r"patch size \(64, 64, 64\) is larger than its cropped size", message)


def test_traceback_on_request(cache_dir, monkeypatch):
    monkeypatch.setenv("SMML_TRACEBACK", "1")
    with pytest.raises(ValueError, match="mask_ratio"):
        main(base(cache_dir) + ["--data.mask_ratio=1.5"])


def test_make_train_unknown_experiment_lists_the_available_ones():
    # -o: never (re)install the venv from this test, even when setup.cfg is newer than it.
    result = subprocess.run(
        ["make", "-s", "-o", ".venv/bin/smml", "train", "EXP=nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # smml imports torch: slow on a busy host
    assert result.returncode != 0
    assert "'nope'" in result.stderr and "synthetic_maml" in result.stderr and "brats2018" in result.stderr
