"""Attention kernel benchmark: our Triton flash attention against PyTorch SDPA (flash, cuDNN) and FlexAttention.

    python bench/attention.py                  # the recorded run (one H100/H200, under 3 minutes)
    python bench/attention.py --gqa            # grouped-query attention: 32 query heads, 8 key/value heads
    python bench/attention.py --check-only     # only the bf16 correctness check (exit 1 if it fails)
    python bench/attention.py --smoke          # tiny CPU run of the same code path (for the tests)

What is compared, on the same problem: causal attention, bf16, head dim 128, 32 query heads (the
Llama-2-7B / Llama-3-8B attention shape, hidden size 4096, i.e. the models this trainer targets;
with ``--gqa`` 8 key/value heads as in Llama-3-8B), sequence lengths 2k, 4k, 8k, 16k and 32k with
the tokens per batch held at 32k (B * S = 32768, so 32k runs with batch 1):

* ``torchtrain``: ``torchtrain.kernels.attention.flash_attention`` (op ``torchtrain::flash_attention``);
* ``sdpa-flash``: ``F.scaled_dot_product_attention(is_causal=True)`` under
  ``sdpa_kernel([SDPBackend.FLASH_ATTENTION])``;
* ``sdpa-cudnn``: the same under ``sdpa_kernel([SDPBackend.CUDNN_ATTENTION])``;
* ``flex``: ``torch.compile(flex_attention)`` with a causal ``create_block_mask`` (static shapes,
  so one compile per sequence length).

GQA goes through each backend's own support (``enable_gqa=True``); K/V are never repeated.

FLOP convention: forward = 4 * B * Hq * S^2 * D, halved for causal masking (2 * B * Hq * S^2 * D);
backward = 2.5 x forward. TFLOP/s = those FLOPs / measured time. This is the convention of the
FlashAttention papers; it counts the matmuls only (no softmax), and the exact causal count
S * (S + 1) / 2 is rounded to S^2 / 2.

How it is measured. CUDA events around each call, after ``--warmup`` untimed calls (the first call
autotunes our kernels and compiles FlexAttention); the median over ``--iters`` calls. "forward" is
the forward alone (inputs require grad, as in training); "forward+backward" is the forward then
``torch.autograd.grad`` of the output against a fixed random ``dout``; backward time =
forward+backward - forward. A backend that is unavailable or fails is recorded (status and the
error's first line) and the run goes on; after a non-OOM failure the backend is not retried at the
longer sequences. ``--budget-s`` bounds the measurement loop: past it, the remaining measurements
are recorded as skipped instead of run.

Correctness (also recorded): on a small shape (B 2, 8 query heads, S 1000 so the tail tiles are
partial, D 128, bf16, causal) our op and SDPA (flash backend) are compared against an fp32
materialised-softmax oracle on the same bf16 inputs: max abs error of ``out``, ``dq``, ``dk``,
``dv``, and the max abs difference between ours and SDPA. The check passes when each of our
errors is at most 2x SDPA's error + 1e-2 (a bf16 kernel cannot be judged by an absolute bound
alone); the script exits 1 after writing its results when it does not.

Without a CUDA device the script refuses (exit 2) unless ``--smoke``: then the same code runs on
CPU at tiny sizes (S 64 and 128, D 32, 4 heads, fp32; our op under the Triton interpreter when
``TRITON_INTERPRET=1`` is set, else its pure-PyTorch path; SDPA's math backend; no cuDNN or Flex).

Results go to ``bench/results/attention.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from provenance import check_destination, commit, tree_dirty, write_report

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "attention.json"
BACKENDS = ("torchtrain", "sdpa-flash", "sdpa-cudnn", "flex")
FLOP_CONVENTION = ("forward = 4*B*Hq*S^2*D, halved when causal; backward = 2.5 x forward "
                   "(FlashAttention papers' convention; matmuls only)")
SEED = 0


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, causal: bool) -> tuple[float, float]:
    """(forward, backward) FLOPs under the convention above."""
    fwd = 4.0 * batch * q_heads * seq_len * seq_len * head_dim
    if causal:
        fwd /= 2
    return fwd, 2.5 * fwd


# ---------------------------------------------------------------------------------------------
# Settings: the GPU run and the CPU smoke run differ only in sizes, dtype and the backends tried
# ---------------------------------------------------------------------------------------------

def settings(a: argparse.Namespace) -> dict:
    import torch

    if a.smoke:
        cfg = dict(device="cpu", dtype=torch.float32, head_dim=32, q_heads=4, kv_heads=2 if a.gqa else 4,
                   seq_lens=[64, 128], tokens=256, warmup=1, iters=2,
                   backends=["torchtrain", "sdpa-math"],
                   check=dict(batch=2, q_heads=4, kv_heads=2 if a.gqa else 4, seq_len=61, head_dim=32))
    else:
        cfg = dict(device="cuda", dtype=torch.bfloat16, head_dim=128, q_heads=32, kv_heads=8 if a.gqa else 32,
                   seq_lens=[2048, 4096, 8192, 16384, 32768], tokens=32768, warmup=a.warmup, iters=a.iters,
                   backends=list(BACKENDS),
                   check=dict(batch=2, q_heads=8, kv_heads=2 if a.gqa else 8, seq_len=1000, head_dim=128))
    if a.seq_lens:
        cfg["seq_lens"] = [int(s) for s in a.seq_lens.split(",")]
    if a.backends:
        cfg["backends"] = [b for b in a.backends.split(",") if b in cfg["backends"]]
    return cfg


# ---------------------------------------------------------------------------------------------
# Backends: each returns f(q, k, v) -> out
# ---------------------------------------------------------------------------------------------

def make_backend(name: str, gqa: bool, seq_len: int, device: str):
    import torch.nn.functional as F

    if name == "torchtrain":
        from torchtrain.kernels.attention import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=True)[0]
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                   "sdpa-math": SDPBackend.MATH}[name]
        extra = {"enable_gqa": True} if gqa else {}

        def sdpa(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)

        return sdpa
    if name == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, seq_len, seq_len, device=device)
        compiled = _compiled_flex(flex_attention)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    raise ValueError(f"unknown backend {name}")


_FLEX = None


def _compiled_flex(flex_attention):
    global _FLEX
    if _FLEX is None:
        import torch

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def measure(fn, warmup: int, iters: int, device: str) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def _inputs(batch, q_heads, kv_heads, seq_len, head_dim, dtype, device, seed=SEED):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q = rand(batch, q_heads, seq_len, head_dim).requires_grad_()
    k = rand(batch, kv_heads, seq_len, head_dim).requires_grad_()
    v = rand(batch, kv_heads, seq_len, head_dim).requires_grad_()
    dout = rand(batch, q_heads, seq_len, head_dim)
    return q, k, v, dout


def bench_one(name: str, seq_len: int, cfg: dict, gqa: bool, deadline: float) -> dict:
    """One (backend, sequence length) row: forward, then forward+backward."""
    import torch

    batch = max(1, cfg["tokens"] // seq_len)
    fwd_flops, bwd_flops = attention_flops(batch, cfg["q_heads"], seq_len, cfg["head_dim"], causal=True)
    row = {"backend": name, "seq_len": seq_len, "batch": batch, "status": "ok", "error": None,
           "fwd_ms": None, "fwd_bwd_ms": None, "bwd_ms": None,
           "fwd_tflops": None, "bwd_tflops": None, "fwd_bwd_tflops": None,
           "fwd_ms_all": None, "fwd_bwd_ms_all": None}
    if time.perf_counter() > deadline:
        row.update(status="skipped", error="time budget (--budget-s) spent")
        return row
    q, k, v, dout = _inputs(batch, cfg["q_heads"], cfg["kv_heads"], seq_len, cfg["head_dim"], cfg["dtype"],
                            cfg["device"])
    fn = make_backend(name, gqa, seq_len, cfg["device"])

    def fwd():
        return fn(q, k, v)

    def fwd_bwd():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    fwd_times = measure(fwd, cfg["warmup"], cfg["iters"], cfg["device"])
    row["fwd_ms_all"] = fwd_times
    row["fwd_ms"] = statistics.median(fwd_times)
    row["fwd_tflops"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
    if time.perf_counter() > deadline:
        row.update(status="fwd_only", error="time budget (--budget-s) spent before the backward")
        return row
    both = measure(fwd_bwd, cfg["warmup"], cfg["iters"], cfg["device"])
    row["fwd_bwd_ms_all"] = both
    row["fwd_bwd_ms"] = statistics.median(both)
    row["fwd_bwd_tflops"] = (fwd_flops + bwd_flops) / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
    if row["bwd_ms"] > 0:
        row["bwd_tflops"] = bwd_flops / (row["bwd_ms"] * 1e-3) / 1e12
    return row


# ---------------------------------------------------------------------------------------------
# Correctness: ours and SDPA against a high-precision materialised-softmax oracle
# ---------------------------------------------------------------------------------------------

def _oracle(q, k, v, dout, dtype):
    """Causal attention with an explicit softmax in ``dtype``; returns (out, dq, dk, dv) in ``dtype``."""
    import torch

    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    seq = q.shape[2]
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vv
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    return out.detach(), dq, dk, dv


def correctness(cfg: dict, gqa: bool) -> dict:
    import torch

    c = cfg["check"]
    q, k, v, dout = _inputs(c["batch"], c["q_heads"], c["kv_heads"], c["seq_len"], c["head_dim"], cfg["dtype"],
                            cfg["device"], seed=SEED + 1)
    oracle_dtype = torch.float64 if cfg["device"] == "cpu" else torch.float32
    ref = _oracle(q, k, v, dout, oracle_dtype)
    sdpa_name = "sdpa-math" if cfg["device"] == "cpu" else "sdpa-flash"
    names = ("out", "dq", "dk", "dv")
    result = {"shape": {**c, "causal": True, "dtype": str(cfg["dtype"]).replace("torch.", "")},
              "oracle": f"explicit softmax in {str(oracle_dtype).replace('torch.', '')} on the same inputs",
              "sdpa_backend": sdpa_name, "tolerance": "ours <= 2 x sdpa + 1e-2 (each of out, dq, dk, dv)"}
    got = {}
    for name in ("torchtrain", sdpa_name):
        try:
            fn = make_backend(name, gqa, c["seq_len"], cfg["device"])
            out = fn(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            got[name] = (out.detach(), *grads)
            result[name] = {f"max_abs_err_{n}": (t.to(oracle_dtype) - r).abs().max().item()
                            for n, t, r in zip(names, got[name], ref)}
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            result[name] = {"error": _first_line(exc)}
    if "torchtrain" in got and sdpa_name in got:
        result["max_abs_diff_torchtrain_vs_sdpa"] = {
            n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(names, got["torchtrain"], got[sdpa_name])}
        result["passed"] = all(
            result["torchtrain"][f"max_abs_err_{n}"] <= 2 * result[sdpa_name][f"max_abs_err_{n}"] + 1e-2
            for n in names)
    elif "torchtrain" in got:  # SDPA unavailable: judge ours by the absolute bound alone
        result["passed"] = all(result["torchtrain"][f"max_abs_err_{n}"] <= 1e-2 for n in names)
    else:
        result["passed"] = False
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "hostname": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return info


def _print_table(report: dict) -> None:
    cfg = report["config"]
    m = report["machine"]
    print()
    print(f"causal attention, {cfg['dtype']}, D {cfg['head_dim']}, heads {cfg['q_heads']}/{cfg['kv_heads']} (q/kv), "
          f"{cfg['tokens_per_batch']} tokens per batch; {m.get('gpu', 'CPU')}, torch {m['torch']}; "
          f"TFLOP/s ({report['flop_convention']})")
    backends = cfg["backends"]
    header = f"{'seq':>7}{'batch':>6}  " + "".join(f"{b + ' fwd':>18}{b + ' bwd':>18}" for b in backends)
    print(header)
    print("-" * len(header))
    by_key = {(r["backend"], r["seq_len"]): r for r in report["results"]}

    def cell(row, key):
        if row is None:
            return "-"
        if row.get(key) is not None:
            return f"{row[key]:.1f}" if row[key] >= 1 else f"{row[key]:.3g}"
        return "n/a" if row["status"] == "ok" else row["status"]

    for s in cfg["seq_lens"]:
        rows = [by_key.get((b, s)) for b in backends]
        batch = next((r["batch"] for r in rows if r), "")
        print(f"{s:>7}{batch:>6}  " + "".join(f"{cell(r, 'fwd_tflops'):>18}{cell(r, 'bwd_tflops'):>18}"
                                              for r in rows))
    for r in report["results"]:
        if r["error"]:
            print(f"  {r['backend']} S={r['seq_len']}: {r['status']}: {r['error']}")
    c = report["correctness"]
    ours = c.get("torchtrain", {})
    sdpa = c.get(c["sdpa_backend"], {})
    errs = " ".join(f"{n} {ours.get(f'max_abs_err_{n}', float('nan')):.2e}/"
                    f"{sdpa.get(f'max_abs_err_{n}', float('nan')):.2e}" for n in ("out", "dq", "dk", "dv"))
    print(f"correctness (max abs err vs {c['oracle']}, ours/{c['sdpa_backend']}): {errs or ours}: "
          f"{'PASSED' if c['passed'] else 'FAILED'}" + (f" ({ours['error']})" if "error" in ours else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gqa", action="store_true", help="8 key/value heads for the 32 query heads")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (autotune, compile)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported")
    parser.add_argument("--budget-s", type=float, default=140.0,
                        help="seconds for the measurement loop; later measurements are skipped (default 140)")
    parser.add_argument("--seq-lens", default=None, help="comma-separated, default 2048,...,32768")
    parser.add_argument("--backends", default=None, help=f"comma-separated subset of {','.join(BACKENDS)}")
    parser.add_argument("--check-only", action="store_true", help="only the correctness check")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code path (tests)")
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("bench/attention.py: no CUDA device found; this benchmark needs a GPU (H100/H200), "
              "or --smoke for a tiny CPU run", file=sys.stderr)
        return 2
    check_destination(a.out or DEFAULT_OUT)
    sys.path.insert(0, str(REPO))
    from torchtrain.kernels.attention import op

    cfg = settings(a)
    if a.smoke and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        op.kernels_module()  # decorate the kernels for the interpreter before anything else imports triton
    if cfg["device"] == "cuda":
        our_path = "triton"
    else:
        our_path = "triton-interpreter" if op.uses_kernels(torch.device("cpu")) else "pure-PyTorch reference"
    torch.manual_seed(SEED)

    check = correctness(cfg, a.gqa)
    print(f"correctness: {'PASSED' if check['passed'] else 'FAILED'} "
          f"{ {k: v for k, v in check.items() if k in ('torchtrain', check['sdpa_backend'])} }", flush=True)

    results = []
    if not a.check_only:
        deadline = time.perf_counter() + a.budget_s
        failed: dict[str, str] = {}
        for seq_len in cfg["seq_lens"]:
            for name in cfg["backends"]:
                if name in failed:
                    results.append({"backend": name, "seq_len": seq_len, "batch": max(1, cfg["tokens"] // seq_len),
                                    "status": "skipped", "error": f"failed at a shorter sequence: {failed[name]}",
                                    **{k: None for k in ("fwd_ms", "fwd_bwd_ms", "bwd_ms", "fwd_tflops",
                                                         "bwd_tflops", "fwd_bwd_tflops")}})
                    continue
                try:
                    row = bench_one(name, seq_len, cfg, a.gqa, deadline)
                except torch.OutOfMemoryError as exc:
                    row = {"backend": name, "seq_len": seq_len, "status": "failed", "error": _first_line(exc)}
                except Exception as exc:  # noqa: BLE001 - an unavailable backend is a result, not a crash
                    err = _first_line(exc)
                    status = "unavailable" if "No available kernel" in err or "not available" in err else "failed"
                    row = {"backend": name, "seq_len": seq_len, "status": status, "error": err,
                           "traceback": traceback.format_exc()[-2000:]}
                    failed[name] = err
                if cfg["device"] == "cuda":
                    torch.cuda.empty_cache()
                results.append(row)
                if row.get("fwd_tflops") is not None:
                    bwd = f"{row['bwd_tflops']:.4g}" if row.get("bwd_tflops") is not None else "n/a"
                    print(f"S={seq_len} {name}: fwd {row['fwd_tflops']:.4g} bwd {bwd} TFLOP/s "
                          f"({row['status']})", flush=True)
                else:
                    print(f"S={seq_len} {name}: {row['status']}: {row['error']}", flush=True)

    command = "python " + " ".join([os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])
    report = {
        "benchmark": "attention",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "commit": commit(),
        "working_tree_dirty": tree_dirty(),
        "machine": machine_info(cfg["device"]),
        "smoke": a.smoke,
        "config": {"device": cfg["device"], "dtype": str(cfg["dtype"]).replace("torch.", ""), "causal": True,
                   "head_dim": cfg["head_dim"], "q_heads": cfg["q_heads"], "kv_heads": cfg["kv_heads"],
                   "gqa": a.gqa, "tokens_per_batch": cfg["tokens"], "seq_lens": cfg["seq_lens"],
                   "backends": cfg["backends"], "warmup": cfg["warmup"], "iters": cfg["iters"],
                   "budget_s": a.budget_s, "torchtrain_path": our_path, "timing": "CUDA events, median"
                   if cfg["device"] == "cuda" else "perf_counter, median"},
        "flop_convention": FLOP_CONVENTION,
        "correctness": check,
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    if not a.check_only:
        _print_table(report)
    out = a.out or DEFAULT_OUT
    write_report(out, report)
    print(f"wrote {out} ({report['wall_s']:.0f}s)")
    return 0 if check["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
