"""Single-GPU training MFU and peak memory, with the planner's prediction beside each measurement.

    python bench/gpu_train.py                     # on one GPU: the matrix below, a few minutes
    python bench/gpu_train.py --budget-s 240      # stop starting new runs after 240 s (gpu_check.sh)
    python bench/gpu_train.py --smoke             # the same code path on the CPU, tiny (CI, no GPU)

The matrix: two model classes × three contexts × two precisions, every run with torch.compile:

* ``1b``: the Llama-3.2-1B shape (d 2048, 16 blocks, 32/8 heads, FFN 8192, vocab 128256, tied);
* ``8b``: the Llama-3-8B shape (d 4096, 32/8 heads, FFN 14336, vocab 128256) with 8 of its 32 blocks:
  a whole 8B's fp32 parameters, gradients and AdamW state (16 bytes per parameter, 128 GB) do not
  fit next to its activations on one GPU, while the per-block work, and so the MFU, is the 8B's;
* contexts 2k, 8k and 32k at 32,768 tokens per step (batch 16, 4, 1), blocks checkpointed in full
  at 32k (``activation_checkpoint.mode``: none below);
* bf16 (fp32 parameters, bf16 autocast) and float8 (``[float8]``, tensorwise) where the GPU has it.

Each run builds the model, optimizer and step exactly as the trainer does (``build_model``,
``build_optimizer``, ``train_step``) on random tokens, runs ``--warmup`` steps (compilation), resets
the allocator's peak, then times ``--steps`` steps between CUDA synchronisations. Reported: tokens/s,
model TFLOP/s and MFU (the project's convention, ``ModelArgs.flops_per_token``: 6·N + 12·L·d·s,
against the device's dense bf16 peak in ``torchtrain/metrics.py``; float8 runs are also measured
against the bf16 peak, so their MFU shows the speed-up), ``torch.cuda.max_memory_allocated``, and the
planner's predicted peak for the same configuration (``torchtrain.plan.plan_layout`` on one GPU).
Each run is a separate process (compile caches and the allocator start clean); a run that fails or
runs out of memory is recorded as such and the next one starts. JSON to ``bench/results/gpu_train.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from provenance import REPO, check_destination, commit, cpu_name, tree_dirty, write_report

sys.path.insert(0, str(REPO))

MODELS = {
    "1b": dict(dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim=8192, vocab_size=128256,
               rope_theta=500000.0, tie_embeddings=True),
    "8b": dict(dim=4096, num_layers=8, num_heads=32, num_kv_heads=8, ffn_dim=14336, vocab_size=128256,
               rope_theta=500000.0),
}
SEQ_LENS = (2048, 8192, 32768)
TOKENS_PER_STEP = 32768
SMOKE = dict(model=dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128, vocab_size=512),
             seq_lens=(64, 128), tokens_per_step=256)


def run_config(model: dict, seq_len: int, tokens_per_step: int, precision: str, warmup: int, steps: int,
               compile_: bool) -> dict:
    """One configuration in this process: the trainer's build and step, timed; returns its figures."""
    import torch

    from torchtrain.config import Config
    from torchtrain.data import Batch
    from torchtrain.metrics import device_peak_flops
    from torchtrain.models import get_model_args
    from torchtrain.optim import build_optimizer
    from torchtrain.parallel import ParallelDims, build_mesh, init_distributed
    from torchtrain.models.shape import auto_attention
    from torchtrain.parallel.float8 import check_float8
    from torchtrain.train import build_model, resolve_dtype, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = Config(source="bench/gpu_train.py")
    config.training.seq_len = seq_len
    config.training.local_batch_size = max(1, tokens_per_step // seq_len)
    config.data.document_mask = False
    config.compile.enabled = compile_
    config.activation_checkpoint.mode = "full" if seq_len >= 32768 else "none"
    config.float8.enabled = precision == "float8"
    check_float8(config, device)
    # The backend a recipe's "auto" runs on this device (no document mask here: random tokens, one document).
    args = dataclasses.replace(get_model_args("debug"), **model, max_seq_len=seq_len,
                               attention=auto_attention(device, config.data.document_mask, 0))
    init_distributed(device)
    dims = ParallelDims.resolve(config.parallelism, 1)
    mesh = build_mesh(dims, device)
    param_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[resolve_dtype(config, device)]
    parts = build_model(args, config, mesh, dims, device, param_dtype)
    optimizer = build_optimizer(parts.model, config.optimizer, device)
    batch_size = config.training.local_batch_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch_size, seq_len + 1), generator=gen)
    batch = Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                  torch.zeros((batch_size, seq_len), dtype=torch.int32),
                  torch.arange(seq_len).expand(batch_size, -1).contiguous()).to(device)
    # One process without FSDP: bf16 is autocast over fp32 parameters, as the trainer runs it.
    autocast = torch.autocast(device.type, dtype=param_dtype) if param_dtype != torch.float32 else nullcontext()

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    for _ in range(warmup):
        train_step(parts, optimizer, [batch], config, mesh.dp.get_group(), autocast)
    synchronize()
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(parts, optimizer, [batch], config, mesh.dp.get_group(), autocast)
    synchronize()
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = batch_size * seq_len / seconds
    flops = args.flops_per_token(seq_len) * tokens_per_s
    peak = device_peak_flops(device)
    return {"params": args.num_params(), "dtype": str(param_dtype).removeprefix("torch."), "batch_size": batch_size, "ac_mode": config.activation_checkpoint.mode,
            "warmup_s": warmup_s, "step_s": seconds, "attention": args.attention, "tokens_per_s": tokens_per_s, "model_tflops": flops / 1e12,
            "mfu": flops / peak if peak else None, "loss": loss.item(),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
            "predicted_peak_bytes": _predicted_peak(config, args, device)}


def _predicted_peak(config, args, device) -> int | None:
    """The planner's peak for this configuration on one GPU of this kind (None off a GPU in its table)."""
    if device.type != "cuda":
        return None
    import torch

    from torchtrain.plan.planner import plan_layout
    from torchtrain.plan.timing import DEFAULT_EFFICIENCY, GPUS

    name = torch.cuda.get_device_name(device).upper()
    gpu = next((GPUS[key] for key in ("h200", "h100", "b200", "a100-80g") if key.split("-")[0].upper() in name), None)
    if gpu is None:
        return None
    try:
        return plan_layout(config, args, 1, gpu, DEFAULT_EFFICIENCY).peak_bytes
    except Exception as e:  # the measurement stands on its own; say why the prediction is missing
        print(f"planner failed: {type(e).__name__}: {e}", flush=True)
        return None


def matrix(smoke: bool) -> list[tuple[str, int, str]]:
    if smoke:
        return [("smoke", seq, "bf16") for seq in SMOKE["seq_lens"]]
    # The most informative runs first, so a time budget cuts the least: both shapes in both precisions at 2k,
    # then the longer contexts.
    return [(model, seq, precision) for seq in SEQ_LENS for precision in ("bf16", "float8") for model in MODELS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (tests, dry runs)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    parser.add_argument("--run-timeout-s", type=float, default=150.0, help="limit of one run")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/gpu_train.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    opts = parser.parse_args(argv)

    if opts.one:
        spec = json.loads(opts.one)
        print("RESULT " + json.dumps(run_config(**spec)), flush=True)
        # NOTE: this process exists to print one result. At interpreter exit torch's C++ side sometimes
        # destroys a still-running thread and aborts ("terminate called without an active exception",
        # exit -6: 3 of 12 CPU smoke runs, with or without destroying the process group first), after
        # the result was printed; the result stands, so the teardown is skipped.
        sys.stderr.flush()
        os._exit(0)

    import torch

    if not opts.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; bench/gpu_train.py measures GPU training (use --smoke for the CPU code path)")
        sys.exit(2)
    check_destination(opts.out)
    started = time.perf_counter()
    results = []
    for model, seq_len, precision in matrix(opts.smoke):
        row = {"model": model, "seq_len": seq_len, "precision": precision}
        if time.perf_counter() - started > opts.budget_s:
            results.append({**row, "status": "skipped (time budget)"})
            continue
        spec = dict(model=SMOKE["model"] if opts.smoke else MODELS[model], seq_len=seq_len,
                    tokens_per_step=SMOKE["tokens_per_step"] if opts.smoke else TOKENS_PER_STEP,
                    precision=precision, warmup=1 if opts.smoke else opts.warmup,
                    steps=1 if opts.smoke else opts.steps, compile_=not opts.smoke)
        row.update(_run_in_subprocess(spec, opts.run_timeout_s))
        results.append(row)
        print(_format(row), flush=True)
        _write(opts, results, started)
    _write(opts, results, started)
    print(f"results written to {opts.out}")


def _run_in_subprocess(spec: dict, timeout_s: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout_s:.0f}s)"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        status = "out of memory" if "OutOfMemoryError" in proc.stderr else f"failed (exit {proc.returncode})"
        return {"status": status, "error": " | ".join(tail)}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT "):])}


def _format(row: dict) -> str:
    head = f"{row['model']:>5} {row['seq_len']:>6} {row['precision']:>6}: "
    if row["status"] != "ok":
        return head + row["status"]
    mem = row["peak_memory_bytes"]
    pred = row["predicted_peak_bytes"]
    return head + (f"{row['tokens_per_s']:,.0f} tokens/s, {row['model_tflops']:.1f} TFLOP/s"
                   + (f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else "")
                   + (f", peak {mem / 2**30:.1f} GiB" if mem else "")
                   + (f" (planner {pred / 2**30:.1f} GiB)" if pred else ""))


def _write(opts, results: list[dict], started: float) -> None:
    import torch

    report = {
        "benchmark": "gpu_train", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_train.py" + (" --smoke" if opts.smoke else ""), "commit": commit(),
        "dirty": tree_dirty(), "smoke": opts.smoke,
        "machine": {"cpu": cpu_name(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "flop_convention": "6*N_non_embedding + 12*L*d*s per token (attention not halved); MFU against the "
                           "dense bf16 peak, float8 runs included",
        "tokens_per_step": SMOKE["tokens_per_step"] if opts.smoke else TOKENS_PER_STEP,
        "results": results, "wall_s": time.perf_counter() - started,
    }
    write_report(opts.out, report)


if __name__ == "__main__":
    main()
