"""The planner's predicted step time against real gloo runs on this CPU, per layout.

    python bench/plan_time.py [--out bench/results/plan_time.json] [--quick]

The step-time model (torchtrain/plan/timing.py) is checked here with rates measured on this
machine, not assumed: one torchrun launch per world size (1, 2 and 4 processes) first measures
the profile of that many processes sharing the CPU, then times the trainer on the layouts.

* **Profile**, every rank at once, each process with ``cpus // processes`` threads (one at
  least), as in the timed runs: the fp32 matmul rate on the GEMMs of the model's linear layers
  (forward and both backward products, weighted by how often a step runs them: bench/cpu_train.py's
  ``worker_matmul``), the rate of the model's attention call (forward and backward, FLOPs counted
  by the planner's counter), the memory rate of a streaming elementwise op, and the rate of gloo's all-gather, reduce-scatter and all-reduce (wire bytes
  per rank, ring convention as counters.py counts them, on :data:`MESSAGE_BYTES` messages) and of a
  ring of sends (each rank sends and receives one message), the median of :data:`REPEATS`.
* **Timed runs**: the model ``debug_30m`` (30.9M parameters) on recipes/debug.toml at sequence
  length 512, fp32, compile off, every layout with 4096 tokens per step: one process (batch 8);
  FSDP 2 (4 per rank); TP 2; PP 2 (1F1B, 8 microbatches); CP 2 (all-gather); FSDP 2 x TP 2 on 4
  processes (4 per data-parallel rank). Each rank builds the model with the trainer's
  ``build_model`` and its optimizer and runs the trainer's ``train_step`` on synthetic batches;
  after :data:`WARMUP_STEPS`, :data:`TIMED_STEPS` steps start at a barrier and a step's time is the
  slowest rank's. The median of those is the measured step time.
* **Prediction**: ``plan_layout`` of the same recipe and overrides, on a
  ``timing.measured_device`` built from that world size's profile (its matmul rate as the peak,
  its attention and memory rates, ``MEASURED_EFFICIENCY``, the measured collective rates, and no overlap of collectives with
  compute: gloo copies with the cores that compute).

The predicted / measured ratio per layout is written to the JSON file with the profile, the CPU
model and the commit. What the model leaves out shows in the ratio: Python's overhead, caches
(a rate measured on one op's working set), and the way gloo's threads and the compute share the
cores when there are more processes than cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import provenance

sys.path.insert(0, str(provenance.REPO / "tests"))
sys.path.insert(0, str(provenance.REPO / "tests/workers"))
sys.path.insert(0, str(provenance.REPO))

MODEL = "debug_30m"
SEQ_LEN = 512
BASE = f"--model.name={MODEL},--training.seq_len={SEQ_LEN},--compile.enabled=false"
# name -> overrides of recipes/debug.toml, per world size (one torchrun launch each); 4096 tokens per step.
CASES = {
    1: {"single": f"{BASE},--training.local_batch_size=8"},
    2: {"fsdp2": f"{BASE},--training.local_batch_size=4,--parallelism.dp_shard=2",
        "tp2": f"{BASE},--training.local_batch_size=8,--parallelism.tp=2,--parallelism.dp_shard=1",
        "pp2_1f1b": f"{BASE},--training.local_batch_size=8,--parallelism.pp=2,--parallelism.dp_shard=1",
        "cp2": f"{BASE},--training.local_batch_size=8,--parallelism.cp=2,--parallelism.dp_shard=1"},
    4: {"fsdp2_tp2": f"{BASE},--training.local_batch_size=4,--parallelism.dp_shard=2,--parallelism.tp=2"},
}
# --quick: the same layouts, a smaller model and batch (a smoke test of the script, not a result).
QUICK = "--model.name=debug,--training.seq_len=128,--compile.enabled=false"
RECIPE = "recipes/debug.toml"
MESSAGE_BYTES = 8 * 2**20  # about one block's fp32 parameters, or one TP activation of the timed runs
REPEATS = 5
WARMUP_STEPS = 2
TIMED_STEPS = 3
MATMUL_TOKENS = 2048  # the GEMMs' row count for the matmul rate: one microbatch of 4 x 512 tokens


def quick_cases() -> dict[int, dict[str, str]]:
    def shrink(overrides: str) -> str:
        kept = [o for o in overrides.split(",") if not o.startswith(("--model.name", "--training.seq_len",
                                                                        "--compile.enabled"))]
        return ",".join([QUICK, *kept])
    return {world: {name: shrink(o) for name, o in cases.items()} for world, cases in CASES.items()}


# ---- the worker: runs under torchrun, measures only ----

def _timed(fn, repeats: int = REPEATS) -> float:
    import torch.distributed as dist

    fn()
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def attention_rate(overrides: list[str]) -> float:
    """FLOP/s of the model's attention call (its backend, masks and shapes; forward and backward on
    :data:`MATMUL_TOKENS` tokens), its FLOPs counted by the planner's own counter."""
    import torch

    from torchtrain.config import load_config
    from torchtrain.models.attention import attention
    from torchtrain.models.shape import model_args_for
    from torchtrain.plan.counters import StepCounter

    config = load_config(provenance.REPO / RECIPE, overrides)
    args = model_args_for(config, torch.device("cpu"))
    seq = config.training.seq_len
    batch = max(1, MATMUL_TOKENS // seq)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, args.num_heads, seq, args.head_dim, generator=gen, requires_grad=True)
    k, v = (torch.randn(batch, args.num_kv_heads, seq, args.head_dim, generator=gen, requires_grad=True)
            for _ in range(2))
    documents = torch.zeros(batch, seq, dtype=torch.int32) if config.data.document_mask else None
    grad = torch.randn(batch, args.num_heads, seq, args.head_dim, generator=gen)

    def forward_backward():
        out = attention(q, k, v, backend=args.attention, causal=True, document_ids=documents,
                        window=args.sliding_window)
        out.backward(grad)

    with StepCounter({}) as counter:
        forward_backward()
    return counter.attention_flops / _timed(forward_backward)


def memory_rate() -> float:
    """Bytes per second read and written by a streaming elementwise op (``out = a + b``) on
    :data:`MESSAGE_BYTES` tensors: the rate of the ops the planner counts by their memory traffic."""
    import torch

    a, b = torch.randn(MESSAGE_BYTES // 4), torch.randn(MESSAGE_BYTES // 4)
    out = torch.empty_like(a)
    return 3 * MESSAGE_BYTES / _timed(lambda: torch.add(a, b, out=out))


def measure_profile(model: str, overrides: list[str]) -> dict:
    """This rank's matmul and attention rates and gloo's rate per collective kind, all ranks
    measuring at once."""
    import torch
    import torch.distributed as dist

    import cpu_train

    world, rank = dist.get_world_size(), dist.get_rank()
    dist.barrier()
    matmul = cpu_train.worker_matmul({"model": model, "seq_len": MATMUL_TOKENS, "batch_size": 1,
                                      "matmul_iters": REPEATS})
    attention = attention_rate(overrides)
    memory = memory_rate()
    rates = {}
    if world > 1:
        full = torch.randn(MESSAGE_BYTES // 4)
        shard = torch.randn(full.numel() // world)
        share = (world - 1) / world * MESSAGE_BYTES  # ring wire bytes of one rank, as counters.py counts them
        rates["all-gather"] = share / _timed(lambda: dist.all_gather_single(full, shard))
        rates["reduce-scatter"] = share / _timed(lambda: dist.reduce_scatter_single(shard, full))
        rates["all-reduce"] = 2 * share / _timed(lambda: dist.all_reduce(full))
        received = torch.empty_like(full)

        def ring_of_sends():
            ops = [dist.P2POp(dist.isend, full, (rank + 1) % world),
                   dist.P2POp(dist.irecv, received, (rank - 1) % world)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        rates["send"] = MESSAGE_BYTES / _timed(ring_of_sends)
    return {"matmul_flops": matmul["gflops"] * 1e9, "attention_flops": attention, "memory_bytes_per_s": memory,
            "threads": matmul["threads"], "collective_bytes_per_s": rates}


def time_case(overrides: list[str]) -> list[float]:
    """Seconds of each timed step of the trainer's train_step, the slowest rank's."""
    import torch
    import torch.distributed as dist

    from plan_memory import synthetic_batch
    from torchtrain.config import load_config
    from torchtrain.optim import build_optimizer
    from torchtrain.parallel import ParallelDims, build_mesh
    from torchtrain.parallel.cp import batch_sharder
    from torchtrain.models.shape import model_args_for
    from torchtrain.train import build_model, train_step

    cpu = torch.device("cpu")
    config = load_config(provenance.REPO / RECIPE, overrides)
    dims = ParallelDims.resolve(config.parallelism, dist.get_world_size(), config.source)
    mesh = build_mesh(dims, cpu)
    model_args = model_args_for(config, cpu)
    parts = build_model(model_args, config, mesh, dims, cpu, torch.float32)
    optimizer = build_optimizer(parts.model, config.optimizer, cpu)
    shard_for_cp = batch_sharder(mesh, config.data.document_mask)
    batches = [shard_for_cp(synthetic_batch(config.training.local_batch_size, config.training.seq_len,
                                            model_args.vocab_size, seed=mesh.dp.get_local_rank() * 100 + i))
               for i in range(config.training.grad_accum_steps)]
    seconds = []
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        dist.barrier()
        started = time.perf_counter()
        train_step(parts, optimizer, batches, config, mesh.dp_cp.get_group(), contextlib.nullcontext())
        elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= WARMUP_STEPS:
            seconds.append(elapsed.item())
    return seconds


def worker(out: str, model: str, cases: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from torchtrain.parallel import init_distributed

    init_distributed(torch.device("cpu"))
    world = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    profile = measure_profile(model, cases[0].partition(":")[2].split(","))
    profiles = [None] * world
    dist.all_gather_object(profiles, profile)
    results = {"profiles": profiles, "cases": {}}
    for case in cases:
        name, _, overrides = case.partition(":")
        results["cases"][name] = time_case(overrides.split(","))
        if dist.get_rank() == 0:
            print(f"timed {name}: {results['cases'][name]}", flush=True)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


# ---- the parent: launches, predicts, compares ----

def device_of(profiles: list[dict], world: int):
    """The measured device: the slowest rank's matmul rate (the step waits for it), the median
    collective rates (every rank takes part in each collective, so they measure the same thing)."""
    from torchtrain.plan.timing import measured_device

    rates = {kind: statistics.median(p["collective_bytes_per_s"][kind] for p in profiles)
             for kind in profiles[0]["collective_bytes_per_s"]}
    if world == 1:  # a single process sends nothing; the rates are never used
        rates = {kind: float("inf") for kind in ("all-gather", "reduce-scatter", "all-reduce", "send")}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return measured_device(f"{provenance.cpu_name()}, {world} process(es)", memory,
                           min(p["matmul_flops"] for p in profiles), min(p["attention_flops"] for p in profiles),
                           min(p["memory_bytes_per_s"] for p in profiles), rates, overlaps_collectives=False)


def predict(overrides: str, world: int, device):
    import torch

    from torchtrain.config import load_config
    from torchtrain.models.shape import model_args_for
    from torchtrain.plan.cli import planning_config
    from torchtrain.plan.fake_step import Target
    from torchtrain.plan.planner import plan_layout
    from torchtrain.plan.timing import MEASURED_EFFICIENCY

    config = planning_config(load_config(provenance.REPO / RECIPE, overrides.split(",")))
    return plan_layout(config, model_args_for(config, torch.device("cpu")), world, device, MEASURED_EFFICIENCY,
                       target=Target("cpu", torch.float32))


def main(argv: list[str] | None = None) -> None:
    from launcher import torchrun

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=provenance.REPO / "bench/results/plan_time.json")
    parser.add_argument("--quick", action="store_true", help="a smaller model: checks the script, records nothing")
    opts = parser.parse_args(argv)
    if not opts.quick:
        provenance.check_destination(opts.out)
    cases, model = (quick_cases(), "debug") if opts.quick else (CASES, MODEL)
    rows, profiles, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for world, named in sorted(cases.items()):
            out = Path(tmp) / f"times_{world}.json"
            torchrun(world, Path(__file__).resolve(), "--worker", out, model,
                     *(f"{name}:{overrides}" for name, overrides in named.items()), timeout=1800)
            measured = json.loads(out.read_text())
            device = device_of(measured["profiles"], world)
            profiles[world] = {"matmul_flops": device.peak_flops, "attention_flops": device.attention_flops,
                               "memory_bytes_per_s": device.memory_bytes_per_s,
                               "collective_bytes_per_s":
                               dict(device.collective_bytes_per_s) if world > 1 else {},
                               "threads_per_process": measured["profiles"][0]["threads"],
                               "per_rank": measured["profiles"]}
            for name, overrides in named.items():
                plan = predict(overrides, world, device)
                busiest = max(plan.roles, key=lambda r: r.time.total_s).time
                seconds = statistics.median(measured["cases"][name])
                rows.append({"case": name, "world_size": world, "overrides": overrides,
                             "measured_s": seconds, "measured_runs_s": measured["cases"][name],
                             "predicted_s": plan.step_seconds, "ratio": plan.step_seconds / seconds,
                             "work": {"flops": max(r.flops_per_step for r in plan.roles),
                                      "attention_flops": max(r.attention_flops_per_step for r in plan.roles),
                                      "memory_traffic_bytes": max(r.memory_traffic_per_step for r in plan.roles)},
                             "predicted_parts_s": {"compute": busiest.compute_s, "tp_cp_collectives": busiest.tp_s,
                                                   "fsdp": busiest.exposed_fsdp_s, "pipeline_sends": busiest.pp_s,
                                                   "bubble": busiest.bubble_s}})
                print(f"{name:>10} ({world} proc): measured {seconds:6.2f} s, predicted {plan.step_seconds:6.2f} s "
                      f"(compute {busiest.compute_s:.2f}, comm {busiest.tp_s + busiest.exposed_fsdp_s + busiest.pp_s:.2f}, "
                      f"bubble {busiest.bubble_s:.2f}), ratio {plan.step_seconds / seconds:.3f}", flush=True)
    if opts.quick:
        return
    report = {"benchmark": "plan_time", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/plan_time.py", "commit": provenance.commit(),
              "working_tree_dirty": provenance.tree_dirty(),
              "machine": {"cpu": provenance.cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "model": f"{MODEL} (recipes/debug.toml), seq_len {SEQ_LEN}, fp32, eager, CPU, gloo",
              "message_bytes": MESSAGE_BYTES, "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS,
              "seconds": time.perf_counter() - started, "profiles": profiles, "rows": rows}
    provenance.write_report(opts.out, report)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
