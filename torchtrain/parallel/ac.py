"""Activation checkpointing: recompute block activations in the backward instead of storing them."""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

logger = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each transformer block according to ``mode`` ("none" or "full").

    NOTE: applied before torch.compile so the compiled region is the checkpointed block, and before
    FSDP so that recomputation re-gathers parameters through FSDP's hooks like the first forward.
    """
    if mode == "none":
        return
    for name, block in model.layers.named_children():
        # preserve_rng_state=False: the blocks use no randomness, and saving RNG state costs a sync.
        model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))
    logger.info("activation checkpointing: %s, %d blocks", mode, len(model.layers))
