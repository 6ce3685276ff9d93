"""Initialisation that gives every parallel layout the values one process would draw."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@contextmanager
@torch.no_grad()
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside, each sharded (DTensor) parameter of ``module`` is a full-size plain tensor; on exit,
    every rank copies its own shard of the full values back into the sharded parameter.

    Used as ``Transformer.init_weights``'s ``unit_scope``: a unit is initialised whole, from its own
    seed, on every rank, so FSDP, TP, HSDP and pipeline stages all start from the values of a
    single-process run. Only one unit (one block, the embedding or the output) is whole at a time.

    NOTE: every rank draws the same full tensor, so the shard is cut locally
    (``src_data_rank=None``): no communication, and any placement (Shard, Replicate, FSDP x TP's
    strided shards) is cut the way DTensor itself lays it out.
    """
    swapped: list[tuple[nn.Module, str, DTensor]] = []
    full_of: dict[int, nn.Parameter] = {}  # a tied parameter is swapped for the same full tensor
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                if id(param) not in full_of:
                    local = param.to_local()
                    full_of[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=local.dtype, device=local.device),
                                                      requires_grad=param.requires_grad)
                owner._parameters[name] = full_of[id(param)]
                swapped.append((owner, name, param))
    try:
        yield
    finally:
        for owner, name, param in swapped:
            copy_full_into(param, owner._parameters[name].detach())
            owner._parameters[name] = param


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full-size ``full`` into ``param``, converted to its device and dtype; a sharded
    (DTensor) parameter keeps this rank's shard, cut locally (every rank holds the same ``full``)."""
    if isinstance(param, DTensor):
        local = param.to_local()
        full = full.to(device=local.device, dtype=local.dtype)
        local.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local())
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))
