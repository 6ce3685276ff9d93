"""Measure the real peak memory of one training step per layout, for the planner's accuracy check.

Run as ``torchrun --nproc_per_node=N tests/workers/plan_memory.py OUT.json CASE...``, where each
CASE is ``name:--section.key=value,--section.key=value`` (overrides of recipes/debug.toml). For each
case, every rank builds the model with the trainer's ``build_model`` (fp32, CPU, compile off), its
optimizer, and runs the trainer's own ``train_step`` on a synthetic batch (pipeline layouts run the
real schedule) under the planner's ``MemoryTracker``. Rank 0 writes ``{case: [{"total": peak bytes,
"by_category": {...}} of rank 0, 1, ...]}`` to OUT.json. The planner's prediction for the same case is computed elsewhere
(tests/test_plan.py, bench/plan_accuracy.py): this process only measures.
"""

import contextlib
import json
import sys

import torch
import torch.distributed as dist

from torchtrain.config import load_config
from torchtrain.data import Batch
from torchtrain.optim import build_optimizer
from torchtrain.parallel import ParallelDims, build_mesh, init_distributed
from torchtrain.plan.cli import planning_config
from torchtrain.plan.fake_step import Target, model_state_tracker
from torchtrain.models.shape import model_args_for
from torchtrain.train import build_model, train_step

RECIPE = "recipes/debug.toml"


def parse_case(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    return Batch(tokens=tokens, labels=torch.roll(tokens, -1, dims=1),
                 document_ids=torch.zeros(batch_size, seq_len, dtype=torch.int32),
                 positions=torch.arange(seq_len).expand(batch_size, seq_len).contiguous())


def measure(overrides: list[str]) -> dict:
    config = planning_config(load_config(RECIPE, overrides))
    target = Target("cpu", torch.float32)
    dims = ParallelDims.resolve(config.parallelism, dist.get_world_size(), config.source)
    mesh = build_mesh(dims, torch.device("cpu"))
    model_args = model_args_for(config, torch.device(target.device_type))
    parts = build_model(model_args, config, mesh, dims, torch.device("cpu"), target.param_dtype)
    optimizer = build_optimizer(parts.model, config.optimizer, torch.device("cpu"))
    batches = [synthetic_batch(config.training.local_batch_size, config.training.seq_len, model_args.vocab_size,
                               seed=dist.get_rank() * 100 + i) for i in range(config.training.grad_accum_steps)]
    # The second step is measured: AdamW's moments then exist through the forward and backward.
    train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
    tracker = model_state_tracker(parts, optimizer)
    for buffer in pipeline_receive_buffers(parts.pipeline):
        tracker.track(buffer, "communication buffers")
    with tracker:
        train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
    return {"total": tracker.peak.total, "by_category": tracker.peak.by_category}


def pipeline_receive_buffers(pipeline):
    """The receive buffers torch's PipelineStage allocated in the first step and keeps: one per
    microbatch for the activation received from the previous stage, and one per microbatch for the
    gradient received from the next. They are memory the rank holds in every later step, but were
    created before the tracker started, so they are handed to it explicitly."""
    if pipeline is None:
        return
    for stage in pipeline.stages:
        for infos in (*stage.args_recv_info.values(), *stage.grad_recv_info.values()):
            for info in infos:
                if info.buffer is not None:
                    yield info.buffer


def main() -> None:
    out, cases = sys.argv[1], [parse_case(c) for c in sys.argv[2:]]
    init_distributed(torch.device("cpu"))
    results = {}
    for name, overrides in cases:
        peak = measure(overrides)
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        results[name] = peaks
        if dist.get_rank() == 0:
            print(f"ok {name}: {[p['total'] for p in peaks]}", flush=True)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
