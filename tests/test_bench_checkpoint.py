"""Smoke test of bench/checkpoint.py: the --quick run finishes and writes a complete report."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_writes_positive_figures(tmp_path):
    out = tmp_path / "checkpoint.json"
    folder = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "checkpoint.py"), "--quick", "--out", str(out),
                           "--folder", str(folder)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "save throughput" in proc.stdout and "async save stall" in proc.stdout
    report = json.loads(out.read_text())
    for key in ("date", "command", "commit", "machine", "results", "verdicts"):
        assert key in report
    r = report["results"]
    assert r["checkpoint_bytes"] > 0 and r["model"]["params"] > 0
    for key in ("save", "disk_write", "load_cold", "load_warm", "disk_read_cold", "disk_read_warm"):
        assert r[key]["gb_per_s"] > 0, key
        assert all(s > 0 for s in r[key]["seconds"]), key
    assert r["step"]["median_s"] > 0 and r["step"]["step_time_used_s"] > 0
    assert r["async"]["median_blocked_s"] > 0 and r["async"]["stall_fraction"] > 0
    assert all(s > 0 for s in r["async"]["wait_s"] + r["async"]["step_during_write_s"])
    assert r["save_fraction_of_disk"] > 0
    assert len(report["verdicts"]) == 2


def test_default_folder_is_cleaned(tmp_path):
    """Without --folder the temporary folder under outputs/ is removed afterwards."""
    outputs = REPO / "outputs"
    before = set(outputs.glob("bench-checkpoint-*")) if outputs.is_dir() else set()
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "checkpoint.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(outputs.glob("bench-checkpoint-*")) == before
