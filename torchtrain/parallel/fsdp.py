"""FSDP2 (fully_shard) over the data-parallel mesh dimensions: ZeRO-3 sharding, or HSDP."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """Shard each block, then the root (embeddings, final norm, output) over ``dp_mesh``.

    A 1-D mesh shards (FSDP); a 2-D (dp_replicate, dp_shard) mesh replicates across the first
    dimension and shards across the second (HSDP). Parameters are kept in fp32 and cast to
    ``param_dtype`` for compute; gradients are reduced in fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # NOTE: the last block's parameters would be gathered again at once by the backward, so
        # keeping them unsharded after the forward saves one all-gather for free.
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    # NOTE: the loss is already divided by the global number of valid tokens, so the gradients must
    # be summed across ranks, not averaged: FSDP's default division by the world size would be wrong.
    # A divide factor of 1 with sum-only reductions is a plain SUM (no PREMUL_SUM, which gloo lacks).
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    logger.info("FSDP2 over mesh %s (%s), %d blocks", dp_mesh.mesh_dim_names, tuple(dp_mesh.shape), len(blocks))
