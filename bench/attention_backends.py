"""The model's attention backends on a GPU: bf16 correctness, speed, and the choice ``model.attention = "auto"``
makes from them.

    python bench/attention_backends.py                 # one H100/H200: about two minutes
    python bench/attention_backends.py --smoke         # the same code on the CPU, tiny (CI, no GPU)

Every backend of ``torchtrain.models.attention.BACKENDS`` that trains on the device (``sdpa``, ``flex``,
``triton``; not the materialised ``reference``) is called exactly as the model calls it (``BACKENDS[name].fn``)
in the three mask variants of ``models/attention_choice.py``: ``causal``; ``documents`` (causal + packed
documents, the training default); ``window`` (causal + documents + a sliding window).

1. Correctness, first: B 2, 8 query heads, 2 key/value heads (grouped-query), S 1000 (partial tiles),
   D 128, documents of random lengths, window 256; bf16 inputs. Each backend's output and dq, dk, dv against
   the reference backend (a materialised softmax) run in fp32 on the same bf16 values. Error = max |x - ref|
   / max |ref| per tensor; a backend passes a variant when all four are at most ``--tolerance`` (2e-2: bf16
   keeps 8 bits, a relative rounding of 4e-3 per value).
2. Speed: forward+backward (``torch.autograd.grad`` of the output against a fixed ``dout``) of each backend
   that passed, 32 query / 8 key-value heads, D 128, 32,768 tokens per call (batch 32768 / S) at S = 2k, 8k
   and 32k; documents of lengths uniform in [64, 8192] from a fixed seed; window 4096. CUDA events, median
   of ``--iters`` calls after ``--warmup`` (the first compiles FlexAttention and autotunes our kernels).
   ``--budget-s`` bounds this part: past it the remaining timings are recorded as skipped.
3. The choice per variant (``attention_choice.decide``): ``triton`` where it passed and was faster than the
   default backend at every length timed for both, else the default. On a GPU the choices are written into
   ``gpu_check.json`` beside ``--out`` (the record ``auto`` reads when that is ``bench/results``).

FLOP convention for the reported TFLOP/s: the FlashAttention papers' (4·B·Hq·S_q·S_k·D forward with S_k the
keys a query sees on average, backward 2.5 x forward; matmuls only), here with the keys actually visible
(causal, documents, window) counted exactly from the mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from attention import _first_line, machine_info, measure
from provenance import REPO, check_destination, commit, tree_dirty, write_report

sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "bench" / "results" / "attention_backends.json"
SEED = 0


def settings(a: argparse.Namespace) -> dict:
    import torch

    if a.smoke:
        return dict(device="cpu", dtype=torch.float32, oracle_dtype=torch.float64, tolerance=1e-5,
                    check=dict(batch=2, q_heads=4, kv_heads=2, seq_len=61, head_dim=32, window=16, max_doc=24),
                    time=dict(q_heads=4, kv_heads=2, head_dim=32, tokens=256, seq_lens=[64, 128], window=16,
                              max_doc=48, warmup=1, iters=2))
    return dict(device="cuda", dtype=torch.bfloat16, oracle_dtype=torch.float32, tolerance=a.tolerance,
                check=dict(batch=2, q_heads=8, kv_heads=2, seq_len=1000, head_dim=128, window=256, max_doc=400),
                time=dict(q_heads=32, kv_heads=8, head_dim=128, tokens=32768, seq_lens=[2048, 8192, 32768],
                          window=4096, max_doc=8192, warmup=a.warmup, iters=a.iters))


def backends_for(device: str) -> list[str]:
    from torchtrain.models.attention import BACKENDS

    return [name for name, b in BACKENDS.items() if device in b.trains_on and name != "reference"]


def document_ids(batch: int, seq_len: int, max_len: int, generator) -> "torch.Tensor":
    """[batch, seq_len] ids of packed documents, lengths uniform in [min(64, max_len // 4), max_len]."""
    import torch

    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(int(torch.randint(max(1, min(64, max_len // 4)), max_len + 1, (1,), generator=generator)))
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq_len]
        rows.append(ids)
    return torch.stack(rows).to(torch.int32)


def masks(variant: str, ids, window: int) -> dict:
    return {"causal": True, "document_ids": ids if variant != "causal" else None,
            "window": window if variant == "window" else 0}


def call(name: str, q, k, v, m: dict):
    from torchtrain.models.attention import BACKENDS

    return BACKENDS[name].fn(q, k, v, m["causal"], m["document_ids"], None, m["window"], None)[0]


def visible_pairs(m: dict, seq_len: int, batch: int) -> float:
    """(query, key) pairs the masks leave visible, summed over the batch (the FLOP count's S_q * S_k)."""
    import torch

    if m["document_ids"] is None:
        per_row = torch.arange(1, seq_len + 1, dtype=torch.float64)
        if m["window"]:
            per_row = per_row.clamp(max=m["window"])
        return float(per_row.sum()) * batch
    total = 0.0
    for ids in m["document_ids"].cpu():
        start = torch.searchsorted(ids, ids, right=False)  # ids are packed in increasing order
        per_row = torch.arange(seq_len) - start + 1
        if m["window"]:
            per_row = per_row.clamp(max=m["window"])
        total += float(per_row.double().sum())
    return total


# ---------------------------------------------------------------------------------------------
# 1. Correctness
# ---------------------------------------------------------------------------------------------

def correctness(cfg: dict, backends: list[str]) -> dict:
    import torch

    c, device = cfg["check"], cfg["device"]
    gen = torch.Generator().manual_seed(SEED)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=cfg["dtype"])

    q = rand(c["batch"], c["q_heads"], c["seq_len"], c["head_dim"])
    k, v = (rand(c["batch"], c["kv_heads"], c["seq_len"], c["head_dim"]) for _ in range(2))
    dout = rand(c["batch"], c["q_heads"], c["seq_len"], c["head_dim"])
    ids = document_ids(c["batch"], c["seq_len"], c["max_doc"], gen).to(device)
    names = ("out", "dq", "dk", "dv")
    report = {"shape": {key: c[key] for key in ("batch", "q_heads", "kv_heads", "seq_len", "head_dim", "window")},
              "dtype": str(cfg["dtype"]).removeprefix("torch."),
              "oracle": f"reference backend in {str(cfg['oracle_dtype']).removeprefix('torch.')} on the same inputs",
              "error": "max |x - ref| / max |ref|", "tolerance": cfg["tolerance"], "variants": {}}
    for variant in ("causal", "documents", "window"):
        m = masks(variant, ids, c["window"])

        def run(name, dtype):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = call(name, *leaves, m)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout.to(dtype)))

        ref = run("reference", cfg["oracle_dtype"])
        rows = {}
        for name in backends:
            try:
                got = run(name, cfg["dtype"])
                errors = {n: ((g.to(r.dtype) - r).abs().max() / r.abs().max()).item()
                          for n, g, r in zip(names, got, ref)}
                rows[name] = {"errors": errors, "passed": all(e <= cfg["tolerance"] for e in errors.values())}
            except Exception as exc:  # noqa: BLE001 - a failing backend is a finding, not a crash
                rows[name] = {"error": _first_line(exc), "passed": False}
            print(f"correctness {variant:9s} {name:7s} {rows[name]}", flush=True)
        report["variants"][variant] = rows
    return report


# ---------------------------------------------------------------------------------------------
# 2. Speed
# ---------------------------------------------------------------------------------------------

def timings(cfg: dict, check: dict, deadline: float) -> list[dict]:
    import torch

    t, device = cfg["time"], cfg["device"]
    rows = []
    for seq_len in t["seq_lens"]:
        batch = max(1, t["tokens"] // seq_len)
        gen = torch.Generator().manual_seed(SEED + seq_len)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=cfg["dtype"]).requires_grad_()

        q = rand(batch, t["q_heads"], seq_len, t["head_dim"])
        k, v = (rand(batch, t["kv_heads"], seq_len, t["head_dim"]) for _ in range(2))
        dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=cfg["dtype"])
        ids = document_ids(batch, seq_len, t["max_doc"], gen).to(device)
        for variant, results in check["variants"].items():
            m = masks(variant, ids, t["window"])
            flops = 4.0 * t["q_heads"] * t["head_dim"] * visible_pairs(m, seq_len, batch) * 3.5  # fwd + 2.5x bwd
            for name, result in results.items():
                row = {"variant": variant, "backend": name, "seq_len": seq_len, "batch": batch, "status": "ok"}
                rows.append(row)
                if not result["passed"]:
                    row["status"] = "skipped: failed the correctness check"
                    continue
                if time.perf_counter() > deadline:
                    row["status"] = "skipped: time budget (--budget-s) spent"
                    continue

                def fwd_bwd():
                    return torch.autograd.grad(call(name, q, k, v, m), (q, k, v), dout)

                try:
                    times = measure(fwd_bwd, t["warmup"], t["iters"], device)
                    row.update(fwd_bwd_ms=statistics.median(times), fwd_bwd_ms_all=times)
                    row["tflops"] = flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
                except torch.OutOfMemoryError as exc:
                    row["status"] = f"out of memory: {_first_line(exc)}"
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001
                    row["status"] = f"failed: {_first_line(exc)}"
                print(f"time {variant:9s} {name:7s} S={seq_len:6d} {row.get('fwd_bwd_ms', row['status'])}",
                      flush=True)
    return rows


def choices(check: dict, rows: list[dict]) -> dict[str, tuple[str, str]]:
    from torchtrain.models.attention_choice import decide

    picked = {}
    for variant, results in check["variants"].items():
        correct = {name: r["passed"] for name, r in results.items()}
        ms: dict[str, dict[int, float]] = {}
        for row in rows:
            if row["variant"] == variant and "fwd_bwd_ms" in row:
                ms.setdefault(row["backend"], {})[row["seq_len"]] = row["fwd_bwd_ms"]
        picked[variant] = decide(variant, correct, ms)
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--budget-s", type=float, default=110.0, help="time budget of the speed part")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=2e-2)
    a = parser.parse_args(argv)
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the CPU code-path check", file=sys.stderr)
        return 2
    check_destination(a.out)
    cfg = settings(a)
    backends = backends_for(cfg["device"])
    started = time.perf_counter()
    check = correctness(cfg, backends)
    rows = timings(cfg, check, time.perf_counter() + a.budget_s)
    picked = choices(check, rows)
    for variant, (backend, why) in picked.items():
        print(f"auto on this device, {variant}: {backend} ({why})")
    report = {"benchmark": "attention_backends", "smoke": a.smoke, "commit": commit(),
              "working_tree_dirty": tree_dirty(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(cfg["device"]), "backends": backends, "correctness": check,
              "timing_settings": {k: v for k, v in cfg["time"].items()}, "results": rows,
              "choices": {v: {"backend": b, "why": why} for v, (b, why) in picked.items()},
              "wall_s": time.perf_counter() - started,
              "flop_convention": "4*Hq*D*(visible query-key pairs) forward, backward 2.5x forward (matmuls only)"}
    write_report(a.out, report)
    if cfg["device"] == "cuda":
        from torchtrain.models.attention_choice import capability_name, record_choices

        record_path = a.out.parent / "gpu_check.json"
        record = record_choices(record_path, capability_name(*torch.cuda.get_device_capability()),
                                torch.cuda.get_device_name(), commit(), picked)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    passed = all(r["passed"] for results in check["variants"].values() for r in results.values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
