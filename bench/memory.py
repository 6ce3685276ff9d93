"""Activation memory: what each checkpointing mode keeps per block, and what the chunked loss saves.

    python bench/memory.py                  # the recorded run: debug model, 4,096 tokens (~1 minute on 2 cores)
    python bench/memory.py --seq-len 256    # a smoke test (seconds)

What is measured (fp32, eager, batch 1, on the CPU):

* (a) Bytes a block keeps for its backward, per token, for activation_checkpoint.mode none, full,
  selective and layers (num_layers = L/2): the blocks of the model run on the embedding's output
  (a fresh leaf), and the memory still held when the last block returns, minus that output, plus the
  first block's input, divided by tokens x blocks. Each block is thus charged for its own input (which
  it keeps alive for the backward) and not for its output (the next block's input). Compared with the
  block input's size (d x 4 bytes per token); target: full keeps <= 1.25x the block inputs.
* (b) Peak memory of a whole forward + backward (embedding to loss) with the loss computed three ways:
  the model called with labels (``linear_cross_entropy_sum``: the logits exist a chunk at a time),
  plain logits + ``F.cross_entropy`` (the usual way), and plain logits + ``loss.cross_entropy_sum`` (the
  leaner logits loss). The logits' memory is what a loss path adds over the same model whose output
  is reduced without a vocabulary (``body``: the final hidden states dotted with a fixed vector);
  target: the chunked loss removes >= 90% of what plain logits + F.cross_entropy add.

How: ``torch.distributed._tools.mem_tracker.MemTracker``, a TorchDispatchMode that records the storage
of every tensor an op creates and drops it when the storage is freed (weak references), so it counts
live tensor bytes on any device. On a CPU there is no allocator counter to read (torch.cuda.memory_
allocated has no CPU twin) and the process RSS moves with the allocator's caching; counting
saved-tensor hooks would miss what selective checkpointing caches outside autograd's saved tensors.

Results go to ``bench/results/memory.json`` (``--out``), with whether each target is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from provenance import check_destination, commit, cpu_name, tree_dirty, write_report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from torchtrain.loss import IGNORE_INDEX, cross_entropy_sum  # noqa: E402
from torchtrain.models import Transformer, get_model_args  # noqa: E402
from torchtrain.parallel.ac import apply_activation_checkpointing  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "memory.json"
TARGET_FULL_RATIO = 1.25  # full checkpointing keeps at most this many block inputs per block
TARGET_LOGITS_REMOVED = 0.90  # the chunked loss removes at least this fraction of the logits' memory
CPU = torch.device("cpu")


def build(model_name: str, seq_len: int, mode: str = "none", num_layers: int = 0) -> Transformer:
    args = get_model_args(model_name)
    args = dataclasses.replace(args, max_seq_len=max(args.max_seq_len, seq_len))  # RoPE table for seq_len
    model = Transformer(args)
    model.init_weights(seed=0)
    apply_activation_checkpointing(model, mode, num_layers)
    return model


def tracked_bytes(tracker: MemTracker, kind: str = "current", category: str = "Total") -> int:
    return tracker.get_tracker_snapshot(kind).get(CPU, {}).get(category, 0)


def without_parameters(tracker: MemTracker, kind: str) -> int:
    # NOTE: the tracker counts the parameters of every module it sees run; they are the same whatever
    # the mode or the loss, so they are left out.
    return tracked_bytes(tracker, kind) - tracked_bytes(tracker, kind, "Parameter")


def kept_per_token_per_block(model: Transformer, tokens: torch.Tensor) -> float:
    """(a): bytes the blocks hold for their backward when the last one returns, per token and block."""
    seq_len = tokens.shape[1]
    first_input = model.tok_embeddings(tokens).detach().requires_grad_()
    rope_cos, rope_sin = model._rope(seq_len, None)
    with MemTracker() as tracker:
        h = first_input
        for block in model.layers.values():
            h = block(h, rope_cos, rope_sin)
        # "Activation": what ops made under the tracker plus the blocks' inputs (the first one included,
        # made before tracking); the parameters are counted apart.
        held = tracked_bytes(tracker, category="Activation")
    # NOTE: the last output is the next consumer's input, not something the blocks keep.
    kept = held - h.nbytes
    return kept / (seq_len * len(model.layers))


def peak_forward_backward(model: Transformer, tokens: torch.Tensor, labels: torch.Tensor, loss_path: str) -> int:
    """(b): peak live bytes of one forward + backward, parameters excluded (made before tracking)."""
    model.zero_grad(set_to_none=True)
    direction = torch.randn(model.args.dim, generator=torch.Generator().manual_seed(0))
    output = model.output
    with MemTracker() as tracker:
        if loss_path == "chunked":
            loss = model(tokens, labels=labels)
        elif loss_path == "body":
            model.output = None  # the model then returns its final hidden states
            try:
                loss = (model(tokens) @ direction).sum()
            finally:
                model.output = output
        else:
            logits = model(tokens)
            if loss_path == "plain F.cross_entropy":
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum")
            else:
                loss = cross_entropy_sum(logits, labels)
            del logits
        loss.backward()
        del loss
        peak = without_parameters(tracker, "peak")
    model.zero_grad(set_to_none=True)
    return peak


def run(a: argparse.Namespace) -> dict:
    args = get_model_args(a.model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, a.seq_len), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    input_bytes = args.dim * 4  # fp32 block input per token
    half = args.num_layers // 2

    modes = {}
    for label, mode, k in (("none", "none", 0), ("full", "full", 0), ("selective", "selective", 0),
                           (f"layers (num_layers={half})", "layers", half)):
        per_token = kept_per_token_per_block(build(a.model, a.seq_len, mode, k), tokens)
        modes[label] = {"mode": mode, "num_layers": k, "bytes_per_token_per_block": per_token,
                        "ratio_to_block_input": per_token / input_bytes}
        print(f"  kept: {label:26s} {per_token:10.0f} B/token/block", flush=True)

    model = build(a.model, a.seq_len)
    peaks = {}
    for path in ("body", "chunked", "plain F.cross_entropy", "plain cross_entropy_sum"):
        peaks[path] = peak_forward_backward(model, tokens, labels, path)
        print(f"  peak: {path:26s} {peaks[path] / 2**20:10.1f} MiB", flush=True)
    plain_extra = peaks["plain F.cross_entropy"] - peaks["body"]
    lean_extra = peaks["plain cross_entropy_sum"] - peaks["body"]
    chunked_extra = peaks["chunked"] - peaks["body"]
    return {
        "model": {"name": a.model, "dim": args.dim, "num_layers": args.num_layers, "vocab_size": args.vocab_size,
                  "ffn_dim": args.ffn_dim, "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads},
        "seq_len": a.seq_len,
        "block_input_bytes_per_token": input_bytes,
        "activations": modes,
        "loss": {
            "peak_bytes": peaks,
            "logits_bytes": a.seq_len * args.vocab_size * 4,
            "added_over_body_bytes": {"chunked": chunked_extra, "plain F.cross_entropy": plain_extra,
                                      "plain cross_entropy_sum": lean_extra},
            "fraction_removed_vs_F.cross_entropy": 1 - chunked_extra / plain_extra,
            "fraction_removed_vs_cross_entropy_sum": 1 - chunked_extra / lean_extra,
        },
    }


def verdicts(r: dict) -> dict:
    full = r["activations"]["full"]["ratio_to_block_input"]
    removed = r["loss"]["fraction_removed_vs_F.cross_entropy"]
    return {
        "full_keeps_at_most_1.25x_block_input": {"value": full, "target": TARGET_FULL_RATIO,
                                                 "met": full <= TARGET_FULL_RATIO},
        "chunked_loss_removes_90pct_of_logits_memory": {"value": removed, "target": TARGET_LOGITS_REMOVED,
                                                        "met": removed >= TARGET_LOGITS_REMOVED},
    }


def print_table(r: dict, checks: dict) -> None:
    m = r["model"]
    print(f"\n{m['name']} (d={m['dim']}, L={m['num_layers']}, vocab {m['vocab_size']}), {r['seq_len']} tokens, "
          f"fp32, eager; block input = {r['block_input_bytes_per_token']} B/token")
    print(f"{'mode':28s} {'B/token/block':>14s} {'x block input':>14s}")
    for label, row in r["activations"].items():
        print(f"{label:28s} {row['bytes_per_token_per_block']:14.0f} {row['ratio_to_block_input']:14.2f}")
    loss = r["loss"]
    print(f"\n{'forward+backward, loss path':28s} {'peak MiB':>10s} {'over body MiB':>14s}")
    for path, peak in loss["peak_bytes"].items():
        extra = loss["added_over_body_bytes"].get(path)
        print(f"{path:28s} {peak / 2**20:10.1f} {'' if extra is None else f'{extra / 2**20:14.1f}'}")
    print(f"fp32 logits: {loss['logits_bytes'] / 2**20:.1f} MiB; chunked removes "
          f"{100 * loss['fraction_removed_vs_F.cross_entropy']:.1f}% of what logits + F.cross_entropy add "
          f"({100 * loss['fraction_removed_vs_cross_entropy_sum']:.1f}% of logits + cross_entropy_sum)")
    for name, check in checks.items():
        print(f"{name}: {check['value']:.3f} (target {check['target']}): {'MET' if check['met'] else 'NOT MET'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    check_destination(a.out)
    torch.manual_seed(0)
    started = time.perf_counter()
    results = run(a)
    checks = verdicts(results)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit(),
        "dirty": tree_dirty(),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "method": "MemTracker (live tensor storages), fp32, eager, batch 1",
        "wall_s": time.perf_counter() - started,
        "results": results,
        "targets": checks,
    }
    print_table(results, checks)
    write_report(a.out, report)
    print(f"results written to {a.out}")


if __name__ == "__main__":
    main()
