"""A gallery of bad inputs and faults a user can meet in `smml synth|prepare|priors|fit|test|predict`.

Each entry runs the command in-process (``smml_lightning.cli.main``) against one tiny prepared cache and
one tiny checkpoint made once for the module, and asserts: the exit status, one line naming the file or
option and the problem, no traceback, and that no file already written changed (checksums of the whole
shared folder before and after). Ctrl-C needs real signals and lives in ``test_interrupts.py``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import quiet_cpu_trainer, tiny_network
from smml_lightning import io as smml_io
from smml_lightning.cli import main
from smml_lightning.data.prepare import LOCK, cache_lock, prepare
from smml_lightning.data.synthetic import synthesize

SHAPE = (32, 32, 32)
NET = tiny_network(32)


def _config(root: Path, cls: str, **model: object) -> dict:
    return {
        "seed_everything": 0,
        "trainer": quiet_cpu_trainer(root / "run", max_steps=1, limit_val_batches=0),
        "checkpoint": {"dirpath": str(root / "ckpt"), "save_last": True, "monitor": None},
        "model": {"class_path": cls, "init_args": {"network": NET, **model}},
        "data": {
            "cache_dir": str(root / "cache"),
            "patch_size": 32,
            "batch_size": 1,
            "samples_per_volume": 1,
            "queue_length": 2,
            "num_workers": 0,
            "use_prior": False,
            "val_fraction": 0.34,
            "test_fraction": 0.34,
        },
    }


@dataclass
class World:
    """What the module shares: raw cases, their cache, configs and a checkpoint, and broken copies."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise AttributeError(name) from None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    w = World(root)
    synthesize(root / "raw", 3, shape=SHAPE, seed=1)
    prepare(root / "raw", root / "cache", min_size=SHAPE, progress=False)
    w.files.update(
        raw=root / "raw", cache=root / "cache", single=root / "single.yaml", smml=root / "smml.yaml"
    )
    w.single.write_text(yaml.safe_dump(_config(root, "smml_lightning.lit.baselines.SingleBranch")))
    w.smml.write_text(yaml.safe_dump(_config(root, "smml_lightning.lit.smml.SMML", use_prior=False)))
    main(["fit", f"--config={w.single}"])
    w.files["ckpt"] = root / "ckpt" / "last.ckpt"
    assert w.ckpt.is_file()
    w.files["bad_yaml"] = root / "bad.yaml"
    w.bad_yaml.write_text("trainer:\n  max_epochs: 1\n model: [\n")
    w.files["list_yaml"] = root / "list.yaml"
    w.list_yaml.write_text("- fit\n- test\n")
    w.files["not_ckpt"] = root / "notes.ckpt"
    w.not_ckpt.write_text("not a checkpoint\n")
    w.files["cut_ckpt"] = root / "cut.ckpt"
    w.cut_ckpt.write_bytes(w.ckpt.read_bytes()[: w.ckpt.stat().st_size // 2])
    w.files["state_ckpt"] = root / "weights_only.ckpt"
    import torch

    torch.save({"weights": torch.zeros(2)}, w.state_ckpt)
    w.files["cut_cache"] = root / "cut_cache"
    shutil.copytree(w.cache, w.cut_cache)
    image = min(w.cut_cache.glob("*/image.npy"))
    image.write_bytes(image.read_bytes()[:4000])
    w.files["cut_image"] = image
    w.files["bad_meta_cache"] = root / "bad_meta_cache"
    shutil.copytree(w.cache, w.bad_meta_cache)
    meta = sorted(w.bad_meta_cache.glob("*/meta.json"))[1]
    meta.write_text(meta.read_text()[:40])
    w.files["bad_meta"] = meta
    w.files["empty"] = root / "empty"
    w.empty.mkdir()
    w.files["unnamed"] = root / "unnamed"
    w.unnamed.mkdir()
    shutil.copy(next(w.raw.glob("*/*_flair.nii.gz")), w.unnamed / "scan.nii.gz")
    w.files["a_file"] = root / "a_file.txt"
    w.a_file.write_text("a file\n")
    return w


def checksums(folder: Path) -> dict[str, str]:
    """Digest of every file but the cache lock, whose content is its latest holder (pid and command)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def _raw_copy(w: World, tmp: Path, cases: int = 1) -> list[Path]:
    """A private copy of ``cases`` raw cases, to damage."""
    folders = []
    for src in sorted(w.raw.iterdir())[:cases]:
        shutil.copytree(src, tmp / "raw" / src.name)
        folders.append(tmp / "raw" / src.name)
    return folders


def _file(folder: Path, suffix: str) -> Path:
    return folder / f"{folder.name}_{suffix}.nii.gz"


def _resave(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


# --- entries: (id, command line from (world, private tmp dir, monkeypatch), exit status, what the line says)
Entry = tuple[str, Callable[[World, Path, pytest.MonkeyPatch], list[str]], int | None, list[str]]
ENTRIES: list[Entry] = []


def entry(name: str, status: int | None, *expected: str):
    def register(build: Callable[[World, Path, pytest.MonkeyPatch], list[str]]):
        ENTRIES.append((name, build, status, list(expected)))
        return build

    return register


def _fit(w: World, tmp: Path, *extra: str, config: Path | None = None, command: str = "fit") -> list[str]:
    """A tiny run whose outputs go to the entry's own folder."""
    return [
        command,
        f"--config={config or w.single}",
        f"--trainer.default_root_dir={tmp / 'run'}",
        f"--checkpoint.dirpath={tmp / 'ckpt'}",
        *extra,
    ]


# synth
TINY = "--shape=[16,16,16]"  # the quick generator
entry("synth zero cases", 1, "n_cases must be >= 1")(
    lambda w, t, m: ["synth", str(t / "s"), TINY, "--cases=0"]
)
entry("synth unknown layout", 1, "unknown layout", "brats1999")(
    lambda w, t, m: ["synth", str(t / "s"), TINY, "--layout=brats1999"]
)
entry("synth negative first", 1, "first >= 0")(lambda w, t, m: ["synth", str(t / "s"), TINY, "--first=-1"])
entry("synth cases not a number", 2, "cases", "abc")(
    lambda w, t, m: ["synth", str(t / "s"), TINY, "--cases=abc"]
)
entry("synth tiny shape", 1, "every side >= 8", "(4, 4, 4)")(
    lambda w, t, m: ["synth", str(t / "s"), "--cases=1", "--shape=[4,4,4]"]
)
entry("synth into a file", 1, "a file stands where a folder is needed", "a_file.txt")(
    lambda w, t, m: ["synth", str(w.a_file), "--cases=1", "--shape=[16,16,16]"]
)

# prepare: arguments and folders
entry("prepare missing root", 1, "nowhere", "is not a folder")(
    lambda w, t, m: ["prepare", str(t / "nowhere"), str(t / "out")]
)
entry("prepare empty root", 1, "empty", "no .nii/.nii.gz files found")(
    lambda w, t, m: ["prepare", str(w.empty), str(t / "out")]
)
entry("prepare unknown naming", 1, "unnamed", "no file follows a known BraTS naming", "scan.nii.gz")(
    lambda w, t, m: ["prepare", str(w.unnamed), str(t / "out")]
)
entry("prepare unknown layout", 1, "unknown layout", "brats1999")(
    lambda w, t, m: ["prepare", str(w.raw), str(t / "out"), "--layout=brats1999"]
)
entry("prepare zero workers", 1, "workers must be >= 1", "got 0")(
    lambda w, t, m: ["prepare", str(w.raw), str(t / "out"), "--workers=0"]
)
entry("prepare negative workers", 1, "workers must be >= 1", "got -3")(
    lambda w, t, m: ["prepare", str(w.raw), str(t / "out"), "--workers=-3"]
)
entry("prepare zero min_size", 1, "min_size must be three sizes >= 1", "(32, 0, 32)")(
    lambda w, t, m: ["prepare", str(w.raw), str(t / "out"), "--min_size=[32,0,32]"]
)
entry("prepare two min_size", 2, "min_size", "Expected a tuple with 3 elements", "[32, 32]")(
    lambda w, t, m: ["prepare", str(w.raw), str(t / "out"), "--min_size=[32,32]"]
)
entry("prepare into a file", 1, "a_file.txt", "is a file, not a folder")(
    lambda w, t, m: ["prepare", str(w.raw), str(w.a_file)]
)


@entry("prepare locked cache", 1, "is in use by another `smml prepare`", f"pid {os.getpid()}")
def _(w, t, m):
    lock = cache_lock(t / "out")  # as another run would hold it; released after the command
    lock.__enter__()
    _HELD.append(lock)
    return ["prepare", str(w.raw), str(t / "out"), f"--min_size={list(SHAPE)}"]


_HELD: list = []


@entry("prepare full disk", 1, "no space left on device while writing", "out")
def _(w, t, m):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    m.setattr(smml_io.os, "fsync", full)
    return ["prepare", str(w.raw), str(t / "out"), f"--min_size={list(SHAPE)}"]


@entry("prepare read-only disk", 1, "read-only file system while writing", "out")
def _(w, t, m):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    m.setattr(tempfile, "mkstemp", read_only)
    return ["prepare", str(w.raw), str(t / "out"), f"--min_size={list(SHAPE)}"]


# prepare: damaged cases (every case failing ends the run; one failing case is listed, status 1)
@entry("prepare every case truncated", 1, "no case of", "could be prepared", "_flair.nii.gz", "truncated")
def _(w, t, m):
    for folder in _raw_copy(w, t, 2):
        path = _file(folder, "flair")
        path.write_bytes(path.read_bytes()[:300])
    return ["prepare", str(t / "raw"), str(t / "out"), f"--min_size={list(SHAPE)}"]


@entry("prepare one case truncated", 1, "1 of 3 cases failed", "prepare_summary.json")
def _(w, t, m):
    folders = _raw_copy(w, t, 3)
    path = _file(folders[0], "t2")
    path.write_bytes(path.read_bytes()[:300])
    return ["prepare", str(t / "raw"), str(t / "out"), f"--min_size={list(SHAPE)}"]


def _one_bad_case(change: Callable[[Path], None]):
    def build(w, t, m):
        (folder,) = _raw_copy(w, t, 1)
        change(folder)
        return ["prepare", str(t / "raw"), str(t / "out"), f"--min_size={list(SHAPE)}"]

    return build


def _shift(folder: Path) -> None:
    path = _file(folder, "t1")
    affine = nib.load(str(path)).affine.copy()
    affine[0, 3] += 3.0
    _resave(path, affine=affine)


def _bad_labels(folder: Path) -> None:
    path = _file(folder, "seg")
    data = np.asarray(nib.load(str(path)).dataobj).copy()
    data[0, 0, 0] = 7
    _resave(path, data)


def _nan(folder: Path) -> None:
    path = _file(folder, "t1ce")
    data = nib.load(str(path)).get_fdata().astype(np.float32)
    data[5, 5, 5] = np.nan
    _resave(path, data)


def _four_d(folder: Path) -> None:
    path = _file(folder, "t2")
    data = np.asarray(nib.load(str(path)).dataobj)
    _resave(path, np.stack([data, data], axis=-1))


def _zeros(folder: Path) -> None:
    path = _file(folder, "flair")
    _resave(path, np.zeros(SHAPE, dtype=np.int16))


def _no_label(folder: Path) -> None:
    _file(folder, "seg").unlink()


def _text_as_nifti(folder: Path) -> None:
    _file(folder, "t1").write_text("this is not an image\n")


def _other_shape(folder: Path) -> None:
    path = _file(folder, "t1ce")
    _resave(path, np.ones((32, 32, 30), dtype=np.int16))


entry("prepare misregistered modality", 1, "_t1.nii.gz", "not co-registered")(_one_bad_case(_shift))
entry("prepare wrong label values", 1, "_seg.nii.gz", "label values [7]")(_one_bad_case(_bad_labels))
entry("prepare NaN voxels", 1, "_t1ce.nii.gz", "NaN or infinite voxels")(_one_bad_case(_nan))
entry("prepare 4-D volume", 1, "_t2.nii.gz", "expected a 3-D volume")(_one_bad_case(_four_d))
entry("prepare all-zero modality", 1, "_flair.nii.gz", "all zeros")(_one_bad_case(_zeros))
entry("prepare missing label", 1, "missing label (seg) file")(_one_bad_case(_no_label))
entry("prepare text as NIfTI", 1, "_t1.nii.gz", "not a NIfTI")(_one_bad_case(_text_as_nifti))
entry("prepare shape mismatch", 1, "_t1ce.nii.gz", "shape (32, 32, 30) differs")(_one_bad_case(_other_shape))


@entry("prepare duplicate case", 1, "duplicate case", "copy")
def _(w, t, m):
    (folder,) = _raw_copy(w, t, 1)
    shutil.copytree(folder, t / "raw" / "copy" / folder.name)
    return ["prepare", str(t / "raw"), str(t / "out")]


# priors
entry("priors without checkpoint", 1, "--sam_checkpoint")(lambda w, t, m: ["priors", str(w.cache)])
entry("priors missing checkpoint", 1, "nope.pth", "not found")(
    lambda w, t, m: ["priors", str(w.cache), f"--sam_checkpoint={t / 'nope.pth'}"]
)
entry("priors not a checkpoint", 1, "notes.ckpt", "not a readable SAM")(
    lambda w, t, m: ["priors", str(w.cache), f"--sam_checkpoint={w.not_ckpt}"]
)
entry("priors missing cache", 1, "nocache", "does not exist")(
    lambda w, t, m: ["priors", str(t / "nocache"), f"--sam_checkpoint={w.not_ckpt}"]
)
entry("priors missing split", 1, "nosplit.json")(
    lambda w, t, m: [
        "priors",
        str(w.cache),
        f"--sam_checkpoint={w.not_ckpt}",
        f"--split={t / 'nosplit.json'}",
    ]
)

# fit
entry("fit missing config", 1, "config", "nothere.yaml", "is neither a file nor a shipped config")(
    lambda w, t, m: ["fit", f"--config={t / 'nothere.yaml'}"]
)
entry("fit YAML syntax error", 1, "bad.yaml", "YAML syntax error at line 3")(
    lambda w, t, m: ["fit", f"--config={w.bad_yaml}"]
)
entry("fit config not a mapping", 1, "list.yaml", "must be a mapping")(
    lambda w, t, m: ["fit", f"--config={w.list_yaml}"]
)
entry("fit missing checkpoint", 1, "nope.ckpt", "does not exist")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={t / 'nope.ckpt'}")
)
entry("fit not a checkpoint", 1, "notes.ckpt", "is not a checkpoint")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.not_ckpt}")
)
entry("fit truncated checkpoint", 1, "cut.ckpt", "is not a checkpoint")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.cut_ckpt}")
)
entry("fit checkpoint without weights", 1, "weights_only.ckpt", "holds no state_dict")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.state_ckpt}")
)
entry(
    "fit checkpoint of another method", 1, "last.ckpt", "holds a SingleBranch model; the config builds SMML"
)(lambda w, t, m: _fit(w, t, f"--ckpt_path={w.ckpt}", config=w.smml))
entry("fit checkpoint of other sizes", 1, "last.ckpt", "of shape", "network options")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.ckpt}", "--model.init_args.network.init_args.base_width=8")
)
entry("fit missing cache", 1, "nocache", "smml prepare")(
    lambda w, t, m: _fit(w, t, f"--data.cache_dir={t / 'nocache'}")
)
entry("fit truncated cache array", 1, "image.npy", "is truncated", "re-run `smml prepare`")(
    lambda w, t, m: _fit(w, t, f"--data.cache_dir={w.cut_cache}")
)
entry("fit corrupt case metadata", 1, "meta.json", "unreadable case metadata")(
    lambda w, t, m: _fit(w, t, f"--data.cache_dir={w.bad_meta_cache}")
)
entry("fit wrong type", 2, "data.batch_size", "abc")(lambda w, t, m: _fit(w, t, "--data.batch_size=abc"))
entry("fit zero patch size", 1, "data.patch_size must be a positive int")(
    lambda w, t, m: _fit(w, t, "--data.patch_size=0")
)
entry("fit unknown option", 2, "--data.bogus")(lambda w, t, m: _fit(w, t, "--data.bogus=1"))
entry("fit missing split file", 1, "split file", "nosplit.json", "does not exist")(
    lambda w, t, m: _fit(w, t, f"--data.split={t / 'nosplit.json'}")
)
entry("fit mask ratio out of range", 1, "data.mask_ratio", "1.5")(
    lambda w, t, m: _fit(w, t, "--data.mask_ratio=1.5")
)


@entry("fit full disk at the checkpoint", 1, "no space left on device while writing", "ckpt/")
def _(w, t, m):
    real = os.fsync

    def full(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".ckpt." in name and name.endswith(".tmp"):  # the checkpoint's temporary file, nothing else
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    m.setattr(smml_io.os, "fsync", full)
    return _fit(w, t)


# test and predict
entry("test empty test split", 1, "test split", "is empty", "data.test_fraction")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.ckpt}", "--data.test_fraction=0", command="test")
)
entry("test not a checkpoint", 1, "notes.ckpt", "is not a checkpoint")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.not_ckpt}", command="test")
)
entry("test truncated cache array", 1, "is truncated", "re-run `smml prepare`")(
    lambda w, t, m: _fit(w, t, f"--ckpt_path={w.ckpt}", f"--data.cache_dir={w.cut_cache}", command="test")
)
entry("predict missing input folder", 1, "noinput", "is not a folder")(
    lambda w, t, m: _fit(
        w,
        t,
        f"--ckpt_path={w.ckpt}",
        f"--data.predict_root={t / 'noinput'}",
        f"--data.predict_dir={t / 'pcache'}",
        f"--prediction.output_dir={t / 'pred'}",
        command="predict",
    )
)
entry("predict not a checkpoint", 1, "notes.ckpt", "is not a checkpoint")(
    lambda w, t, m: _fit(
        w, t, f"--ckpt_path={w.not_ckpt}", f"--prediction.output_dir={t / 'pred'}", command="predict"
    )
)


def test_the_gallery_is_large():
    assert len({name for name, *_ in ENTRIES}) == len(ENTRIES) >= 40
    assert {"synth", "prepare", "priors", "fit", "test", "predict"} <= {
        name.split()[0] for name, *_ in ENTRIES
    }


@pytest.mark.parametrize("name, build, status, expected", ENTRIES, ids=[e[0] for e in ENTRIES])
def test_bad_input(world, tmp_path, monkeypatch, capsys, name, build, status, expected):
    monkeypatch.chdir(tmp_path)  # anything written to the working folder stays private
    argv = build(world, tmp_path, monkeypatch)
    before = checksums(world.root)
    try:
        with pytest.raises(SystemExit) as info:
            main(argv)
    finally:
        monkeypatch.undo()
        while _HELD:
            _HELD.pop().__exit__(None, None, None)
    captured = capsys.readouterr()
    code = info.value.code
    message = code if isinstance(code, str) else ""
    got = 1 if isinstance(code, str) else code
    # the argument parser's errors go on over indented lines ('error: Parser key "x":\n  Expected ...')
    text = re.sub(r"\n[ \t]+(?=\S)", " ", message + "\n" + captured.err)
    assert got == status, f"{name}: exit status {got}, expected {status}\n{text[-2000:]}"
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if all(part in line for part in expected)]
    assert lines, f"{name}: no line says all of {expected}:\n{text[-2000:]}"
    assert checksums(world.root) == before, f"{name} changed files written before it"
    assert not list(tmp_path.rglob(".*.tmp*")), "a temporary file was left behind"


def test_a_fitting_checkpoint_passes_the_checks(world, tmp_path, monkeypatch):
    """The checks before restoring let a checkpoint of the configured model through: fit resumes from it."""
    import torch

    monkeypatch.chdir(tmp_path)
    main(_fit(world, tmp_path, f"--ckpt_path={world.ckpt}", "--trainer.max_steps=2"))
    resumed = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 2  # one step in the checkpoint, one more here
