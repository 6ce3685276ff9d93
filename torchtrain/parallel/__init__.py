"""Parallelism applied from outside the model, in the order TP -> AC -> compile -> FSDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtrain.config import Config
from torchtrain.parallel.ac import apply_activation_checkpointing
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.fsdp import apply_fsdp
from torchtrain.parallel.mesh import ParallelDims, build_mesh, check_layout, init_distributed
from torchtrain.parallel.tp import apply_tp

__all__ = ["ParallelDims", "build_mesh", "check_layout", "init_distributed", "parallelize"]


def parallelize(model: nn.Module, config: Config, mesh: DeviceMesh, dims: ParallelDims,
                device: torch.device, param_dtype: torch.dtype) -> nn.Module:
    """Apply every configured parallelism to ``model`` (a whole model or one pipeline stage, on the
    meta device) and return it.

    NOTE: the order matters. Tensor parallelism first, so the blocks that are checkpointed and
    compiled already hold DTensor parameters and the compiled graph contains its collectives;
    FSDP last, so it shards the (possibly tensor-parallel) parameters over the data-parallel
    ranks and its hooks wrap the compiled blocks.
    """
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    apply_activation_checkpointing(model, config.activation_checkpoint.mode)
    if config.compile.enabled:
        apply_compile(model, config.compile.backend, device, fuse_projections=dims.tp == 1)
    if dims.dp > 1 or config.parallelism.fsdp_cpu_offload:
        apply_fsdp(model, mesh["dp_replicate", "dp_shard"], param_dtype,
                   config.parallelism.fsdp_reshard_after_forward, config.parallelism.fsdp_cpu_offload,
                   pipelined=dims.pp > 1)
    return model
