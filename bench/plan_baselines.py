"""The published baseline runs (docs/baselines.md) as plans: memory and predicted tokens/s.

    python bench/plan_baselines.py [--rows NAME ...] [--no-search] [--max-measured K]
                                   [--long-context NAME ...] [--out bench/results/plan_baselines.json]

For each row: the planner's plan of the published layout (``recipes/seed/``: A100-80GB, same GPUs,
same global batch, micro batch 1), and the best layout its search finds for the same GPUs and batch (at most
``--max-measured`` layouts measured per search). Then the long-context candidates
(:data:`LONG_CONTEXT`): a few layouts per long-context recipe, each planned on A100-80GB and on
H100 (same memory, different step time). The efficiency constant is the planner's default (an
assumption: nothing here ran on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import provenance

sys.path.insert(0, str(provenance.REPO))

import torch  # noqa: E402

from torchtrain.config import ConfigError, load_config  # noqa: E402
from torchtrain.plan.cli import planning_config  # noqa: E402
from torchtrain.plan.planner import on_gpu, plan_layout  # noqa: E402
from torchtrain.plan.search import search  # noqa: E402
from torchtrain.plan.timing import DEFAULT_EFFICIENCY, GPUS  # noqa: E402
from torchtrain.plan.fake_step import gpu_model_args  # noqa: E402

GPU = GPUS["a100-80g"]


def seq_overrides(seq: int) -> list[str]:
    # NOTE: the recipes are 2k ones; longer rows raise the model's position limit to the sequence
    # (memory and FLOPs do not depend on it; RoPE scaling is a training choice, not planned here).
    return ["--training.seq_len", str(seq), "--model.max_seq_len", str(seq)]


def seed(name: str, gpus: int) -> tuple:
    # The published run's own layout, as shipped in recipes/seed/ (DeepSpeed ZeRO-1/2 on one node:
    # FSDP over 8 with parameters kept, 64 accumulation steps x 8 GPUs = 512 sequences; Megatron:
    # its TP/PP/DP sizes, one pipeline step of all the rank's sequences; "checkpointed layers" ->
    # activation_checkpoint.mode layers/full).
    return f"recipes/seed/{name}.toml", gpus, []


ROWS = {  # name -> (recipe, GPUs, overrides), published tokens/s/GPU, memory GB
    "InternLM-7B 2k": (seed("internlm_7b_2k", 8), 4147, 55),
    "InternLM-7B 4k": (seed("internlm_7b_4k", 8), 4248, 69),
    "InternLM-7B 8k": (seed("internlm_7b_8k", 8), 3520, 74),
    "Qwen-14B 2k": (seed("qwen_14b_2k", 8), 1980, 80),
    "Qwen-14B 4k": (seed("qwen_14b_4k", 8), 1842, 80),
    "Qwen-14B 8k": (seed("qwen_14b_8k", 8), 1665, 80),
    "Llama-2-70B 2k": (seed("llama_2_70b_2k", 32), 343, 66),
    "Llama-2-70B 4k": (seed("llama_2_70b_4k", 32), 380, 80),
    "Llama-2-70B 8k": (seed("llama_2_70b_8k", 256), 341, 80),
    "Llama-2-70B 32k": (seed("llama_2_70b_32k", 128), 216, 78),
    "Llama-2-70B 64k": (seed("llama_2_70b_64k", 128), 110, 80),
}


def layout(recipe: str, seq: int, gpus: int, batch: int, *, tp: int = 1, cp: int = 1, pp: int = 1,
           dp_replicate: int = 1, schedule: str = "1f1b", ac: str = "full", ac_layers: int = 0,
           local: int = 1, microbatches: int = 0, cp_rotate: str = "allgather") -> tuple:
    """A long-context candidate: ``batch`` sequences per step on ``gpus`` GPUs, the rest data parallel
    (FSDP over what is left); ``local`` sequences per data-parallel rank and pipeline step."""
    dp = gpus // (tp * cp * pp)
    accum = batch // (dp * local)
    assert dp * tp * cp * pp == gpus and accum * dp * local == batch, (recipe, gpus, batch)
    overrides = [*seq_overrides(seq), "--parallelism.tp", str(tp), "--parallelism.cp", str(cp),
                 "--parallelism.cp_rotate", cp_rotate, "--parallelism.pp", str(pp),
                 "--parallelism.dp_replicate", str(dp_replicate), "--parallelism.dp_shard", str(dp // dp_replicate),
                 "--training.local_batch_size", str(local), "--training.grad_accum_steps", str(accum),
                 "--activation_checkpoint.mode", ac, "--activation_checkpoint.num_layers", str(ac_layers)]
    if pp > 1:
        overrides += ["--parallelism.pp_schedule", schedule, "--parallelism.pp_microbatches", str(microbatches or local)]
    return recipe, gpus, overrides


L70, I7, Q14 = "recipes/llama2_70b_2k.toml", "recipes/internlm_7b_2k.toml", "recipes/qwen_14b_2k.toml"
LONG_CONTEXT = {  # recipe row -> {candidate: (recipe, GPUs, overrides)}
    "llama2_70b 32k (128 GPUs)": {
        "published: tp8 pp8 dp2 interleaved, 256 microbatches": layout(L70, 32768, 128, 512, tp=8, pp=8,
                                                                       schedule="interleaved_1f1b", local=256),
        "tp8 pp8 dp2 interleaved, 32 microbatches x 8 accum": layout(L70, 32768, 128, 512, tp=8, pp=8,
                                                                     schedule="interleaved_1f1b", local=32),
        "tp8 pp4 dp4 interleaved, 16 microbatches x 8 accum": layout(L70, 32768, 128, 512, tp=8, pp=4,
                                                                     schedule="interleaved_1f1b", local=16),
        "tp8 cp2 fsdp8": layout(L70, 32768, 128, 512, tp=8, cp=2),
        "tp8 cp4 fsdp4": layout(L70, 32768, 128, 512, tp=8, cp=4),
        "tp4 cp2 fsdp16": layout(L70, 32768, 128, 512, tp=4, cp=2),
        "tp8 fsdp16": layout(L70, 32768, 128, 512, tp=8),
        "tp8 cp2 fsdp8 layers 40": layout(L70, 32768, 128, 512, tp=8, cp=2, ac="layers", ac_layers=40),
    },
    "llama2_70b 64k (128 GPUs)": {
        "published: tp8 pp8 dp2 interleaved, 256 microbatches": layout(L70, 65536, 128, 512, tp=8, pp=8,
                                                                       schedule="interleaved_1f1b", local=256),
        "tp8 pp8 dp2 interleaved, 32 microbatches x 8 accum": layout(L70, 65536, 128, 512, tp=8, pp=8,
                                                                     schedule="interleaved_1f1b", local=32),
        "tp8 pp4 cp2 dp2 interleaved, 16 microbatches x 16 accum": layout(L70, 65536, 128, 512, tp=8, pp=4, cp=2,
                                                                          schedule="interleaved_1f1b", local=16),
        "tp8 cp2 fsdp8": layout(L70, 65536, 128, 512, tp=8, cp=2),
        "tp8 cp4 fsdp4": layout(L70, 65536, 128, 512, tp=8, cp=4),
        "tp4 cp4 fsdp8": layout(L70, 65536, 128, 512, tp=4, cp=4),
        "tp8 cp4 fsdp4 layers 40": layout(L70, 65536, 128, 512, tp=8, cp=4, ac="layers", ac_layers=40),
    },
    "internlm_7b 32k": {
        "8 GPUs: fsdp8": layout(I7, 32768, 8, 128),
        "8 GPUs: cp2 fsdp4": layout(I7, 32768, 8, 128, cp=2),
        "8 GPUs: tp2 fsdp4": layout(I7, 32768, 8, 128, tp=2),
        "8 GPUs: fsdp8 layers 16": layout(I7, 32768, 8, 128, ac="layers", ac_layers=16),
        "8 GPUs: cp2 fsdp4 layers 20": layout(I7, 32768, 8, 128, cp=2, ac="layers", ac_layers=20),
        "16 GPUs: fsdp16": layout(I7, 32768, 16, 128),
        "16 GPUs: cp2 fsdp8": layout(I7, 32768, 16, 128, cp=2),
    },
    "qwen_14b 32k": {
        "8 GPUs: fsdp8": layout(Q14, 32768, 8, 128),
        "8 GPUs: cp2 fsdp4": layout(Q14, 32768, 8, 128, cp=2),
        "8 GPUs: tp2 fsdp4": layout(Q14, 32768, 8, 128, tp=2),
        "8 GPUs: cp2 fsdp4 layers 34": layout(Q14, 32768, 8, 128, cp=2, ac="layers", ac_layers=34),
        "16 GPUs: fsdp16": layout(Q14, 32768, 16, 128),
        "16 GPUs: cp2 fsdp8": layout(Q14, 32768, 16, 128, cp=2),
        "16 GPUs: fsdp16 layers 20": layout(Q14, 32768, 16, 128, ac="layers", ac_layers=20),
    },
}


def plan_candidate(row: str, name: str, ends_only: bool = True) -> dict:
    recipe, gpus, overrides = LONG_CONTEXT[row][name]
    out = {"row": row, "candidate": name, "gpus": gpus, "overrides": overrides}
    started = time.perf_counter()
    try:
        config = planning_config(load_config(provenance.REPO / recipe, overrides))
        args = gpu_model_args(config)
        # NOTE: pipelined candidates plan their first and last ranks only by default, to fit the CPU time
        # (--search and plan_layout without ends_only plan every rank).
        plan = plan_layout(config, args, gpus, GPU, DEFAULT_EFFICIENCY, ends_only=ends_only)
        out.update(summary(plan))
        h100 = on_gpu(plan, GPUS["h100"])  # the step time on H100 from the same measurement (same 80 GiB)
        out["h100_tokens_per_s_per_gpu"], out["h100_mfu"] = h100.tokens_per_second_per_gpu, h100.mfu
    except (ConfigError, ValueError, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    out["seconds"] = time.perf_counter() - started
    print(json.dumps(out), flush=True)
    return out


def summary(plan) -> dict:
    worst = max(plan.roles, key=lambda r: r.peak_bytes)
    return {"layout": plan.layout(), "peak_gib": plan.peak_bytes / 2**30, "fits": plan.fits,
            "usable_gib": plan.gpu.usable_memory_bytes / 2**30,
            "tokens_per_s_per_gpu": plan.tokens_per_second_per_gpu, "mfu": plan.mfu,
            "breakdown_gib": {k: round(v / 2**30, 2) for k, v in worst.breakdown.items() if v},
            "schedule": plan.schedule, "microbatches": plan.num_microbatches, "bubble": plan.bubble}


def plan_row(name: str, do_search: bool, max_measured: int = 4, ends_only: bool = False) -> dict:
    (recipe, gpus, overrides), published_tps, published_gb = ROWS[name]
    row = {"row": name, "gpus": gpus, "published_tokens_per_s_per_gpu": published_tps,
           "published_memory_gb": published_gb, "overrides": overrides}
    started = time.perf_counter()
    try:
        config = planning_config(load_config(provenance.REPO / recipe, overrides))
        args = gpu_model_args(config)
        plan = plan_layout(config, args, gpus, GPU, DEFAULT_EFFICIENCY, ends_only=ends_only)
        row["published_layout"] = summary(plan)
        row["published_layout"]["ranks_planned"] = "first and last pipeline ranks" if ends_only else "all"
        row["published_layout"]["seconds"] = time.perf_counter() - started
        if do_search:
            best = search(config, gpus, GPU, DEFAULT_EFFICIENCY, top=1, max_measured=max_measured)[0]
            row["best_layout"] = {"layout": f"{best.plan.layout()} {best.layout.schedule} ac {best.layout.ac_mode}",
                                  "overrides": best.overrides, "peak_gib": best.plan.peak_bytes / 2**30,
                                  "tokens_per_s_per_gpu": best.plan.tokens_per_second_per_gpu, "mfu": best.plan.mfu}
    except (ConfigError, ValueError, RuntimeError) as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    row["seconds"] = time.perf_counter() - started
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--ends-only", action="store_true", help="plan only the first and last pipeline ranks")
    parser.add_argument("--max-measured", type=int, default=4, help="layouts measured per search at most")
    parser.add_argument("--long-context", nargs="*", default=list(LONG_CONTEXT))
    parser.add_argument("--candidates", nargs="*", default=[], help="only candidates whose name contains one of these")
    parser.add_argument("--out", type=Path, default=provenance.REPO / "bench/results/plan_baselines.json")
    opts = parser.parse_args(argv)
    provenance.check_destination(opts.out)
    rows = [plan_row(name, not opts.no_search, opts.max_measured, opts.ends_only) for name in opts.rows]
    names = [(row, name) for row in opts.long_context for name in LONG_CONTEXT[row]]
    if opts.candidates:
        names = [(row, name) for row, name in names if any(c in name for c in opts.candidates)]
    long_context = [plan_candidate(row, name) for row, name in names]
    report = {"benchmark": "plan_baselines", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/plan_baselines.py " + " ".join(sys.argv[1:]), "commit": provenance.commit(),
              "working_tree_dirty": provenance.tree_dirty(), "gpu": GPU.name, "efficiency": DEFAULT_EFFICIENCY,
              "efficiency_note": "an assumption, not calibrated on a GPU", "rows": rows,
              "long_context": long_context}
    provenance.write_report(opts.out, report)


if __name__ == "__main__":
    main()
