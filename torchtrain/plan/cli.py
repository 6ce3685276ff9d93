"""``python -m torchtrain.plan``: memory, FLOPs, traffic and step time of a recipe's layout, or a search.

    python -m torchtrain.plan --config recipes/X.toml [--ngpu N] [--gpu a100-80g|h100|h200|b200]
                              [--efficiency F] [--search [--top K]] [--check] [--exact]
                              [--section.key value ...]

Without ``--search`` it plans the recipe's own layout; with it, it ranks the layouts of ``--ngpu``
GPUs and prints the fastest that fit with the overrides that select them. ``--check`` only builds
the layout on the meta device (seconds, no step). Impossible requests get one line on stderr and
exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from torchtrain.config import Config, ConfigError, load_config, recipe_help
from torchtrain.parallel import ParallelDims
from torchtrain.parallel.mesh import MESH_DIMS
from torchtrain.parallel.pp import pipeline_settings
from torchtrain.plan.layout import check_recipe, world_size_of
from torchtrain.plan.planner import IN_FLIGHT, Plan, plan_layout
from torchtrain.plan.timing import DEFAULT_EFFICIENCY, GPUS, gpu_named

GIB = 2**30


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m torchtrain.plan", description=__doc__.split("\n\n")[0],
                                     epilog=recipe_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe to plan: a TOML file or a packaged recipe's name")
    parser.add_argument("--ngpu", type=int, default=None, help="world size (default: the recipe's sizes multiplied)")
    parser.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    parser.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                        help=f"achieved fraction of the bf16 peak (default {DEFAULT_EFFICIENCY}, an assumption)")
    parser.add_argument("--search", action="store_true", help="rank the layouts of --ngpu GPUs")
    parser.add_argument("--top", type=int, default=5, help="layouts to print with --search")
    parser.add_argument("--check", action="store_true", help="only build the layout (no step, no timing)")
    parser.add_argument("--exact", action="store_true",
                        help="trace every block (default: a few per pipeline stage, extrapolated to all of them)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    try:
        if not 0 < args.efficiency <= 1:
            raise ConfigError(f"--efficiency {args.efficiency} is invalid; it is a fraction of the peak in (0, 1]")
        gpu = gpu_named(args.gpu)
        config = planning_config(load_config(args.config, rest))
        if args.search:
            from torchtrain.plan.search import search, print_search

            world_size = args.ngpu or world_size_of(config, None)
            print_search(config, search(config, world_size, gpu, args.efficiency, args.top), gpu)
            return
        world_size = world_size_of(config, args.ngpu)
        if args.check:
            print_check(config, world_size)
            return
        from torchtrain.plan.fake_step import gpu_model_args

        plan = plan_layout(config, gpu_model_args(config), world_size, gpu, args.efficiency, exact=args.exact)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print_plan(plan)


def planning_config(config: Config) -> Config:
    """The recipe as planned: compiled blocks are planned as eager ones.

    NOTE: torch.compile cannot run under the fake process group without a GPU backend, and it
    adds no parameters; the compiled blocks of a GPU run save somewhat less than eager ones
    (see parallel/compile.py), so the plan's activations are an upper bound there.
    """
    return dataclasses.replace(config, compile=dataclasses.replace(config.compile, enabled=False))


def print_check(config: Config, world_size: int) -> None:
    reports = check_recipe(config, world_size)
    dims = ParallelDims.resolve(config.parallelism, world_size, config.source)
    print(header(config, dims, world_size))
    for r in reports:
        print(f"  rank {r.rank:>5}: {r.stages:<40} {r.num_params / 1e9:8.3f} B parameters "
              f"({r.num_params * 4 / GIB:.1f} GiB fp32)")


def header(config: Config, dims: ParallelDims, world_size: int) -> str:
    layout = " x ".join(f"{name} {size}" for name, size in zip(MESH_DIMS, dims.sizes) if size > 1) or "1 rank"
    lines = [f"{config.source}: {config.model.name} on {world_size} ranks: {layout}"]
    if dims.pp > 1:
        pipe = pipeline_settings(config, dims.pp)
        lines.append(f"pipeline: {pipe.schedule}, {pipe.num_stages} stages, {pipe.num_microbatches} microbatches")
    return "\n".join(lines)


def print_plan(plan: Plan) -> None:
    print(header(plan.config, plan.dims, plan.world_size) + f" (bubble {100 * plan.bubble:.0f}%)" * (plan.dims.pp > 1))
    t = plan.config.training
    print(f"batch: {t.local_batch_size} x {t.seq_len} tokens per data-parallel rank, {t.grad_accum_steps} accumulation "
          f"steps, activation checkpointing {plan.config.activation_checkpoint.mode}, FSDP reshard "
          f"{plan.config.parallelism.fsdp_reshard_after_forward}")
    print(f"model FLOPs per token (6N + 12·L·d·s): {plan.flops_per_token / 1e9:.1f} GFLOP")
    print(f"per pipeline rank, on {plan.gpu.name} ({plan.gpu.memory_bytes / GIB:.1f} GiB, "
          f"{plan.gpu.usable_memory_bytes / GIB:.1f} usable):")
    for role in plan.roles:
        print(format_role(role, plan))
    verdict = "fits" if plan.fits else "DOES NOT FIT (try --search)"
    print(f"step: {plan.step_seconds:.2f} s predicted, {plan.tokens_per_second_per_gpu:,.0f} tokens/s per GPU, "
          f"MFU {100 * plan.mfu:.1f}% (efficiency {plan.efficiency:.2f}, an assumption); peak "
          f"{plan.peak_bytes / GIB:.1f} GiB: {verdict}")
    for note in plan.notes:
        print(f"note: {note}")


def format_role(role, plan: Plan) -> str:
    names = {"parameters": "params", "gathered parameters": "gathered", "cast parameters": "casts",
             "gradients": "grads",
             "optimizer state": "optim", "activations": "acts", "temporaries": "temps",
             "communication buffers": "comm bufs", IN_FLIGHT: "in-flight acts"}
    parts = " | ".join(f"{names.get(k, k)} {v / GIB:.2f}" for k, v in role.breakdown.items() if v)
    model_share = plan.flops_per_token * plan.tokens_per_step_per_gpu
    traffic = ", ".join(f"{dim} {v.total_wire_bytes / 1e9:.2f} GB ({', '.join(f'{n} {k}' for k, n in v.calls.items() if n)})"
                        for dim, v in role.comm_per_step.items() if v.total_wire_bytes)
    in_flight = f", microbatches in flight {role.in_flight}" if role.in_flight else ""
    time = role.time
    return (f"  rank {role.rank:>5}: {role.stages} ({role.num_params / 1e9:.3f} B parameters held{in_flight})\n"
            f"    peak {role.peak_bytes / GIB:.2f} GiB = {parts} (GiB)\n"
            f"    executes {role.flops_per_step / 1e12:.1f} TFLOP per step ({role.flops_per_step / model_share:.2f}x "
            f"the model FLOPs of its tokens); traffic per step: {traffic or 'none'}\n"
            f"    time: compute {time.compute_s:.2f} s, exposed collectives {time.tp_s:.2f} s, FSDP "
            f"{time.fsdp_s:.2f} s ({time.exposed_fsdp_s:.2f} exposed), pipeline sends {time.pp_s:.2f} s, "
            f"bubble {time.bubble_s:.2f} s")
