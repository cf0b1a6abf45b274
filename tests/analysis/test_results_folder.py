"""smml_lightning.analysis.results: a benchmark's current-result folder is replaced whole, a folder that is
not a result is never touched, and PROVENANCE.md names the commit as git does (with "dirty")."""

import subprocess

import pytest

from smml_lightning.analysis import results


def test_a_new_result_replaces_the_previous_one_whole(tmp_path):
    out = tmp_path / "results" / "quality"
    results.write_result_folder(
        out, {"quality.md": "# one\n", "extra.csv": "a\n", results.PROVENANCE: "p1\n"}
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(["quality.md", "extra.csv", results.PROVENANCE])
    results.write_result_folder(
        out, {"quality.md": "# two\n", "quality.png": b"\x89PNG", results.PROVENANCE: "p2\n"}
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(["quality.md", "quality.png", results.PROVENANCE])
    assert (out / "quality.md").read_text() == "# two\n" and (out / "quality.png").read_bytes() == b"\x89PNG"
    assert [p.name for p in out.parent.iterdir()] == ["quality"]  # no temporary folder left beside it


def test_a_folder_that_is_not_a_result_is_refused_and_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match="no PROVENANCE.md"):
        results.check_result_folder(out)
    with pytest.raises(FileExistsError, match="no PROVENANCE.md"):
        results.write_result_folder(out, {"quality.md": "x"})
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        results.check_result_folder(tmp_path / "file")
    results.check_result_folder(tmp_path / "absent")  # a new folder is fine


def test_provenance_names_command_commit_cpu_and_date(tmp_path):
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    text = results.provenance("quality", "python benchmarks/quality.py --quick", tmp_path, ("Work: runs/x",))
    assert f"- Commit: {head}\n" in text
    assert "- Command: `python benchmarks/quality.py --quick`" in text and "- Work: runs/x" in text
    assert "- Host CPU: " in text and "- Date: " in text
    (tmp_path / "a.txt").write_text("2\n")
    assert results.git_commit(tmp_path) == f"{head} dirty"


def test_the_result_folder_gets_ordinary_permissions(tmp_path):
    out = tmp_path / "speed"
    results.write_result_folder(out, {"speed.md": "x"})
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
