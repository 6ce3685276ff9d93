"""Where a benchmark's figures came from: the commit, whether tracked files were modified, the CPU;
and the rule that keeps ``bench/results/`` reproducible.

Imported by the scripts in this folder (run as ``python bench/X.py``, so this folder is on the path).
Every figure recorded in ``bench/results/`` must be reproducible from the commit it names, so a
benchmark refuses to write there from a tree whose tracked files differ from that commit
(:func:`check_destination`, called before any work, and again by :func:`write_report`). Elsewhere
(``--out /tmp/x.json``) it writes, and records ``working_tree_dirty``. A copy of the tree without
git (a GPU machine's) records ``commit: "unknown"`` and is not refused: the copy's commit is known
to whoever made it.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commit() -> str:
    return _git("rev-parse", "--short", "HEAD")


def tree_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the figures may not be the commit's); None
    outside a git checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status == "unknown" else bool(status)


def check_destination(out: Path) -> None:
    """Exit (status 2) with one ``error:`` line if ``out`` is in bench/results/ and the tree is not its commit's."""
    if RESULTS in Path(out).resolve().parents and tree_dirty():
        print(f"error: {out}: bench/results/ keeps only figures reproducible from their commit, and tracked "
              f"files differ from {commit()}; commit them first, or write elsewhere with --out", file=sys.stderr)
        sys.exit(2)


def write_report(out: Path, report: dict) -> None:
    check_destination(out)  # the tree may have changed while the benchmark ran
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
