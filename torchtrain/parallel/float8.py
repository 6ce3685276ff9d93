"""Float8 training of the blocks' linear layers with ``torchao``, applied to a model from outside.

``apply_float8(model, settings)`` swaps each block's ``nn.Linear`` (q/k/v/o and the SwiGLU
projections) for ``torchao``'s ``Float8Linear``: the same parameters (same names, shapes and fp32/bf16
values, so checkpoints are interchangeable with a bf16 run), but each matmul casts its operands to
float8 with a dynamic scale and runs on the GPU's float8 tensor cores, accumulating in higher
precision. The recipes (``float8.recipe``):

* ``tensorwise``: one scale per tensor, the fastest; with FSDP the weights can be all-gathered in
  float8 (``float8.fsdp_float8_all_gather``: half the bytes of bf16), their scales computed for all
  blocks at once after the optimizer step (:func:`after_optimizer_step`);
* ``rowwise``: one scale per row (power-of-2 scales), more accurate, somewhat slower;
* ``rowwise_with_gw_hp``: rowwise, with the weight gradient computed in high precision.

NOTE: what is not converted, and why: the embedding (a lookup), the output projection (the chunked
loss multiplies by its weight directly, and its logits are the most precision-sensitive matmul of the
model) and any linear layer whose dimensions are not multiples of 16 (a float8 GEMM requirement).

Float8 matmuls need NVIDIA compute capability 8.9 or newer (L4/L40, H100/H200, B200):
:func:`check_float8_support` refuses anything else before the model is built. Tests run the same
conversion with ``emulate=True`` (float8 rounding emulated in high precision), on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from torchtrain.config import Config, ConfigError, Float8, check_choice

logger = logging.getLogger(__name__)

__all__ = ["RECIPES", "apply_float8", "after_optimizer_step", "check_float8", "uses_float8_all_gather"]

MIN_CAPABILITY = (8, 9)
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # float8.recipe; see apply_float8


def check_float8(config: Config, device: torch.device) -> None:
    """The recipe's float8 keys, and float8 matmuls on ``device`` (the GPU's compute capability is read
    where one is visible: a plan for a CUDA device made without one skips that)."""
    check_choice(config, "float8", "recipe", RECIPES)
    settings, source = config.float8, config.source
    if not settings.enabled:
        return
    if device.type != "cuda":
        raise ConfigError(f"{source}: float8.enabled = true needs an NVIDIA GPU with float8 tensor cores "
                          f"(compute capability >= 8.9: L4/L40, H100/H200, B200), but this run is on {device.type}; "
                          "set float8.enabled = false")
    if not torch.cuda.is_available():
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"{source}: float8.enabled = true needs compute capability >= 8.9 (L4/L40, H100/H200, "
                          f"B200), but {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; "
                          "set float8.enabled = false")


def uses_float8_all_gather(settings: Float8) -> bool:
    return settings.enabled and settings.recipe == "tensorwise" and settings.fsdp_float8_all_gather


def _convertible(module: nn.Module, name: str) -> bool:
    if not isinstance(module, nn.Linear) or not name.startswith("layers."):
        return False
    out_features, in_features = module.weight.shape
    return out_features % 16 == 0 and in_features % 16 == 0


def apply_float8(model: nn.Module, settings: Float8, emulate: bool = False) -> None:
    """Swap the blocks' linear layers of ``model`` (whole or a pipeline stage) for float8 ones, in place.

    Apply before tensor parallelism, activation checkpointing, ``torch.compile`` and FSDP (as
    ``parallel.parallelize`` does): they then see the float8 modules and, with tensorwise scaling, the
    float8-aware weight that FSDP gathers in float8. ``emulate`` rounds to float8 in high precision
    instead of calling float8 GEMMs (for tests on hardware without them).
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if settings.recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=settings.fsdp_float8_all_gather, emulate=emulate)
    else:
        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(settings.recipe), emulate=emulate)
    convert_to_float8_training(model, module_filter_fn=_convertible, config=config)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    logger.info("float8: %s scaling, %d linear layers converted%s", settings.recipe, converted,
                ", float8 FSDP all-gather" if config.enable_fsdp_float8_all_gather else "")


def after_optimizer_step(model: nn.Module, settings: Float8) -> None:
    """With float8 FSDP all-gather, compute every float8 weight's scale for the next step in one all-reduce.

    NOTE: without this each block would compute its weight's amax when it gathers (one small
    all-reduce per linear layer per step); the updated weights are only known after the optimizer step.
    """
    if uses_float8_all_gather(settings):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
