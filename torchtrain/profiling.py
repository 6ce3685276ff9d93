"""Profiler traces and memory snapshots of chosen training steps (``[profiling]`` in a recipe).

Everything goes under ``job.output_dir/profiling/``, one file per rank:

* ``trace-step-NNNNNNNN-rank-R.json``: a ``torch.profiler`` trace of step N (CPU ops, and CUDA kernels
  and memory on GPUs), opened in https://ui.perfetto.dev or ``chrome://tracing``. The step before it
  is run as the profiler's warm-up, so its start-up cost is not in the trace.
* ``memory-step-NNNNNNNN-rank-R.pickle``: a CUDA memory snapshot after step N (every live block and
  the stack that allocated it), opened in https://pytorch.org/memory_viz.
* ``memory-oom-rank-R.pickle``: the same, written when a step runs out of GPU memory, before the
  error is raised again: the snapshot shows what held the memory.

NOTE: memory history is recorded from the start of training when any snapshot is asked for; it costs
a little host time per allocation, so it is off unless ``memory_snapshot_steps`` or
``memory_snapshot_on_oom`` is set.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile

from torchtrain.config import Config, ConfigError, Profiling

logger = logging.getLogger(__name__)

__all__ = ["StepProfiler", "check_profiling"]

_HISTORY_ENTRIES = 100_000  # allocation events kept for a snapshot (a ring buffer)


def check_profiling(config: Config, device: torch.device) -> None:
    """Memory snapshots record the CUDA caching allocator: refuse them, naming the key, elsewhere."""
    if device.type != "cuda":
        for key in ("memory_snapshot_steps", "memory_snapshot_on_oom"):
            if getattr(config.profiling, key):
                raise ConfigError(f"{config.source}: profiling.{key} = {getattr(config.profiling, key)!r} records "
                                  f"the CUDA allocator, but this run is on {device.type}; remove it "
                                  "(profiling.trace_steps works on any device)")


class StepProfiler:
    """Call :meth:`step` around each training step; it traces and snapshots the steps the recipe names."""

    def __init__(self, settings: Profiling, output_dir: Path, rank: int, device: torch.device):
        self.folder = Path(output_dir) / "profiling"
        self.rank = rank
        self.trace_steps = set(settings.trace_steps)
        self.snapshot_steps = set(settings.memory_snapshot_steps)
        self.snapshot_on_oom = settings.memory_snapshot_on_oom
        self._step: Optional[int] = None
        self._traced_step = 0
        self._profiler: Optional[profile] = None
        if self.trace_steps:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self._profiler = profile(activities=activities, schedule=self._action, on_trace_ready=self._save_trace,
                                     record_shapes=True, profile_memory=True, with_stack=False)
        if self.snapshot_steps or self.snapshot_on_oom:
            torch.cuda.memory._record_memory_history(max_entries=_HISTORY_ENTRIES)
        if self.trace_steps or self.snapshot_steps or self.snapshot_on_oom:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _action(self, profiler_step: int) -> ProfilerAction:
        # NOTE: torch.profiler counts the calls to profile.step(); ``self._step`` is the training step
        # about to run, so the schedule follows the recipe's step numbers even after a resume.
        step = self._step
        if step in self.trace_steps:
            self._traced_step = step
            return ProfilerAction.RECORD_AND_SAVE
        if step is not None and step + 1 in self.trace_steps:
            return ProfilerAction.WARMUP
        return ProfilerAction.NONE

    def _save_trace(self, prof: profile) -> None:
        path = self.folder / f"trace-step-{self._traced_step:08d}-rank-{self.rank}.json"
        prof.export_chrome_trace(str(path))
        logger.info("profiler trace of step %d: %s (open in https://ui.perfetto.dev)", self._traced_step, path)

    def start(self, first_step: int) -> None:
        self._step = first_step
        if self._profiler is not None:
            self._profiler.start()

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Run one training step (its number is ``step``) under the profiler's schedule."""
        self._step = step
        try:
            yield
        except torch.OutOfMemoryError:
            if self.snapshot_on_oom:
                self._snapshot(self.folder / f"memory-oom-rank-{self.rank}.pickle", f"out of memory at step {step}")
            raise
        if step in self.snapshot_steps:
            self._snapshot(self.folder / f"memory-step-{step:08d}-rank-{self.rank}.pickle", f"after step {step}")
        if self._profiler is not None:
            self._step = step + 1  # the schedule decides for the step the profiler enters next
            self._profiler.step()
            self._step = step

    def stop(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        if self.snapshot_steps or self.snapshot_on_oom:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _snapshot(self, path: Path, why: str) -> None:
        torch.cuda.memory._dump_snapshot(str(path))
        logger.info("CUDA memory snapshot %s: %s (open in https://pytorch.org/memory_viz)", why, path)
