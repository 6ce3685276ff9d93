"""Throughput, MFU and memory figures; the console line and TensorBoard scalars.

FLOP convention (the one every figure in this project uses): a token costs
``6 * N + 12 * L * d * s`` FLOPs for forward + backward, where N is the number of non-embedding
parameters (the output projection counts, the input embedding table does not), L the number of
blocks, d the attention's width (``num_heads * head_dim``: the model width, except where the heads are
set wider, as in Qwen3-32B: 8192, not 5120) and s the sequence length (with a sliding window ``w``, the
keys a query sees: ``min(s, w)``, likewise not halved). Attention is counted without halving for
causality, and recomputation (activation checkpointing) is not counted: it is work done, not
progress made. MFU = achieved model FLOP/s / the device's dense bf16 peak.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of this GPU from the table, or None (a CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name.upper():
            return flops
    logger.warning("no peak FLOP/s known for %r; MFU will not be reported", name)
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class ThroughputMeter:
    """Tokens and seconds of training steps between log steps, turned into per-device rates.

    Only the time inside training steps is counted, so validation and checkpoint saves do not
    dilute the throughput figures (they do show up in the ETA, which uses wall time).
    """

    flops_per_token: float
    peak_flops: float | None
    total_steps: int
    _tokens: int = 0
    _seconds: float = 0.0
    _steps: int = 0
    _wall_start: float = field(default_factory=time.perf_counter)
    _wall_steps: int = 0

    def add(self, tokens: int, seconds: float) -> None:
        self._tokens += tokens
        self._seconds += seconds
        self._steps += 1
        self._wall_steps += 1

    def read(self, step: int) -> dict[str, float]:
        """Rates since the last read; resets the window."""
        seconds = max(self._seconds, 1e-9)
        tokens_per_s = self._tokens / seconds
        wall_per_step = (time.perf_counter() - self._wall_start) / max(self._wall_steps, 1)
        figures = {
            "perf/tokens_per_s": tokens_per_s,
            "perf/tflops": tokens_per_s * self.flops_per_token / 1e12,
            "perf/step_time_s": seconds / max(self._steps, 1),
            "perf/eta_s": wall_per_step * (self.total_steps - step),
        }
        if self.peak_flops:
            figures["perf/mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        self._tokens, self._seconds, self._steps = 0, 0.0, 0
        return figures


def rank_step_times(step_time_s: float, device: torch.device) -> dict[str, float]:
    """The window's mean step time over the ranks: min, median, max, and which rank was slowest.

    One all-gather of one number per rank, at log steps only (which already wait for the device),
    so a straggler shows without a sync between log steps. Empty on one process.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {}
    every = torch.empty(world, dtype=torch.float32, device=device)
    dist.all_gather_single(every, torch.tensor([step_time_s], dtype=torch.float32, device=device))
    times = every.tolist()
    return {"perf/step_time_min_s": min(times), "perf/step_time_median_s": statistics.median(times),
            "perf/step_time_max_s": max(times), "perf/slowest_rank": float(times.index(max(times)))}


class StepScalars:
    """Each step's loss and gradient norm, kept on the device until a step that needs their values.

    NOTE: reading a device value makes the host wait for all the work queued before it. The training
    loop reads these only at its log, validation and checkpoint steps, all pending steps in one
    device-to-host copy; in between, the host queues step after step without waiting.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self._pending.append((step, torch.stack([loss.float(), grad_norm.float()])))

    def read(self) -> dict[int, tuple[float, float]]:
        """``{step: (loss, grad_norm)}`` of every step added since the last read, oldest first."""
        if not self._pending:
            return {}
        values = torch.stack([pair for _, pair in self._pending]).tolist()
        steps = [step for step, _ in self._pending]
        self._pending.clear()
        return {step: (loss, norm) for step, (loss, norm) in zip(steps, values)}


class MetricsLogger:
    """One console line per log step, and the same numbers as TensorBoard scalars (rank 0 only)."""

    def __init__(self, tb_dir: Path | None, enabled: bool):
        self.enabled = enabled
        self.tb_dir = tb_dir
        self.writer = None
        if enabled and tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tb_dir))

    def log(self, step: int, total_steps: int, figures: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in figures.items():
                self.writer.add_scalar(tag, value, step)
        logger.info("%s", format_line(step, total_steps, figures))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_line(step: int, total_steps: int, f: dict[str, float]) -> str:
    parts = [f"step {step:>{len(str(total_steps))}}/{total_steps}"]
    if "loss/train" in f:
        parts.append(f"loss {f['loss/train']:.4f}")
    if "loss/val" in f:
        parts.append(f"val loss {f['loss/val']:.4f} ppl {f['loss/val_perplexity']:.2f}")
        per_source = [f"{tag.removeprefix('loss/val/')} {value:.4f}" for tag, value in f.items()
                      if tag.startswith("loss/val/")]
        if per_source:
            parts[-1] += f" ({', '.join(per_source)})"
    if "optim/lr" in f:
        parts.append(f"lr {f['optim/lr']:.2e}")
    if "optim/grad_norm" in f:
        parts.append(f"grad norm {f['optim/grad_norm']:.3f}")
    if "perf/tokens_per_s" in f:
        parts.append(f"{f['perf/tokens_per_s']:,.0f} tok/s/device")
        tflops = f["perf/tflops"]
        parts.append(f"{tflops:.2f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.1f} GFLOP/s")
        if "perf/mfu" in f:
            parts.append(f"MFU {100 * f['perf/mfu']:.1f}%")
    if "memory/peak_gib" in f:
        parts.append(f"peak mem {f['memory/peak_gib']:.2f} GiB")
    if "perf/step_time_s" in f:
        parts.append(f"step {f['perf/step_time_s']:.2f}s")
        if "perf/step_time_max_s" in f:
            parts.append(f"ranks {f['perf/step_time_min_s']:.2f}-{f['perf/step_time_max_s']:.2f}s, "
                         f"slowest rank {int(f['perf/slowest_rank'])}")
        parts.append(f"ETA {_duration(f['perf/eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
