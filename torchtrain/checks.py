"""Every check of a run, in one pass before anything expensive is built.

:func:`torchtrain.config.load_config` checks what needs nothing but the recipe (types, ranges, keys that
depend on each other). What needs the model's shape, the world size or the device, and every key whose
values a module defines (an attention backend, a pipeline schedule, a checkpointing mode ...), is checked
here, by each module's own check, against the list that module implements. Training and planning run
:func:`check_run`; generation and export, which run the recipe's model in one process, :func:`check_model`.
"""

from __future__ import annotations

import torch

from torchtrain.checkpoint import check_checkpoint
from torchtrain.config import Config, ConfigError, check_choice
from torchtrain.hf_checkpoint import check_initial_load_path
from torchtrain.models.attention import BACKENDS, masks_of_call
from torchtrain.models.llama import ModelArgs
from torchtrain.optim import check_optimizer
from torchtrain.parallel.ac import check_activation_checkpoint
from torchtrain.parallel.compile import check_compile
from torchtrain.parallel.float8 import check_float8
from torchtrain.parallel.fsdp import check_fsdp
from torchtrain.parallel.mesh import ParallelDims, check_layout
from torchtrain.preemption import check_preemption
from torchtrain.profiling import check_profiling

__all__ = ["check_model", "check_run"]


def check_model(config: Config, model_args: ModelArgs) -> None:
    """The recipe's model keys that the model shape does not settle, and that its attention backend
    implements the masks the run needs."""
    check_choice(config, "model", "attention", ("auto", *BACKENDS))
    needed = masks_of_call(True, config.data.document_mask or None, model_args.sliding_window)
    missing = [mask for mask in needed if mask not in BACKENDS[model_args.attention].masks]
    if missing:
        able = [name for name, backend in BACKENDS.items() if set(needed) <= backend.masks]
        raise ConfigError(f"{config.source}: model.attention = {model_args.attention!r} does not implement the "
                          f"{', '.join(missing)} mask this run needs; valid choices: {able}")


def check_run(config: Config, model_args: ModelArgs, world_size: int, device: torch.device) -> ParallelDims:
    """Check the whole run (``model_args`` from :func:`torchtrain.models.shape.model_args_for`, on
    ``world_size`` processes of ``device``) and return its mesh sizes; raise ConfigError naming the
    recipe, the key and what would work."""
    check_model(config, model_args)
    if device.type not in BACKENDS[model_args.attention].trains_on:
        trains = [name for name, backend in BACKENDS.items() if device.type in backend.trains_on]
        raise ConfigError(f"{config.source}: model.attention = {model_args.attention!r} has no backward on "
                          f"{device.type}, so it cannot train there; valid choices on {device.type}: {trains}")
    check_optimizer(config)
    check_checkpoint(config)
    check_preemption(config)
    check_initial_load_path(config)
    check_compile(config)
    check_float8(config, device)
    check_profiling(config, device)
    check_activation_checkpoint(config, model_args, device)
    check_fsdp(config, device)
    dims = ParallelDims.resolve(config.parallelism, world_size, config.source)
    check_layout(dims, config, model_args)
    return dims
