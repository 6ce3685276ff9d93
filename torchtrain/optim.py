"""AdamW with the usual no-decay groups, and the learning-rate schedules."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from torchtrain.config import Config, LRScheduler, Optimizer, check_choice

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw",)
FUSED = ("auto", "yes", "no")  # optimizer.fused
LR_SCHEDULES = ("cosine", "linear", "wsd")  # lr_scheduler.name; see lr_factor


def check_optimizer(config: Config) -> None:
    """The optimizer and LR schedule keys with a fixed set of values."""
    check_choice(config, "optimizer", "name", OPTIMIZERS)
    check_choice(config, "optimizer", "fused", FUSED)
    check_choice(config, "lr_scheduler", "name", LR_SCHEDULES)


def build_optimizer(model: nn.Module, config: Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """AdamW where norms, biases and embeddings are not decayed (decay would only shrink them)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = "embeddings" in name
        (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all parameters in a few launches; "auto" uses it where it exists.
    fused = {"yes": True, "no": False, "auto": device.type in ("cuda", "cpu")}[config.fused]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused)


def step_unless_non_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Apply ``optimizer.step()`` only if ``finite`` (a 0-d bool tensor on the device) is true.

    NOTE: the fused AdamW honours the ``found_inf`` tensor of the gradient-scaler protocol: it skips the
    update (and the step count) on the device, so the host never waits for the loss or the gradient
    norm and can queue the next step's work at once. Other optimizers must read ``finite`` (one sync).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif finite.item():
        optimizer.step()


def lr_factor(step: int, total_steps: int, config: LRScheduler) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup, then decay.

    cosine and linear decay from the end of warmup to ``min_lr_ratio`` at the last step;
    wsd (warmup-stable-decay) holds the peak until the last ``decay_fraction`` of steps, then
    decays linearly.
    """
    # A run shorter than its recipe's warmup (a smoke test with --training.steps 3) warms up over all of it.
    warmup = min(config.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = config.min_lr_ratio
    if config.name == "wsd":
        decay_start = total_steps - max(1, round(config.decay_fraction * total_steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / (total_steps - decay_start)
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    if config.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets every parameter group's LR to ``peak * lr_factor(step)``; its state is the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: LRScheduler, total_steps: int):
        self.optimizer, self.config, self.total_steps = optimizer, config, total_steps
        if config.warmup_steps > total_steps:
            logger.warning("lr_scheduler.warmup_steps %d is longer than the run's %d steps: the LR warms up over "
                           "all of them and never decays", config.warmup_steps, total_steps)
        self.peak = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = state["step"]
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.step_count, self.total_steps, self.config)
        for group, peak in zip(self.optimizer.param_groups, self.peak):
            group["lr"] = peak * factor
