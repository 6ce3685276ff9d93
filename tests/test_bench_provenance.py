"""bench/provenance.py: bench/results/ only takes figures from a tree that is its commit's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import provenance  # noqa: E402  (bench/ is a folder of scripts, not a package)


def git(folder: Path, *cmd: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=folder, check=True,
                   capture_output=True)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A one-commit git repository laid out like this one, which provenance takes for the repository."""
    (tmp_path / "bench/results").mkdir(parents=True)
    (tmp_path / "train.py").write_text("steps = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "one")
    monkeypatch.setattr(provenance, "REPO", tmp_path)
    monkeypatch.setattr(provenance, "RESULTS", tmp_path / "bench/results")
    return tmp_path


def test_a_clean_tree_records_into_bench_results(checkout):
    out = checkout / "bench/results/x.json"
    provenance.write_report(out, {"value": 1})
    assert json.loads(out.read_text()) == {"value": 1}


def test_a_modified_tree_is_refused_before_any_work_with_one_error_line(checkout, capsys):
    (checkout / "train.py").write_text("steps = 2\n")
    out = checkout / "bench/results/x.json"
    with pytest.raises(SystemExit) as e:
        provenance.check_destination(out)
    assert e.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1 and str(out) in message and "--out" in message
    with pytest.raises(SystemExit):
        provenance.write_report(out, {"value": 1})
    assert not out.exists()


def test_a_modified_tree_may_write_elsewhere_and_says_so(checkout, tmp_path_factory):
    (checkout / "train.py").write_text("steps = 2\n")
    out = tmp_path_factory.mktemp("elsewhere") / "x.json"
    provenance.write_report(out, {"working_tree_dirty": provenance.tree_dirty()})
    assert json.loads(out.read_text()) == {"working_tree_dirty": True}


def test_untracked_files_do_not_count_as_a_modified_tree(checkout):
    (checkout / "scratch.txt").write_text("notes\n")
    provenance.check_destination(checkout / "bench/results/x.json")
