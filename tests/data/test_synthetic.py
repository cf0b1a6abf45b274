import hashlib

import nibabel as nib
import numpy as np
import pytest

from smml_lightning.cli import main
from smml_lightning.data.layouts import discover
from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.synthetic import synthesize, synthesize_arrays

SHAPE = (32, 32, 24)


def _arrays(case):
    images = {m: np.asarray(nib.load(str(p)).dataobj) for m, p in case.images.items()}
    return images, np.asarray(nib.load(str(case.label)).dataobj)


def test_written_files_types_spacing_and_determinism(tmp_path):
    synthesize(tmp_path / "a", 2, layout="brats2021", shape=SHAPE, seed=4)
    synthesize(tmp_path / "b", 3, layout="brats2021", shape=SHAPE, seed=4)
    synthesize(tmp_path / "c", 1, layout="brats2021", shape=SHAPE, seed=5, spacing=(1.0, 1.0, 2.5))
    a, b, c = (discover(tmp_path / d) for d in "abc")
    for ca, cb in zip(a, b):  # same seed, same data; more cases leave earlier ones unchanged
        (ia, la), (ib, lb) = _arrays(ca), _arrays(cb)
        assert all(np.array_equal(ia[m], ib[m]) for m in MODALITIES) and np.array_equal(la, lb)
    (ic, _), (i0, _) = _arrays(c[0]), _arrays(a[0])
    assert not np.array_equal(ic["flair"], i0["flair"])
    img = nib.load(str(a[0].images["t1"]))
    assert img.get_data_dtype() == np.int16 and img.shape == SHAPE
    assert nib.load(str(a[0].label)).get_data_dtype() == np.uint8
    assert img.header.get_zooms() == pytest.approx((240 / 32,) * 3)
    assert np.abs(np.diag(img.affine)[:3]) == pytest.approx((240 / 32,) * 3)
    assert nib.load(str(c[0].images["t1"])).header.get_zooms() == pytest.approx((1.0, 1.0, 2.5))
    # Skull-stripped like BraTS: exact zeros outside the brain, the same brain in every modality.
    brain = i0["flair"] != 0
    assert 0.1 < brain.mean() < 0.5
    assert all(np.array_equal(i0[m] != 0, brain) for m in MODALITIES)
    assert set(np.unique(_arrays(a[0])[1])) <= {0, 1, 2, 4}


def test_first_continues_the_numbering_with_the_same_cases(tmp_path):
    """A held-out set made later (``first``) holds exactly the cases a longer run would have added."""
    synthesize(tmp_path / "all", 3, layout="brats2020", shape=SHAPE, seed=4)
    synthesize(tmp_path / "later", 1, layout="brats2020", shape=SHAPE, seed=4, first=2)
    (whole,), (later,) = discover(tmp_path / "all")[2:], discover(tmp_path / "later")
    assert later.name == whole.name == "BraTS20_Training_003"
    (ia, la), (ib, lb) = _arrays(whole), _arrays(later)
    assert all(np.array_equal(ia[m], ib[m]) for m in MODALITIES) and np.array_equal(la, lb)
    # The same through the command line: `smml synth ... --first 2`.
    main(
        [
            "synth",
            str(tmp_path / "cli"),
            "--cases",
            "1",
            "--first",
            "2",
            "--generator",
            "tiny",
            "--shape",
            "[32, 32, 24]",
            "--seed",
            "4",
        ]
    )
    (from_cli,) = discover(tmp_path / "cli")
    (ic, lc) = _arrays(from_cli)
    assert from_cli.name == whole.name
    assert all(np.array_equal(ia[m], ic[m]) for m in MODALITIES) and np.array_equal(la, lc)


def test_label_convention_per_layout(tmp_path):
    synthesize(tmp_path / "old", 3, layout="brats2020", shape=SHAPE, seed=0)
    synthesize(tmp_path / "new", 3, layout="brats2023", shape=SHAPE, seed=0)
    for old, new in zip(discover(tmp_path / "old"), discover(tmp_path / "new")):
        lo, ln = _arrays(old)[1], _arrays(new)[1]
        assert np.array_equal(lo == 4, ln == 3) and not (ln == 4).any() and not (lo == 3).any()


def test_tumor_structure_varies_like_hgg_and_lgg():
    kinds = []
    for seed in range(12):
        _, label, grade = synthesize_arrays(SHAPE, seed=[seed, 0])
        present = set(np.unique(label).tolist())
        assert {0, 2} <= present  # every case has edema around its tumor
        assert (grade == "LGG") == (3 not in present)
        kinds.append((1 in present, 3 in present))
    assert (True, False) in kinds and (True, True) in kinds  # LGG-like (no ET) and classic HGG both occur


def test_contrasts_follow_mri():
    """Per-modality class means ordered as in real scans (compared within a case, no constants)."""
    means = {m: {k: [] for k in ("csf_like", "wm_like", "ed", "et", "ncr")} for m in MODALITIES}
    for seed in range(6):
        images, label, _ = synthesize_arrays((48, 48, 40), seed=[seed, 1])
        brain = images["t1"] > 0
        healthy = brain & (label == 0)
        t2 = images["t2"].astype(float)
        csf = healthy & (t2 > np.percentile(t2[healthy], 95))  # CSF is what T2 shows brightest
        wm = healthy & (t2 < np.percentile(t2[healthy], 30))
        for m in MODALITIES:
            v = images[m].astype(float) / images[m][healthy].mean()
            for key, region in (
                ("csf_like", csf),
                ("wm_like", wm),
                ("ed", label == 2),
                ("et", label == 3),
                ("ncr", label == 1),
            ):
                if region.sum() > 20:
                    means[m][key].append(v[region].mean())
    avg = {m: {k: np.mean(v) for k, v in d.items()} for m, d in means.items()}
    assert (
        avg["flair"]["ed"] > 1.3 * avg["flair"]["wm_like"]
        and avg["flair"]["csf_like"] < avg["flair"]["wm_like"]
    )
    assert avg["t2"]["ed"] > avg["t2"]["wm_like"]
    assert avg["t1ce"]["et"] > 1.3 * max(avg["t1ce"]["ed"], avg["t1ce"]["wm_like"], avg["t1ce"]["ncr"])
    assert avg["t1ce"]["ncr"] < avg["t1ce"]["wm_like"]
    assert avg["t1"]["ed"] < avg["t1"]["wm_like"] and abs(avg["t1"]["ed"] / avg["t1"]["wm_like"] - 1) < 0.3


def _features(seed):
    images, label, _ = synthesize_arrays((64, 64, 48), seed=[seed, 2])
    brain = images["flair"] > 0
    cols = [images[m][brain].astype(float) for m in MODALITIES]
    return np.stack([(c - c.mean()) / c.std() for c in cols], 1), label[brain]


def _fit_gaussians(x, y):
    """Quadratic discriminant: one full-covariance Gaussian per class, with class priors."""
    return [
        (
            x[y == c].mean(0),
            np.cov(x[y == c].T, ddof=0).reshape(x.shape[1], -1) + 1e-6 * np.eye(x.shape[1]),
            np.log((y == c).mean()),
        )
        for c in range(4)
    ]


def _predict(model, x):
    scores = [
        lp
        - 0.5 * np.linalg.slogdet(cov)[1]
        - 0.5 * np.einsum("ni,ij,nj->n", x - mu, np.linalg.inv(cov), x - mu)
        for mu, cov, lp in model
    ]
    return np.argmax(scores, 0)


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_missing_modalities_matter_for_an_independent_voxel_classifier():
    train = [_features(s) for s in (0, 1, 2)]
    x_train, y_train = np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])
    tests = [t for t in (_features(s) for s in (10, 11, 12, 13)) if (t[1] == 3).sum() > 50]
    assert len(tests) >= 2
    columns = {"all": [0, 1, 2, 3], "t1": [2], "flair+t2": [0, 3], "flair+t1ce+t2": [0, 1, 3]}
    wt, et = {}, {}
    for name, cols in columns.items():
        model = _fit_gaussians(x_train[:, cols], y_train)
        preds = [(_predict(model, x[:, cols]), y) for x, y in tests]
        wt[name] = np.mean([_dice(p > 0, y > 0) for p, y in preds])
        et[name] = np.mean([_dice(p == 3, y == 3) for p, y in preds])
    assert wt["all"] > wt["t1"] + 0.3  # T1 alone barely sees the tumor
    assert et["flair+t1ce+t2"] > et["flair+t2"] + 0.3  # enhancement needs T1ce
    assert et["all"] > 0.5 and wt["all"] > 0.6  # and with everything the classes are learnable


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        synthesize(tmp_path, 1, layout="brats2030")
    with pytest.raises(ValueError, match="every side >= 8"):
        synthesize(tmp_path, 1, shape=(4, 32, 32))
    with pytest.raises(ValueError, match="first >= 0"):
        synthesize(tmp_path, 1, first=-1)


def _checksums(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", ["brats2018", "brats2023"])
def test_synth_refuses_to_overwrite_unless_asked(tmp_path, capsys, layout):
    """A second `smml synth` into the same folder names the first file it would replace, exits non-zero
    and changes nothing; `--overwrite` replaces the cases and leaves unrelated files alone."""
    out = tmp_path / "raw"
    args = [
        "synth",
        str(out),
        "--cases",
        "2",
        "--layout",
        layout,
        "--generator",
        "tiny",
        "--shape",
        "[16, 16, 12]",
    ]
    main(args)
    (out / "notes.txt").write_text("mine")
    before = _checksums(out)
    # A case written with another seed at the first index: the folder (and 2018's grade folder) may differ.
    with pytest.raises(SystemExit) as stop:
        main([*args, "--seed", "9"])
    message = str(stop.value.code)
    assert stop.value.code != 0 and "already exists" in message and "--overwrite" in message
    first_line = message.splitlines()[0]
    assert any(str(p) in first_line for p in before)
    assert _checksums(out) == before
    # A later run that would write only cases after the existing ones is fine.
    main([*args[:3], "1", *args[4:], "--first", "2"])
    main([*args, "--seed", "9", "--overwrite", "true"])
    after = _checksums(out)
    assert after[out / "notes.txt"] == before[out / "notes.txt"]
    assert any(after.get(p) != h for p, h in before.items())
