"""bench/gpu_check.sh without a GPU: a dry run whose steps run the GPU benchmarks' CPU smoke variants,
so the one command to run on a GPU machine is known to work before one is available."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would measure")
def test_dry_run_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "no CUDA device" in out and "DRY RUN" in out and "nothing below is a GPU measurement" in out
    attention = json.loads((tmp_path / "attention_smoke.json").read_text())
    assert attention["smoke"] is True and attention["correctness"]["passed"] is True
    train = json.loads((tmp_path / "gpu_train_smoke.json").read_text())
    assert train["smoke"] is True and train["results"]
    for row in train["results"]:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["loss"] > 0 and row["batch_size"] * row["seq_len"] == 256
    assert (tmp_path / "logs/train_smoke.log").is_file()
    backends = json.loads((tmp_path / "attention_backends_smoke.json").read_text())
    for variant in ("causal", "documents", "window"):
        assert {"sdpa", "triton"} <= set(backends["correctness"]["variants"][variant])
        assert all(r["passed"] for r in backends["correctness"]["variants"][variant].values())
    assert all("fwd_bwd_ms" in row for row in backends["results"]), backends["results"]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["dry_run"] is True and "attention_choice" not in record  # a dry run chooses nothing
    steps = [s["step"] for s in record["steps"] if s["step"] != "setup"]  # setup: where there is no .venv yet
    assert steps == ["attention_backends_smoke", "attention_smoke", "train_smoke"]
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in summary and "| window | triton |" in summary and "## Training step" in summary
