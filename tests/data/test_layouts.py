import gzip
import shutil

import pytest

from smml_lightning.data.layouts import LAYOUTS, detect_layout, discover
from smml_lightning.data.modalities import MODALITIES
from smml_lightning.data.synthetic import case_name, synthesize

SHAPE = (16, 16, 12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_discover_each_layout(tmp_path, layout):
    folders = synthesize(tmp_path, 3, layout=layout, shape=SHAPE, seed=1)
    cases = discover(tmp_path)
    assert [c.name for c in cases] == sorted(case_name(layout, i) for i in range(3))
    assert detect_layout(tmp_path) == layout
    for case in cases:
        assert case.layout == layout
        assert case.convention == ("brats2023" if layout == "brats2023" else "brats2018")
        assert set(case.images) == set(MODALITIES) and case.available == (True,) * 4
        assert case.label is not None and case.label.is_file()
        assert case.label.parent in folders
    if layout == "brats2018":
        assert {f.parent.name for f in folders} <= {"HGG", "LGG"}
    if layout == "brats2023":  # t2f is FLAIR, t1c is T1ce, t1n is T1, t2w is T2
        c = cases[0]
        assert c.images["flair"].name.endswith("-t2f.nii.gz") and c.images["t1ce"].name.endswith(
            "-t1c.nii.gz"
        )
        assert c.images["t1"].name.endswith("-t1n.nii.gz") and c.images["t2"].name.endswith("-t2w.nii.gz")


def test_single_case_folder_plain_nii_and_missing_modality(tmp_path):
    folder = synthesize(tmp_path, 1, layout="brats2021", shape=SHAPE)[0]
    for gz in folder.glob("*.nii.gz"):  # decompress: .nii is accepted too
        with gzip.open(gz) as src, open(gz.with_suffix(""), "wb") as dst:
            shutil.copyfileobj(src, dst)
        gz.unlink()
    (folder / f"{folder.name}_t1.nii").unlink()
    (case,) = discover(folder)
    assert case.name == folder.name and case.images["t1"] is None
    assert case.available == (True, True, False, True)
    assert case.images["flair"].suffix == ".nii"


def test_explicit_layout_and_unknown_layout(tmp_path):
    synthesize(tmp_path, 1, layout="brats2020", shape=SHAPE)
    assert discover(tmp_path, layout="brats2020")[0].layout == "brats2020"
    with pytest.raises(ValueError, match="BraTS-GLI-00000-000-t2f.nii.gz.*BraTS20_Training_001"):
        discover(tmp_path, layout="brats2023")
    with pytest.raises(ValueError, match="unknown layout 'brats1999'"):
        discover(tmp_path, layout="brats1999")


def test_empty_and_unrecognised_folders(tmp_path):
    with pytest.raises(ValueError, match="empty folder"):
        discover(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no .nii/.nii.gz files.*notes.txt"):
        discover(tmp_path)
    (tmp_path / "scan_a.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="no file follows a known BraTS naming.*scan_a.nii.gz"):
        discover(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        discover(tmp_path / "missing")


def test_duplicate_case_names_name_both_paths(tmp_path):
    folder = synthesize(tmp_path / "HGG", 1, layout="brats2018", shape=SHAPE)[0]
    copy = tmp_path / "LGG" / folder.name
    shutil.copytree(folder, copy)
    with pytest.raises(
        ValueError,
        match=f"duplicate case '{folder.name}'.*{folder}.*{copy}|"
        f"duplicate case '{folder.name}'.*{copy}.*{folder}",
    ):
        discover(tmp_path)


def test_mixed_layouts_rejected_hidden_files_ignored_and_stray_seg_taken(tmp_path):
    folder = synthesize(tmp_path, 1, layout="brats2020", shape=SHAPE)[0]
    shutil.copy(folder / f"{folder.name}_flair.nii.gz", folder / f"._{folder.name}_flair.nii.gz")
    seg = folder / f"{folder.name}_seg.nii.gz"
    seg.rename(folder / "W39_1998.09.19_Segm.nii.gz")  # the real BraTS 2020 case 355 quirk
    (case,) = discover(tmp_path)
    assert case.label.name == "W39_1998.09.19_Segm.nii.gz"
    synthesize(tmp_path / "other", 1, layout="brats2021", shape=SHAPE)
    with pytest.raises(ValueError, match="several layouts.*brats2020.*brats2021"):
        discover(tmp_path)


def test_upper_case_suffixes_and_extensions_are_matched(tmp_path):
    folder = synthesize(tmp_path, 1, shape=(8, 8, 8), seed=0)[0]
    for path in list(folder.iterdir()):
        if path.name.endswith("_flair.nii.gz"):
            path.rename(path.with_name(path.name.replace("_flair.nii.gz", "_FLAIR.NII.GZ")))
        if path.name.endswith("_seg.nii.gz"):
            path.rename(path.with_name(path.name.replace("_seg", "_Seg")))
    (case,) = discover(tmp_path)
    assert case.images["flair"].name.endswith("_FLAIR.NII.GZ") and case.label.name.endswith("_Seg.nii.gz")
    assert all(case.available)
