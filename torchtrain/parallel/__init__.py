"""Parallelism applied from outside the model, in the order float8 -> TP -> CP -> AC -> compile -> FSDP."""

from __future__ import annotations

import torch
from torch import nn

from torchtrain.config import Config
from torchtrain.parallel.ac import apply_activation_checkpointing
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.cp import apply_cp
from torchtrain.parallel.float8 import apply_float8
from torchtrain.parallel.fsdp import apply_fsdp
from torchtrain.parallel.mesh import Meshes, ParallelDims, build_mesh, check_layout, init_distributed
from torchtrain.parallel.tp import apply_tp, settle_gradients

__all__ = ["Meshes", "ParallelDims", "build_mesh", "check_layout", "init_distributed", "parallelize",
           "settle_gradients"]


def parallelize(model: nn.Module, config: Config, mesh: Meshes, dims: ParallelDims,
                device: torch.device, param_dtype: torch.dtype) -> nn.Module:
    """Apply every configured parallelism to ``model`` (a whole model or one pipeline stage, on the
    meta device) and return it.

    NOTE: the order matters. Tensor parallelism first, so the blocks that are checkpointed and
    compiled already hold DTensor parameters and the compiled graph contains its collectives;
    FSDP last, so it shards the (possibly tensor-parallel) parameters over the data-parallel
    ranks and its hooks wrap the compiled blocks.
    """
    if config.float8.enabled:  # first: the parallel wrappers below then see the float8 modules and weights
        apply_float8(model, config.float8)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    if dims.cp > 1:
        apply_cp(model, mesh["cp"], config.parallelism.cp_rotate)
    ac = config.activation_checkpoint
    # NOTE: checkpointing goes inside the compiled block (the compiled region is the checkpointed
    # block), except whole-block checkpoints (full, layers) under tensor parallelism: traced inside,
    # their recomputation needs the DeviceMesh, which AOTAutograd files among the tensors saved for
    # the backward (AssertionError "expected all tensors_saved_with_vc_check to be Tensors", torch
    # 2.13, inductor and aot_eager alike). Those wrap the compiled block instead, an eager checkpoint
    # re-running the compiled forward. That order is no general fix: without TP (FSDP, HSDP, PP) the
    # recomputation then saved fewer tensors than the forward (CheckpointError, 20 against 24).
    checkpoint_outside = config.compile.enabled and dims.tp > 1 and ac.mode in ("full", "layers")
    if not checkpoint_outside:
        apply_activation_checkpointing(model, ac.mode, ac.num_layers, ac.offload)
    if config.compile.enabled:
        # Fusing q/k/v (gate/up) into one GEMM needs plain weights: not under TP, nor float8's own matmuls.
        apply_compile(model, config.compile.backend, device,
                      fuse_projections=dims.tp == 1 and not config.float8.enabled)
    if checkpoint_outside:
        apply_activation_checkpointing(model, ac.mode, ac.num_layers, ac.offload)
    if dims.dp_cp > 1 or config.parallelism.fsdp_cpu_offload:
        # NOTE: over dp_shard x cp (see Meshes.fsdp): the cp ranks' gradients are summed by FSDP.
        apply_fsdp(model, mesh.fsdp, param_dtype,
                   config.parallelism.fsdp_reshard_after_forward, config.parallelism.fsdp_cpu_offload,
                   pipelined=dims.pp > 1)
    return model
