"""Measure the real peak memory of one training step per layout, for the planner's accuracy check.

Run as ``torchrun --nproc_per_node=N tests/workers/plan_memory.py OUT.json CASE...``, where each
CASE is ``name:--section.key=value,--section.key=value`` (overrides of recipes/debug.toml). For each
case, every rank builds the model with the trainer's ``build_model`` (fp32, CPU, compile off), its
optimizer, and runs the trainer's own ``train_step`` on synthetic batches (pipeline layouts run
the real schedule); the steps after the first are measured.

The measurement is the allocator's, not the planner's: everything from building the model on runs
under ``torch.profiler`` with ``profile_memory=True``, which receives an event from the c10 CPU
allocator for every allocation and free (address and size), including those made inside an op
(ATen's logsumexp, say) that no dispatch-level tracker sees. Their running sum is the memory
allocated; its maximum during a measured step is the peak. The planner's own ``MemoryTracker`` is run too, for
its breakdown by category and to show what it misses ("tracker"). Rank 0 writes ``{case: [{"total":
allocator peak bytes, "tracker": tracker peak bytes, "by_category": {...}} of rank 0, 1, ...]}`` to
OUT.json. The planner's prediction for the same case is computed elsewhere (tests/test_plan.py,
bench/plan_accuracy.py): this process only measures.
"""

import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from torchtrain.config import load_config
from torchtrain.data import Batch
from torchtrain.optim import build_optimizer
from torchtrain.parallel import ParallelDims, build_mesh, init_distributed
from torchtrain.parallel.cp import batch_sharder
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


MEASURED_STEP = "measured step"
MEASURED_STEPS = 3


def allocator_peak(prof: profile) -> int:
    """The most bytes the CPU allocator held during a ``MEASURED_STEP`` range of ``prof``'s trace,
    the least over the ranges.

    Each allocation event carries its address and size, each free its address. NOTE: the profiler
    records events only on the threads it profiles, and gloo's worker thread sometimes drops the last
    reference to a collective's tensor: that free is never recorded. When the allocator hands out an
    address that is still live in the count, the block there was freed unseen, and is taken off; until
    then it is counted, so one step's peak can be too high by a tensor or two (up to 8 MiB on the
    4-rank cases, in some runs). The steps are the same program on the same shapes, so the least of
    their peaks is the one least disturbed.
    """
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == MEASURED_STEP and e.get("ph") == "X"]
    changes = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                     key=lambda e: e["ts"])  # a stable sort: events of one time stay in recorded order
    live: dict[int, int] = {}  # address -> bytes
    allocated = 0
    peaks = [0] * len(steps)
    for event in changes:
        address, nbytes = event["args"]["Addr"], event["args"]["Bytes"]
        if nbytes > 0:
            allocated += nbytes - live.get(address, 0)
            live[address] = nbytes
        else:
            allocated -= live.pop(address, 0)  # blocks from before the profile started are not in the count
        for i, (start, end) in enumerate(steps):
            if start <= event["ts"] <= end:
                peaks[i] = max(peaks[i], allocated)
    return min(peaks)


def measure(overrides: list[str]) -> dict:
    gc.collect()  # the previous case's model is freed before this one's profile starts
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracked = _build_and_step(overrides)
    return {"total": allocator_peak(prof), **tracked}


def _build_and_step(overrides: list[str]) -> dict:
    config = planning_config(load_config(RECIPE, overrides))
    target = Target("cpu", torch.float32)
    dims = ParallelDims.resolve(config.parallelism, dist.get_world_size(), config.source)
    mesh = build_mesh(dims, torch.device("cpu"))
    model_args = model_args_for(config, torch.device(target.device_type))
    parts = build_model(model_args, config, mesh, dims, torch.device("cpu"), target.param_dtype)
    optimizer = build_optimizer(parts.model, config.optimizer, torch.device("cpu"))
    shard_for_cp = batch_sharder(mesh, config.data.document_mask)  # as the trainer does: each cp rank its share
    batches = [shard_for_cp(synthetic_batch(config.training.local_batch_size, config.training.seq_len,
                                            model_args.vocab_size, seed=mesh.dp.get_local_rank() * 100 + i))
               for i in range(config.training.grad_accum_steps)]
    # The first step is not measured: from the second on AdamW's moments exist through the forward and backward.
    train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
    tracker = model_state_tracker(parts, optimizer)
    for _ in range(MEASURED_STEPS):
        drain_collectives()
        with record_function(MEASURED_STEP), tracker:
            train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
    return {"tracker": tracker.peak.total, "by_category": tracker.peak.by_category}


def drain_collectives() -> None:
    """Let the first step's collectives release their tensors before the measured step starts.

    NOTE: a gloo collective's work object holds its input tensors until the last reference to it
    goes, which may be gloo's worker thread some time after ``wait()`` returned: without this, in some
    runs the first step's last reduce-scatter input (16 MiB on the FSDP cases) was still alive when
    the next step began, a race the planner cannot and should not predict.
    """
    dist.barrier()
    gc.collect()
    time.sleep(0.2)


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
            print(f"ok {name}: allocator {[p['total'] for p in peaks]}, tracker {[p['tracker'] for p in peaks]}",
                  flush=True)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
