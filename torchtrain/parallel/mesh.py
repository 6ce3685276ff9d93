"""Process group start-up and the one named DeviceMesh every parallelism is applied on."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtrain.config import Config, ConfigError, Parallelism
from torchtrain.models.llama import ModelArgs

# Mesh dimensions, outermost first. NOTE: tp is innermost so its ranks are neighbours (one node,
# fastest links); pp outermost because it only sends activations between stages.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def init_distributed(device: torch.device) -> None:
    """Join the job's process group, or make a one-process group when not launched by torchrun.

    Running every job (even one process) inside a process group keeps one code path: DCP, the
    device mesh and the collectives behave the same at world size 1 as at 1,000.
    """
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each mesh dimension, resolved (dp_shard = -1 filled in) and checked."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @classmethod
    def resolve(cls, config: Parallelism, world_size: int, source: str = "recipe") -> "ParallelDims":
        fixed = config.pp * config.dp_replicate * config.cp * config.tp
        dp_shard = config.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    f"{source}: parallelism pp={config.pp} x dp_replicate={config.dp_replicate} x cp={config.cp} "
                    f"x tp={config.tp} = {fixed} does not divide the world size {world_size}"
                )
            dp_shard = world_size // fixed
        dims = cls(config.pp, config.dp_replicate, dp_shard, config.cp, config.tp)
        if math.prod(dims.sizes) != world_size:
            raise ConfigError(
                f"{source}: parallelism sizes {dict(zip(MESH_DIMS, dims.sizes))} multiply to "
                f"{math.prod(dims.sizes)}, but {world_size} processes were launched; make the product equal "
                "the world size (dp_shard = -1 takes whatever is left)"
            )
        unsupported = {name: size for name, size in zip(MESH_DIMS, dims.sizes)
                       if size > 1 and name not in SUPPORTED_DIMS}
        if unsupported:
            raise ConfigError(
                f"{source}: parallelism {unsupported} is not available in this version of torchtrain; "
                f"the dimensions that can be larger than 1 are: {', '.join(SUPPORTED_DIMS)}"
            )
        return dims

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard


# Context parallelism plugs into the same mesh in a later version; every other dimension is applied.
SUPPORTED_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")

# Pipeline schedules that run one stage per rank, and those that interleave several.
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "interleaved_zb", "zbv")


@dataclass(frozen=True)
class PipelineSettings:
    """The recipe's pipeline settings with their defaults (0 = automatic) filled in."""

    schedule: str
    stages_per_rank: int
    num_stages: int
    num_microbatches: int


def pipeline_settings(config: Config, dims: ParallelDims) -> PipelineSettings:
    p = config.parallelism
    stages_per_rank = p.pp_stages_per_rank or (1 if p.pp_schedule in SINGLE_STAGE_SCHEDULES else 2)
    microbatches = p.pp_microbatches or config.training.local_batch_size
    return PipelineSettings(p.pp_schedule, stages_per_rank, dims.pp * stages_per_rank, microbatches)


def check_layout(dims: ParallelDims, config: Config, model_args: ModelArgs) -> None:
    """Reject every layout the model or the batch cannot be split into, before anything is built.

    Each message names the recipe key to change and what would work.
    """
    source, p, args = config.source, config.parallelism, model_args

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key} = {_value_of(config, key)!r} is invalid for model "
                          f"{config.model.name!r}: {why}")

    if dims.tp > 1:
        for what, size in (("num_heads", args.num_heads), ("num_kv_heads", args.num_kv_heads),
                           ("ffn_dim", args.ffn_dim), ("vocab_size", args.vocab_size)):
            if size % dims.tp:
                fail("parallelism.tp", f"tensor parallelism splits {what} ({size}) across the tp ranks, so tp "
                     f"must divide it; valid tp: {_divisors_of_all(args)}")
        if config.training.seq_len % dims.tp:
            fail("parallelism.tp", f"sequence parallelism splits training.seq_len ({config.training.seq_len}) "
                 "across the tp ranks, so tp must divide it")
    if dims.pp > 1:
        pipe = pipeline_settings(config, dims)
        if p.pp_schedule in SINGLE_STAGE_SCHEDULES and pipe.stages_per_rank != 1:
            fail("parallelism.pp_stages_per_rank", f"schedule {p.pp_schedule!r} runs one stage per rank; use "
                 f"{', '.join(MULTI_STAGE_SCHEDULES)} for several")
        if p.pp_schedule == "zbv" and pipe.stages_per_rank != 2:
            fail("parallelism.pp_stages_per_rank", "the zbv schedule places exactly 2 stages per rank (a V)")
        if p.pp_schedule in MULTI_STAGE_SCHEDULES and pipe.stages_per_rank < 2:
            fail("parallelism.pp_stages_per_rank", f"schedule {p.pp_schedule!r} interleaves 2 or more stages per "
                 "rank; use gpipe or 1f1b for one")
        if pipe.num_stages > args.num_layers:
            fail("parallelism.pp", f"pp x stages per rank = {pipe.num_stages} stages, but the model has only "
                 f"{args.num_layers} blocks; every stage needs at least one")
        if p.pp_layers_per_stage and (len(p.pp_layers_per_stage) != pipe.num_stages
                                      or sum(p.pp_layers_per_stage) != args.num_layers
                                      or min(p.pp_layers_per_stage) < 1):
            fail("parallelism.pp_layers_per_stage", f"it must list {pipe.num_stages} positive block counts "
                 f"(pp x stages per rank), one per stage in order, summing to {args.num_layers}")
        if config.training.local_batch_size % pipe.num_microbatches:
            fail("parallelism.pp_microbatches", f"it must divide training.local_batch_size "
                 f"({config.training.local_batch_size}) into equal microbatches")
        if p.pp_schedule == "1f1b" and pipe.num_microbatches < dims.pp:
            fail("parallelism.pp_microbatches", f"1f1b needs at least as many microbatches as pipeline ranks "
                 f"({dims.pp}); raise training.local_batch_size or pp_microbatches")
        if p.pp_schedule in MULTI_STAGE_SCHEDULES and pipe.num_microbatches % dims.pp:
            fail("parallelism.pp_microbatches", f"schedule {p.pp_schedule!r} runs the microbatches in rounds of "
                 f"pp = {dims.pp}, so their number ({pipe.num_microbatches}) must be a multiple of {dims.pp}")


def _value_of(config: Config, key: str):
    section, name = key.split(".")
    if (section, name) == ("parallelism", "pp_microbatches"):
        return pipeline_settings(config, ParallelDims(config.parallelism.pp, 1, 1, 1, 1)).num_microbatches
    return getattr(getattr(config, section), name)


def _divisors_of_all(args: ModelArgs) -> list[int]:
    sizes = (args.num_heads, args.num_kv_heads, args.ffn_dim, args.vocab_size)
    return [d for d in range(1, args.num_kv_heads + 1) if all(size % d == 0 for size in sizes)]


def build_mesh(dims: ParallelDims, device: torch.device) -> tuple[DeviceMesh, DeviceMesh]:
    """The full named mesh, and its data-parallel ranks flattened into one "dp" mesh.

    The "dp" mesh is what data loading and the loss reduction use: ranks that see different data.
    """
    mesh = init_device_mesh(device.type, dims.sizes, mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh, dp_mesh
