"""Parallelism applied from outside the model, in the order TP -> AC -> compile -> FSDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from torchtrain.config import Config
from torchtrain.parallel.ac import apply_activation_checkpointing
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.fsdp import apply_fsdp
from torchtrain.parallel.mesh import ParallelDims, build_mesh, init_distributed

__all__ = ["ParallelDims", "build_mesh", "init_distributed", "parallelize"]


def parallelize(model: nn.Module, config: Config, mesh: DeviceMesh, dims: ParallelDims,
                device: torch.device, param_dtype: torch.dtype) -> nn.Module:
    """Apply every configured parallelism to ``model`` (on the meta device) and return it."""
    apply_activation_checkpointing(model, config.activation_checkpoint.mode)
    if config.compile.enabled:
        apply_compile(model, config.compile.backend, device)
    if dims.dp > 1:
        apply_fsdp(model, mesh["dp_replicate", "dp_shard"], param_dtype)
    return model
