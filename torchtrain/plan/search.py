"""``--search``: the fastest layouts of N GPUs that fit, for the recipe's model and global batch.

Enumerates tensor parallel sizes (divisors of the heads, FFN, vocabulary and sequence, within a
node), context parallel (when the trainer supports it), pipeline sizes and schedules, HSDP
splits, activation checkpointing modes (whatever ``parallel.ac.MODES`` lists), microbatch sizes and
FSDP resharding, keeping the recipe's global batch (samples x sequence). Each layout is first
estimated in closed form (:mod:`torchtrain.plan.estimate`, microseconds); those that fit there
are measured with the fake step in order of estimated speed until ``top`` of them fit when
measured. A measured layout plans every pipeline rank (ranks whose stages hold alike blocks share one
measurement, see :func:`torchtrain.plan.planner.measure_pipeline_ranks`).

Each candidate is a whole run: the recipe's model, data and training sections with the layout's keys,
every other [parallelism] and [activation_checkpoint] key at its default, and the overrides that turn
the recipe file into exactly that run (:func:`overrides_of`).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass

import torch

from torchtrain.checks import check_run
from torchtrain.config import ActivationCheckpoint, Config, ConfigError, Parallelism, load_config
from torchtrain.models import ModelArgs
from torchtrain.parallel.ac import MODES
from torchtrain.parallel.pp import check_schedule
from torchtrain.plan.estimate import Layout, estimate
from torchtrain.plan.planner import Plan, plan_layout
from torchtrain.plan.timing import Device, GPUS_PER_NODE

MAX_MEASURED = 12  # layouts measured per search at most
DEFAULTS = Config().source  # the source of a config read from no recipe file


@dataclass
class Candidate:
    layout: Layout
    overrides: list[str]
    estimated_bytes: float
    estimated_seconds: float
    config: Config  # what the overrides make of the recipe, with compile as the planner plans it
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


def candidate_config(config: Config, layout: Layout, checkpointed_blocks: int) -> Config:
    """The run ``layout`` stands for: the recipe's model, data, training and other sections, and every
    [parallelism] and [activation_checkpoint] key at its default unless the layout chooses it.

    NOTE: starting from defaults rather than from the recipe's own layout keys is what keeps a
    candidate consistent: a recipe's ``activation_checkpoint.num_layers`` next to another mode, or its
    ``pp_layers_per_stage``, ``pp_microbatches`` or ``cp_rotate``, belong to the recipe's layout, not to
    this one (a leftover ``num_layers`` would make every candidate but the "layers" ones fail check_run).
    """
    parallelism = Parallelism(dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, tp=layout.tp,
                              pp=layout.pp, cp=layout.cp, fsdp_reshard_after_forward=layout.reshard)
    if layout.pp > 1:
        parallelism.pp_schedule = layout.schedule
        parallelism.pp_stages_per_rank = layout.stages_per_rank
        parallelism.pp_microbatches = layout.num_microbatches
    ac = ActivationCheckpoint(mode=layout.ac_mode,
                              num_layers=checkpointed_blocks if layout.ac_mode == "layers" else 0)
    training = dataclasses.replace(config.training, local_batch_size=layout.microbatch * layout.num_microbatches,
                                   grad_accum_steps=layout.grad_accum)
    # Compiled blocks are planned as eager ones (see cli.planning_config).
    compile_ = dataclasses.replace(config.compile, enabled=False)
    return dataclasses.replace(config, training=training, parallelism=parallelism, activation_checkpoint=ac,
                               compile=compile_)


def chosen_keys(layout: Layout) -> list[tuple[str, str]]:
    """The keys the search chooses for ``layout``, printed even where the recipe has the same value
    (a candidate reads as the whole layout, not as a difference from the recipe's)."""
    keys = [("training", "seq_len"), ("parallelism", "tp"), ("parallelism", "cp"), ("parallelism", "pp"),
            ("parallelism", "dp_replicate"), ("parallelism", "dp_shard"), ("training", "local_batch_size"),
            ("training", "grad_accum_steps"), ("activation_checkpoint", "mode"),
            ("parallelism", "fsdp_reshard_after_forward")]
    if layout.pp > 1:
        keys += [("parallelism", "pp_schedule"), ("parallelism", "pp_microbatches"),
                 ("parallelism", "pp_stages_per_rank")]
    if layout.ac_mode == "layers":
        keys.append(("activation_checkpoint", "num_layers"))
    return keys


# Not part of a candidate's overrides: the planner plans compiled blocks as eager ones (cli.planning_config),
# while the run itself should compile as the recipe says.
_NOT_PRINTED = ("compile",)


def overrides_of(recipe: Config, candidate: Config, chosen: list[tuple[str, str]]) -> list[str]:
    """``--section.key value`` overrides that turn ``recipe`` (the recipe file alone) into ``candidate``:
    the chosen keys, ``model.max_seq_len`` when set, then every other key whose value differs (the
    recipe's layout keys the candidate resets, and the command line's own overrides)."""
    keys = list(chosen)
    if candidate.model.max_seq_len:  # a long-context run needs the longer RoPE table to be reproduced
        keys.insert(1, ("model", "max_seq_len"))
    theirs, ours = recipe.to_dict(), candidate.to_dict()
    for section, values in ours.items():
        if section in _NOT_PRINTED:
            continue
        keys += [(section, key) for key, value in values.items()
                 if value != theirs[section][key] and (section, key) not in keys]
    return [text for section, key in keys for text in (f"--{section}.{key}", _as_text(ours[section][key]))]


def _as_text(value) -> str:
    """A value as the command line reads it back (config.json_or_text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value) if isinstance(value, str) else repr(value)


def recipe_config(config: Config) -> Config:
    """The recipe file alone, without the command line's overrides: what printed overrides apply to."""
    return load_config(None if config.source == DEFAULTS else config.source)


def search(config: Config, world_size: int, gpu: Device, efficiency: float, top: int = 5,
           max_measured: int = MAX_MEASURED) -> list[Candidate]:
    """The ``top`` fastest measured layouts that fit, fastest first; ConfigError if none fits.

    At most ``max_measured`` layouts (the fastest by the closed-form estimate) are measured. Each
    candidate's ``overrides`` reproduce its ``config`` from the recipe file (``config.source``)."""
    from torchtrain.plan.fake_step import gpu_model_args

    args = gpu_model_args(config)
    seq = config.training.seq_len
    tokens_per_gpu = config.training.local_batch_size * config.training.grad_accum_steps * _recipe_dp(
        config, world_size) * seq / world_size
    recipe = recipe_config(config)
    enumerated = layouts(config, args, world_size)
    if not enumerated:
        raise ConfigError(f"{config.source}: {world_size} GPUs do not factor into any layout of model "
                          f"{config.model.name!r} with the recipe's global batch; try another --ngpu")
    candidates, rejected = [], []
    for layout in enumerated:
        # "layers" checkpoints half of the blocks: between none and full
        layout_config = candidate_config(config, layout, args.num_layers // 2)
        try:
            check_run(layout_config, args, world_size, torch.device("cuda"))
        except ConfigError as e:
            rejected.append(str(e))
            continue
        memory, seconds = estimate(args, layout, seq, gpu, efficiency, tokens_per_gpu)
        overrides = overrides_of(recipe, layout_config, chosen_keys(layout))
        candidates.append(Candidate(layout, overrides, memory, seconds, layout_config))
    if not candidates:  # then a key of the recipe's own is at fault, and the check's message names it
        raise ConfigError(f"no layout of {world_size} GPUs passes the trainer's checks; the first refused: "
                          f"{rejected[0]}")
    plausible = sorted((c for c in candidates if c.estimated_bytes <= 1.15 * gpu.usable_memory_bytes),
                       key=lambda c: c.estimated_seconds)
    if not plausible:
        least = min(candidates, key=lambda c: c.estimated_bytes)
        raise ConfigError(f"model {config.model.name!r} at seq_len {seq} does not fit on {world_size} x {gpu.name} "
                          f"in any layout: the smallest estimate is {least.estimated_bytes / 2**30:.0f} GiB per GPU "
                          f"against {gpu.usable_memory_bytes / 2**30:.0f} GiB usable; use more GPUs or a larger GPU")
    found, failed = [], []
    for candidate in plausible[:max_measured]:
        # Every pipeline rank is planned (ranks holding alike stages are measured once): a middle rank can
        # peak above the ends (more blocks than the last, more in flight), so the ends alone could miss it.
        try:
            candidate.plan = plan_layout(candidate.config, args, world_size, gpu, efficiency)
        except ConfigError as e:  # the layout passed check_run; kept for the message rather than hidden
            failed.append(str(e))
            continue
        if candidate.plan.fits:
            found.append(candidate)
            if len(found) == top:
                break
    if not found:
        raise ConfigError(f"model {config.model.name!r} at seq_len {seq} does not fit on {world_size} x {gpu.name}: "
                          f"the {min(max_measured, len(plausible))} most promising layouts measured over capacity"
                          + (f" ({len(failed)} of them could not be planned, e.g. {failed[0]})" if failed else ""))
    return sorted(found, key=lambda c: c.plan.step_seconds)


def print_search(config: Config, found: list[Candidate], gpu: Device) -> None:
    print(f"{config.source}: {config.model.name}, seq_len {config.training.seq_len}, fastest layouts that fit on "
          f"{gpu.name} (measured peak / usable {gpu.usable_memory_bytes / 2**30:.1f} GiB):")
    for i, c in enumerate(found, 1):
        plan = c.plan
        print(f"{i}. {plan.layout()} {c.layout.schedule} mb {c.layout.microbatch} ac {c.layout.ac_mode} reshard "
              f"{c.layout.reshard}: {plan.tokens_per_second_per_gpu:,.0f} tokens/s/GPU, MFU {100 * plan.mfu:.1f}%, "
              f"peak {plan.peak_bytes / 2**30:.1f} GiB")
        print(f"   {shlex.join(c.overrides)}")
