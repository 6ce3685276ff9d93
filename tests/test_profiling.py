"""[profiling]: a torch.profiler trace of exactly the chosen steps; memory snapshots refused off CUDA."""

import json

import pytest

from test_train import run
from torchtrain.config import ConfigError


def test_trace_of_the_chosen_steps_only(tmp_path):
    run(tmp_path, "--training.steps", "4", "--training.val_every", "0", "--checkpoint.enabled", "false",
        "--profiling.trace_steps", "[2, 4]")
    traces = sorted(p.name for p in (tmp_path / "profiling").iterdir())
    assert traces == ["trace-step-00000002-rank-0.json", "trace-step-00000004-rank-0.json"]
    for name in traces:
        events = json.loads((tmp_path / "profiling" / name).read_text())["traceEvents"]
        ops = {e.get("name") for e in events}
        # A training step: the projections' matmuls, their backward and the AdamW update.
        assert {"aten::mm", "autograd::engine::evaluate_function: MmBackward0"} <= ops or "aten::addmm" in ops, ops
        assert any("Optimizer.step" in str(op) for op in ops), ops


def test_memory_snapshots_need_cuda(tmp_path):
    with pytest.raises(ConfigError, match=r"profiling.memory_snapshot_on_oom = True records the CUDA allocator, "
                                          r"but this run is on cpu"):
        run(tmp_path, "--profiling.memory_snapshot_on_oom", "true")
