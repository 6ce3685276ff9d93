"""The dry layout check: build every pipeline stage's share of the model on the meta device.

For each pipeline rank, one process plays the first rank of that stage under a fake process group
of the full world size: it resolves the mesh, builds the real model on the meta device, splits it
into that rank's stages and applies the real tensor parallel, activation checkpointing and FSDP
code to it, then reports the parameters the rank holds. Nothing is allocated and nothing runs, so
a 70B model at 128 ranks is checked in seconds; :mod:`torchtrain.plan.planner` goes further and
runs a step.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from torchtrain.config import Config, ConfigError
from torchtrain.checks import check_run
from torchtrain.parallel import build_mesh


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
    from torchtrain.models.shape import model_args_for
    from torchtrain.train import build_model  # the trainer's own code path

    # Compile wraps lazily and needs a working backend on the target device; it adds no parameters.
    config = dataclasses.replace(config, compile=dataclasses.replace(config.compile, enabled=False))
    model_args = model_args_for(config, torch.device("cuda"))  # the layout of a GPU run
    dims = check_run(config, model_args, world_size, torch.device("cuda"))
    ranks_per_stage = world_size // dims.pp
    reports = []
    for pp_rank in range(dims.pp):
        rank = pp_rank * ranks_per_stage
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
        try:
            mesh = build_mesh(dims, torch.device("cpu"))
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
