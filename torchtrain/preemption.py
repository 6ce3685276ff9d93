"""Preemption: a signal asks the run to stop at the next step boundary, with a checkpoint of that step.

Schedulers warn a job before they stop it: Slurm with ``--signal`` (``scripts/slurm/train.sbatch`` asks
for SIGUSR1 five minutes ahead), Kubernetes and most others with SIGTERM and a grace period before
SIGKILL. The handler only sets a flag (a signal handler must not log or touch the process group). At
every step boundary the ranks agree on the flags in one all-reduce of one integer on a gloo group of
their own (on the CPU: the GPU's stream is never synchronised for it), so a signal that reached a few
ranks, or reached them a step apart, stops them all after the same step. They save a checkpoint of
that step and the run ends with :data:`EXIT_PREEMPTED`; started again, it resumes from that
checkpoint (``checkpoint.resume = "auto"``). ``docs/cluster.md`` has the whole protocol.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from torchtrain.config import Config, invalid

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped on request with a checkpoint; run it again to continue
UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def signal_names() -> list[str]:
    """Names of the signals this platform has that a process can catch, for validating the recipe."""
    return sorted(s.name for s in signal.Signals if s.name not in UNCATCHABLE and not s.name.startswith("SIGRT"))


def check_preemption(config: Config) -> None:
    for name in config.job.preemption_signals:
        if name not in signal_names():
            raise invalid(config, "job", "preemption_signals",
                          f"{name!r} is not a signal this process can catch; valid: {', '.join(signal_names())}")


class Preempted(Exception):
    """The run stopped on a preemption signal after saving a checkpoint of ``step``."""

    def __init__(self, step: int, signal_name: str, checkpoint: str | None):
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint saved (checkpoint.enabled = false)"
        super().__init__(f"stopped after step {step} on {signal_name}: {saved}; run the same command again to "
                         "continue from it")


class PreemptionWatch:
    """Catches ``signals`` for the duration of the run; :meth:`requested` is the ranks' common answer."""

    def __init__(self, signals: list[str]):
        self.received: str | None = None  # the first signal this rank caught
        self._previous: dict[int, object] = {}
        # NOTE: Python runs handlers on the main thread only, and only the main thread may install them
        # (tests run the trainer from other threads sometimes: there, no signal is caught).
        if signals and threading.current_thread() is threading.main_thread():
            for name in signals:
                number = signal.Signals[name]
                self._previous[number] = signal.signal(number, self._caught)
        self._group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 and signals else None
        self._watching = bool(signals)
        self.signal_name = ""  # the name every rank reports, once requested() said yes

    def _caught(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def requested(self) -> bool:
        """Whether any rank caught a signal; the same answer on every rank (a collective: call on all)."""
        if not self._watching:
            return False
        flag = torch.tensor([0 if self.received is None else signal.Signals[self.received].value])
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() == 0:
            return False
        self.signal_name = signal.Signals(int(flag.item())).name
        return True

    def close(self) -> None:
        """Give the signals back to their earlier handlers."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}
