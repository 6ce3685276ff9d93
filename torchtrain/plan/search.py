"""``--search``: the fastest layouts of N GPUs that fit, for the recipe's model and global batch.

Enumerates tensor parallel sizes (divisors of the heads, FFN, vocabulary and sequence, within a
node), context parallel (when the trainer supports it), pipeline sizes and schedules, HSDP
splits, activation checkpointing modes (whatever ``parallel.ac.MODES`` lists), microbatch sizes and
FSDP resharding, keeping the recipe's global batch (samples x sequence). Each layout is first
estimated in closed form (:mod:`torchtrain.plan.estimate`, microseconds); those that fit there
are measured with the fake step in order of estimated speed until ``top`` of them fit when
measured. Measured finalists plan their first and last pipeline ranks only (the first holds the
most microbatches in flight, the last the output layer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from torchtrain.config import Config, ConfigError, load_config
from torchtrain.models import ModelArgs
from torchtrain.parallel.ac import MODES
from torchtrain.parallel.pp import check_schedule
from torchtrain.plan.estimate import Layout, estimate
from torchtrain.plan.planner import Plan, plan_layout
from torchtrain.plan.timing import GPU, GPUS_PER_NODE

MAX_MEASURED = 12  # fake-step runs per search at most


@dataclass
class Candidate:
    layout: Layout
    overrides: list[str]
    estimated_bytes: float
    estimated_seconds: float
    plan: Plan | None = None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(config: Config, args: ModelArgs, world_size: int) -> list[Layout]:
    seq = config.training.seq_len
    global_samples = config.training.local_batch_size * config.training.grad_accum_steps * _recipe_dp(config, world_size)
    ac_modes = list(MODES)
    out = []
    for tp in divisors(world_size):
        if tp > GPUS_PER_NODE or any(x % tp for x in (args.num_heads, args.num_kv_heads, args.ffn_dim,
                                                      args.vocab_size, seq)):
            continue
        for cp in divisors(world_size // tp):
            if cp > 8 or seq % (2 * cp * tp) and cp > 1:
                continue
            for pp in divisors(world_size // (tp * cp)):
                if pp > min(16, args.num_layers):
                    continue
                dp = world_size // (tp * cp * pp)
                if global_samples % dp:
                    continue
                out += _rest(tp, cp, pp, dp, global_samples // dp, args, ac_modes)
    return out


def _recipe_dp(config: Config, world_size: int) -> int:
    p = config.parallelism
    fixed = p.pp * p.dp_replicate * p.cp * p.tp
    return p.dp_replicate * (p.dp_shard if p.dp_shard != -1 else world_size // fixed)


def _rest(tp, cp, pp, dp, samples, args, ac_modes) -> list[Layout]:
    out = []
    schedules = [("", 1)] if pp == 1 else [("1f1b", 1)] + ([("interleaved_1f1b", 2)] if 2 * pp <= args.num_layers else [])
    replicates = [1] + [r for r in divisors(dp) if r > 1 and (dp // r) * tp * cp in (GPUS_PER_NODE, 2 * GPUS_PER_NODE)]
    for schedule, per_rank in schedules:
        for microbatch in (1, 2, 4):
            if samples % microbatch:
                continue
            if pp > 1:
                count = samples // microbatch
                try:
                    check_schedule(schedule, pp, per_rank, count)
                except ValueError:
                    continue
                accum = 1
            else:
                count, accum = 1, samples // microbatch
            for replicate in replicates:
                shard = dp // replicate
                reshards = ["default"] if shard == 1 else (["default"] if pp > 1 else ["default", "never"])
                for reshard in reshards:
                    for mode in ac_modes:
                        out.append(Layout(tp, pp, cp, replicate, shard, schedule, per_rank, microbatch, count, accum,
                                          mode, reshard))
    return out


def overrides_of(layout: Layout) -> list[str]:
    local = layout.microbatch * layout.num_microbatches
    o = ["--parallelism.tp", str(layout.tp), "--parallelism.pp", str(layout.pp),
         "--parallelism.dp_replicate", str(layout.dp_replicate), "--parallelism.dp_shard", str(layout.dp_shard),
         "--training.local_batch_size", str(local), "--training.grad_accum_steps", str(layout.grad_accum),
         "--activation_checkpoint.mode", layout.ac_mode,
         "--parallelism.fsdp_reshard_after_forward", layout.reshard, "--parallelism.cp", str(layout.cp)]
    if layout.pp > 1:
        o += ["--parallelism.pp_schedule", layout.schedule, "--parallelism.pp_microbatches", str(layout.num_microbatches),
              "--parallelism.pp_stages_per_rank", str(layout.stages_per_rank)]
    if layout.ac_mode == "layers":
        o += ["--activation_checkpoint.num_layers", "0"]  # replaced per model below
    return o


def search(config: Config, world_size: int, gpu: GPU, efficiency: float, top: int = 5,
           max_measured: int = MAX_MEASURED) -> list[Candidate]:
    """The ``top`` fastest measured layouts that fit, fastest first; ConfigError if none fits.

    At most ``max_measured`` layouts (the fastest by the closed-form estimate) are measured."""
    from torchtrain.models.shape import model_args_for

    args = model_args_for(config, torch.device("cuda"))
    seq = config.training.seq_len
    tokens_per_gpu = config.training.local_batch_size * config.training.grad_accum_steps * _recipe_dp(
        config, world_size) * seq / world_size
    candidates = []
    for layout in layouts(config, args, world_size):
        if layout.ac_mode == "layers":  # checkpoint half of the blocks: between none and full
            layout_overrides = [o if o != "0" else str(args.num_layers // 2) for o in overrides_of(layout)]
        else:
            layout_overrides = overrides_of(layout)
        memory, seconds = estimate(args, layout, seq, gpu, efficiency, tokens_per_gpu)
        candidates.append(Candidate(layout, layout_overrides, memory, seconds))
    if not candidates:
        raise ConfigError(f"{config.source}: {world_size} GPUs do not factor into any layout of model "
                          f"{config.model.name!r} with the recipe's global batch; try another --ngpu")
    plausible = sorted((c for c in candidates if c.estimated_bytes <= 1.15 * gpu.usable_memory_bytes),
                       key=lambda c: c.estimated_seconds)
    if not plausible:
        least = min(candidates, key=lambda c: c.estimated_bytes)
        raise ConfigError(f"model {config.model.name!r} at seq_len {seq} does not fit on {world_size} x {gpu.name} "
                          f"in any layout: the smallest estimate is {least.estimated_bytes / 2**30:.0f} GiB per GPU "
                          f"against {gpu.usable_memory_bytes / 2**30:.0f} GiB usable; use more GPUs or a larger GPU")
    found = []
    for candidate in plausible[:max_measured]:
        layout_config = load_config(config.source if config.source != "<defaults>" else None,
                                    _as_overrides(config) + candidate.overrides)
        layout_config = dataclasses.replace(layout_config, compile=dataclasses.replace(layout_config.compile,
                                                                                      enabled=False))
        try:
            candidate.plan = plan_layout(layout_config, args, world_size, gpu, efficiency, ends_only=True)
        except ConfigError:
            continue
        if candidate.plan.fits:
            found.append(candidate)
            if len(found) == top:
                break
    if not found:
        raise ConfigError(f"model {config.model.name!r} at seq_len {seq} does not fit on {world_size} x {gpu.name}: "
                          f"the {min(max_measured, len(plausible))} most promising layouts measured over capacity")
    return sorted(found, key=lambda c: c.plan.step_seconds)


def _as_overrides(config: Config) -> list[str]:
    """The config's non-default training/model/data values as overrides (the search changes the rest)."""
    t = config.training
    out = ["--model.name", config.model.name, "--training.seq_len", str(t.seq_len),
           "--data.document_mask", str(config.data.document_mask).lower()]
    if config.model.max_seq_len:  # a long-context run raises the model's position limit
        out += ["--model.max_seq_len", str(config.model.max_seq_len)]
    return out


def print_search(config: Config, found: list[Candidate], gpu: GPU) -> None:
    print(f"{config.source}: {config.model.name}, seq_len {config.training.seq_len}, fastest layouts that fit on "
          f"{gpu.name} (measured peak / usable {gpu.usable_memory_bytes / 2**30:.1f} GiB):")
    for i, c in enumerate(found, 1):
        plan = c.plan
        print(f"{i}. {plan.layout()} {c.layout.schedule} mb {c.layout.microbatch} ac {c.layout.ac_mode} reshard "
              f"{c.layout.reshard}: {plan.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, MFU {100 * plan.mfu:.1f}%, "
              f"peak {plan.peak_bytes / 2**30:.1f} GiB")
        print(f"   {' '.join(c.overrides)}")
