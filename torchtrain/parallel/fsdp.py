"""FSDP2 (fully_shard) over the data-parallel and context-parallel ranks: ZeRO-3 / ZeRO-2 sharding, or HSDP."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from torchtrain.config import Config, ConfigError, check_choice

logger = logging.getLogger(__name__)

RESHARD_SETTINGS = ("default", "always", "never")  # parallelism.fsdp_reshard_after_forward; see _reshard_policy


def check_fsdp(config: Config, device: torch.device) -> None:
    check_choice(config, "parallelism", "fsdp_reshard_after_forward", RESHARD_SETTINGS)
    if config.parallelism.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError(f"{config.source}: parallelism.fsdp_cpu_offload = true moves GPU memory to the CPU, "
                          f"but this run is on {device.type}; set it to false")


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: str,
               cpu_offload: bool, pipelined: bool) -> None:
    """Shard each block, then the root (embeddings, final norm, output) over ``dp_mesh``.

    A 1-D mesh shards (FSDP); a 2-D (dp_replicate, dp_shard_cp) mesh replicates across the first
    dimension and shards across the second (HSDP). The trainer passes dp_shard x cp flattened as the
    sharded dimension: context-parallel ranks hold the same parameters, and sharding over them too
    makes FSDP's reduce-scatter sum their gradients (see ``mesh.Meshes``). Parameters already sharded by tensor
    parallelism become 2-D (or 3-D) DTensors. Parameters are kept in fp32 and cast to
    ``param_dtype`` for compute; gradients are reduced in fp32.

    ``reshard_after_forward`` is the recipe's ``parallelism.fsdp_reshard_after_forward``:
    "always" (ZeRO-3), "never" (ZeRO-2: gathered parameters live from a block's forward to its
    backward) or "default" (see :func:`_reshard_policy`).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, offload_policy=offload,
                    reshard_after_forward=_reshard_policy(reshard_after_forward, i == len(blocks) - 1, pipelined))
    # NOTE: the root's parameters (embedding, final norm, output) are gathered for the whole forward
    # (used at its two ends), and the output projection is the first thing the backward needs: like the
    # last block's, freeing them after the forward only gathers them again at once. torch keeps the
    # root gathered by itself only when reshard_after_forward is left to it (None), so it is said here.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, offload_policy=offload,
                reshard_after_forward=_reshard_policy(reshard_after_forward, True, pipelined))
    # NOTE: the loss is already divided by the global number of valid tokens, so the gradients must
    # be summed across ranks, not averaged: FSDP's default division by the world size would be wrong.
    # A divide factor of 1 with sum-only reductions is a plain SUM (no PREMUL_SUM, which gloo lacks).
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    logger.info("FSDP2 over mesh %s %s, %d blocks, reshard after forward: %s%s", dp_mesh.mesh_dim_names,
                tuple(dp_mesh.shape), len(blocks), reshard_after_forward, ", CPU offload" if cpu_offload else "")


def _reshard_policy(setting: str, used_first_by_backward: bool, pipelined: bool) -> bool:
    """Whether a module frees its gathered parameters after its forward.

    NOTE (the "default"): the last block's parameters and the root's would be gathered again at once by the
    backward, so keeping them saves one all-gather for free. Under pipeline parallelism a stage
    runs the forwards of several microbatches before their backwards, so resharding would repeat
    the all-gather for every microbatch; the stage keeps its parameters gathered instead.
    """
    if setting == "always":
        return True
    if setting == "never":
        return False
    return not (used_first_by_backward or pipelined)
