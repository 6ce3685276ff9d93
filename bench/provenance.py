"""Where a benchmark's figures came from: the commit, whether tracked files were modified, the CPU.

Imported by the scripts in this folder (run as ``python bench/X.py``, so this folder is on the path).
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commit() -> str:
    return _git("rev-parse", "--short", "HEAD")


def tree_dirty() -> bool:
    """Whether tracked files differ from the commit (the figures may not be the commit's)."""
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
