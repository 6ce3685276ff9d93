"""Smoke test of bench/memory.py at 256 tokens: a complete report whose figures have the expected order."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_small_run_reports_sane_activation_and_loss_memory(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--seq-len", "256", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("date", "command", "commit", "dirty", "machine", "results", "targets"):
        assert key in report
    r = report["results"]
    assert r["seq_len"] == 256
    kept = {label.split()[0]: row["bytes_per_token_per_block"] for label, row in r["activations"].items()}
    assert kept.keys() == {"none", "full", "selective", "layers"}
    d_bytes = r["block_input_bytes_per_token"]
    assert d_bytes == r["model"]["dim"] * 4
    # full keeps its input (exactly, in eager); selective keeps more, none the most; layers (L/2 blocks
    # checkpointed) the average of none and full.
    assert kept["full"] == d_bytes
    assert kept["full"] < kept["selective"] < kept["none"]
    assert abs(kept["layers"] - (kept["none"] + kept["full"]) / 2) <= 1
    loss = r["loss"]
    peaks = loss["peak_bytes"]
    # At 256 tokens the chunked loss works in one chunk (the logits are smaller than the minimum chunk),
    # so it is only compared with the plain paths, not ordered against cross_entropy_sum.
    assert 0 < peaks["body"] < peaks["chunked"] < peaks["plain F.cross_entropy"]
    assert peaks["plain cross_entropy_sum"] < peaks["plain F.cross_entropy"]
    assert loss["logits_bytes"] == 256 * r["model"]["vocab_size"] * 4
    assert set(report["targets"]) == {"full_keeps_at_most_1.25x_block_input",
                                      "chunked_loss_removes_90pct_of_logits_memory"}
    assert report["targets"]["full_keeps_at_most_1.25x_block_input"]["met"] is True
    assert all(isinstance(check["met"], bool) for check in report["targets"].values())
