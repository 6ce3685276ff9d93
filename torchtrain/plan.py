"""Check a recipe's parallel layout at its real world size, on a CPU, without the GPUs.

    python -m torchtrain.plan --config recipes/llama2_70b_2k.toml [--ngpu N] [--section.key value ...]

For each pipeline rank, one process plays the first rank of that pipeline stage under a fake
process group of the full world size: it resolves the mesh, builds the real model on the meta
device, splits it into that rank's stages and applies the real tensor parallel, activation
checkpointing and FSDP code to it, then reports the parameters the rank holds. Nothing is
allocated and nothing communicates, so a 70B model at 128 ranks is checked in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtrain.config import Config, ConfigError, load_config, parse_args
from torchtrain.parallel import ParallelDims, build_mesh, check_layout
from torchtrain.parallel.mesh import MESH_DIMS, pipeline_settings


@dataclasses.dataclass
class RankReport:
    rank: int
    stages: str
    num_params: int  # elements this rank stores (its shards)


def world_size_of(config: Config, ngpu: int | None) -> int:
    """``--ngpu``, or the product of the recipe's sizes when none of them is -1."""
    if ngpu is not None:
        return ngpu
    p = config.parallelism
    if p.dp_shard == -1:
        raise ConfigError(f"{config.source}: parallelism.dp_shard = -1 takes whatever the launch gives; "
                          "pass --ngpu N to say how many GPUs to check the layout for")
    return p.pp * p.dp_replicate * p.dp_shard * p.cp * p.tp


def check_recipe(config: Config, world_size: int) -> list[RankReport]:
    """Build the layout for the first rank of every pipeline stage; raise ConfigError if impossible."""
    from torchtrain.train import build_model, model_args_for  # the trainer's own code path

    # Compile wraps lazily and needs a working backend on the target device; it adds no parameters.
    config = dataclasses.replace(config, compile=dataclasses.replace(config.compile, enabled=False))
    dims = ParallelDims.resolve(config.parallelism, world_size, config.source)
    model_args = model_args_for(config, torch.device("cuda"))  # the layout of a GPU run
    check_layout(dims, config, model_args)
    ranks_per_stage = world_size // dims.pp
    reports = []
    for pp_rank in range(dims.pp):
        rank = pp_rank * ranks_per_stage
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
        try:
            mesh, _ = build_mesh(dims, torch.device("cpu"))
            parts = build_model(model_args, config, mesh, dims, torch.device("cpu"), torch.float32, materialize=False)
            held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parts.model.parameters())
            names = [f"{stage_layers(stage)}" for stage in parts.stages]
            reports.append(RankReport(rank, " + ".join(names), held))
        finally:
            dist.destroy_process_group()
    return reports


def stage_layers(stage: torch.nn.Module) -> str:
    keys = [int(k) for k in stage.layers.keys()]
    ends = ("embed " if stage.tok_embeddings is not None else "") + (
        f"blocks {min(keys)}-{max(keys)}" if keys else "no blocks") + (" + output" if stage.output is not None else "")
    return ends


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ngpu", type=int, default=None, help="world size (default: the recipe's sizes multiplied)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(*parse_args(rest))
        world_size = world_size_of(config, args.ngpu)
        reports = check_recipe(config, world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dims = ParallelDims.resolve(config.parallelism, world_size, config.source)
    layout = " x ".join(f"{name} {size}" for name, size in zip(MESH_DIMS, dims.sizes) if size > 1) or "1 rank"
    print(f"{config.source}: {config.model.name} on {world_size} ranks: {layout}")
    if dims.pp > 1:
        pipe = pipeline_settings(config, dims)
        print(f"pipeline: {pipe.schedule}, {pipe.num_stages} stages, {pipe.num_microbatches} microbatches")
    for r in reports:
        print(f"  rank {r.rank:>5}: {r.stages:<40} {r.num_params / 1e9:8.3f} B parameters "
              f"({r.num_params * 4 / 2**30:.1f} GiB fp32)")


if __name__ == "__main__":
    main()
