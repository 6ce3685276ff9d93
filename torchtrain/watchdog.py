"""A watchdog for training steps that stall: it shows where every thread is, then ends the process.

A collective that never completes (a dead or stuck peer), a hung file system under the data loader or a
deadlock shows up as a step that does not end. The process group's own timeout
(``parallelism.collective_timeout_s``) ends a collective that waits too long; this thread covers
everything else and says where each rank was. It wakes once a second. When the running step has taken
``stall_factor`` times the median of the steps before it (after :data:`WARMUP_STEPS`, whose compiles
would skew it), it writes every thread's Python stack to the log's stream (``faulthandler``, which needs
no lock the stuck thread may hold), once per step. When a step has run for ``stall_abort_s``, it ends
the process with :data:`EXIT_STALLED`, so that torchrun (``--max-restarts``) or the scheduler restarts
the job from its newest checkpoint. Every rank watches itself: the ranks waiting for a stuck peer stall
too, so each rank's stacks are in the logs.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import sys
import threading
import time

logger = logging.getLogger(__name__)

EXIT_STALLED = 124  # what timeout(1) returns: the step ran out of time
WARMUP_STEPS = 3  # steps not used for the median: the first compiles, the next may still settle
_HISTORY = 50  # the median of the last this many steps


class StepWatchdog:
    """Call :meth:`step_started` and :meth:`step_finished` around each training step; :meth:`close` at the end."""

    def __init__(self, stall_factor: float, stall_abort_s: float, rank: int):
        self.stall_factor, self.stall_abort_s, self.rank = stall_factor, stall_abort_s, rank
        self._durations: list[float] = []
        self._seen = 0
        self._step: int | None = None
        self._started = 0.0
        self._reported: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if stall_factor > 0 or stall_abort_s > 0:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def step_started(self, step: int) -> None:
        with self._lock:
            self._step, self._started = step, time.monotonic()

    def step_finished(self) -> None:
        with self._lock:
            if self._step is not None:
                self._seen += 1
                if self._seen > WARMUP_STEPS:
                    self._durations = (self._durations + [time.monotonic() - self._started])[-_HISTORY:]
            self._step = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def stall_limit(self) -> float | None:
        """Seconds after which the running step counts as stalled; None until there is a median."""
        if self.stall_factor <= 0 or not self._durations:
            return None
        return self.stall_factor * statistics.median(self._durations)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                step, elapsed, limit = self._step, time.monotonic() - self._started, self.stall_limit()
            if step is None:
                continue
            if limit is not None and elapsed > limit and self._reported != step:
                self._reported = step
                logger.warning("rank %d: step %d has run for %.0fs, %.0fx the median step; every thread's stack "
                               "follows", self.rank, step, elapsed, self.stall_factor)
                self._dump()
            if self.stall_abort_s > 0 and elapsed > self.stall_abort_s:
                logger.error("rank %d: step %d has run for %.0fs (job.stall_abort_s = %g): ending the process "
                             "with exit status %d so that the job restarts from its newest checkpoint; every "
                             "thread's stack follows", self.rank, step, elapsed, self.stall_abort_s, EXIT_STALLED)
                self._dump()
                os._exit(EXIT_STALLED)

    @staticmethod
    def _dump() -> None:
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
