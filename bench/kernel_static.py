"""The attention kernels compiled ahead of time for sm_80, sm_90 and sm_100, every autotuning config and
variant, without a GPU: shared memory, registers, spills, matrix instructions and pipelining per config.

    python bench/kernel_static.py            # the whole table (about 500 compiles; minutes, cached by Triton)
    python bench/kernel_static.py --quick    # head dim 128, bf16, one config per kernel

How each figure is obtained: kernels/attention/static_check.py. Results go to
``bench/results/kernel_static.json`` (``--out``): one row per (kernel, architecture, variant, config),
and a summary of the problems found.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import provenance

sys.path.insert(0, str(provenance.REPO))
os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted

from torchtrain.kernels.attention.static_check import SHARED_LIMIT, Variant, check  # noqa: E402

MASKS = {"causal": dict(causal=True), "causal+docs": dict(causal=True, documents=True),
         "causal+window+docs": dict(causal=True, window=4096, documents=True)}


def variants(quick: bool) -> list[Variant]:
    if quick:
        return [Variant(128, "bfloat16", **MASKS["causal+docs"])]
    return [Variant(head_dim, dtype, **mask) for head_dim in (64, 128) for dtype in ("bfloat16", "float16")
            for mask in MASKS.values()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=provenance.RESULTS / "kernel_static.json")
    args = parser.parse_args(argv)
    provenance.check_destination(args.out)
    started = time.perf_counter()
    rows = []
    print(f"{'kernel':<10} {'sm':>3} {'variant':<30} {'BM':>4} {'BN':>4} {'w':>2} {'s':>2} {'smem KB':>8} "
          f"{'regs':>4} {'spill B':>8} {'mma':>5} {'async':>5}  problems")
    for arch in SHARED_LIMIT:
        for variant in variants(args.quick):
            for report in check(variant, arch, only_configs=slice(0, 1) if args.quick else slice(None)):
                row = report.row()
                rows.append(row)
                print(f"{report.kernel:<10} {arch:>3} {report.variant:<30} {report.block_m or '-':>4} "
                      f"{report.block_n or '-':>4} {report.num_warps:>2} {report.num_stages:>2} "
                      f"{report.shared_bytes / 1024:>8.1f} {report.registers:>4} {report.spill_stores:>8} "
                      f"{report.matmul_instructions:>5} {report.async_copies:>5}  "
                      f"{'; '.join(f'{k} ({v})' for k, v in row['problems'].items())}",
                      flush=True)
    problems = collections.Counter(kind for row in rows for kind in row["problems"])
    summary = {"compiles": len(rows), "with_problems": sum(bool(row["problems"]) for row in rows),
               "problems": dict(problems),
               "by_kernel_and_arch": {f"{kernel} sm_{arch}": sum(bool(r["problems"]) for r in rows
                                                                 if r["kernel"] == kernel and r["arch"] == arch)
                                      for kernel in ("fwd", "preprocess", "dkdv", "dq") for arch in SHARED_LIMIT}}
    print(f"\n{summary['compiles']} compiles, {summary['with_problems']} with problems: {summary['problems']}")
    import torch
    import triton

    report = {
        "benchmark": "kernel_static", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/kernel_static.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": provenance.commit(), "working_tree_dirty": provenance.tree_dirty(),
        "machine": {"cpu": provenance.cpu_name(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "seconds": round(time.perf_counter() - started, 1), "summary": summary, "rows": rows,
    }
    provenance.write_report(args.out, report)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
