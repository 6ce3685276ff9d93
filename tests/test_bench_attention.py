"""bench/attention.py on CPU (--smoke: the benchmark's code path at tiny sizes), its refusal without a
GPU. The GPU run itself is not testable here; tests/test_bench_gpu_check.py dry-runs bench/gpu_check.sh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "attention.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the fast CPU path of the op
    env.update(extra)
    return env


def test_smoke_run_writes_the_expected_json(tmp_path):
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--gqa", "--out", str(out)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("benchmark", "date", "command", "commit", "machine", "config", "flop_convention", "correctness",
                "results", "wall_s"):
        assert key in report, key
    assert report["benchmark"] == "attention" and report["smoke"] is True
    cfg = report["config"]
    assert cfg["causal"] and cfg["gqa"] and cfg["q_heads"] == 2 * cfg["kv_heads"]
    assert cfg["torchtrain_path"] == "pure-PyTorch reference"
    assert "4*B*Hq*S^2*D" in report["flop_convention"]

    check = report["correctness"]
    assert check["passed"] is True
    for backend in ("torchtrain", check["sdpa_backend"]):
        for name in ("out", "dq", "dk", "dv"):
            assert 0 <= check[backend][f"max_abs_err_{name}"] < 1e-4, (backend, name, check[backend])
    assert max(check["max_abs_diff_torchtrain_vs_sdpa"].values()) < 1e-4

    rows = {(r["backend"], r["seq_len"]): r for r in report["results"]}
    assert set(rows) == {(b, s) for b in cfg["backends"] for s in cfg["seq_lens"]}
    for (backend, seq_len), row in rows.items():
        assert row["status"] == "ok", row
        assert row["batch"] * seq_len == cfg["tokens_per_batch"]
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_tflops"] > 0
        assert row["bwd_ms"] == pytest.approx(row["fwd_bwd_ms"] - row["fwd_ms"])
        flops = 4 * row["batch"] * cfg["q_heads"] * seq_len ** 2 * cfg["head_dim"] / 2
        assert row["fwd_tflops"] == pytest.approx(flops / (row["fwd_ms"] * 1e-3) / 1e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_without_a_gpu():
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0], lines
