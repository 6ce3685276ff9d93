"""Process group start-up and the one named DeviceMesh every parallelism is applied on."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtrain.config import ConfigError, Parallelism

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


# Data parallelism (FSDP2 over dp_shard, replication over dp_replicate) is what the trainer applies
# today; tensor, pipeline and context parallelism plug into the same mesh.
SUPPORTED_DIMS = ("dp_replicate", "dp_shard")


def build_mesh(dims: ParallelDims, device: torch.device) -> tuple[DeviceMesh, DeviceMesh]:
    """The full named mesh, and its data-parallel ranks flattened into one "dp" mesh.

    The "dp" mesh is what data loading and the loss reduction use: ranks that see different data.
    """
    mesh = init_device_mesh(device.type, dims.sizes, mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh, dp_mesh
