"""The trainer's command line (``torchtrain.train.main``) with one fault injected on one rank.

    faults.py FAULT RANK STEP  --config RECIPE [--section.key value ...]

FAULT, on rank RANK in the STEP-th training step this process runs:
* ``signal``: SIGUSR1 to itself after the step (a scheduler's warning reaching one rank only);
* ``sleep``: sleeps inside the step for ten minutes (a stuck rank; its peers wait in a collective);
* ``kill``: SIGKILL to itself inside the step, in torchrun's first attempt only (a dead rank);
* ``slow_data``: sleeps STEP seconds on rank RANK before building the data (a large corpus tokenised at
  the start on one node);
* ``none``: nothing.
"""

import os
import signal
import sys
import time

import torchtrain.train as trainer

fault, fault_rank, fault_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
original_step = trainer.train_step
steps_run = 0


def train_step_with_fault(*args, **kwargs):
    global steps_run
    steps_run += 1
    here = int(os.environ.get("RANK", "0")) == fault_rank and steps_run == fault_step
    if here and fault == "sleep":
        time.sleep(600)
    if here and fault == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original_step(*args, **kwargs)
    if here and fault == "signal":
        os.kill(os.getpid(), signal.SIGUSR1)
    return result


original_build = trainer.build_datasets


def build_datasets_slowly(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == fault_rank:
        time.sleep(fault_step)
    return original_build(*args, **kwargs)


trainer.train_step = train_step_with_fault
if fault == "slow_data":
    trainer.build_datasets = build_datasets_slowly
trainer.main(sys.argv[4:])
