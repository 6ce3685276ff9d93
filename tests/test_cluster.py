"""Faults of a real cluster, injected on CPU with gloo: preemption, a stuck rank, a dead rank, two nodes.

Every multi-process run is compared with the same steps on one process (``single``): the global batch is
the same 4 samples, so the losses agree to float32 summation order.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher import REPO, torchrun, torchrun_command, torchrun_nodes, worker_env
from test_train import run, tiny

FAULTS = REPO / "tests/workers/faults.py"
RECIPE = ["--config", str(REPO / "recipes/debug.toml")]
QUIET = ("--training.val_every", "0", "--checkpoint.every", "0")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), *QUIET, "--checkpoint.enabled", "false").losses


def _losses(out) -> dict[int, float]:
    """rank 0's training losses from TensorBoard: every attempt's event file, the last value of each step."""
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss/train")}


def _checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_signal_to_one_rank_stops_all_after_the_same_step_with_a_checkpoint_and_the_rerun_resumes(
        tmp_path, single):
    args = [*RECIPE, *tiny(tmp_path, *QUIET, "--training.local_batch_size", "2")]
    first = torchrun(2, FAULTS, "signal", "1", "3", *args, check=False)
    output = first.stdout + first.stderr
    assert first.returncode != 0 and "exitcode  : 75" in output, output[-4000:]  # both ranks: 75, EX_TEMPFAIL
    assert output.count("preempted: stopped after step 3 on SIGUSR1: saved ") == 1, output[-4000:]  # rank 0 says it
    assert _checkpoints(tmp_path) == ["step-00000003"]
    torchrun(2, FAULTS, "none", "0", "0", *args)  # the same command again: resumes (checkpoint.resume = "auto")
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    for step in losses:
        assert losses[step] == pytest.approx(single[step], rel=1e-5, abs=1e-5), step


def test_the_slurm_scripts_signal_reaches_the_workers_through_an_agent_that_ignores_it(tmp_path):
    """scripts/slurm/train.sbatch starts torchrun with SIGUSR1 ignored and signals the whole job step: the agent
    must live on to report, the workers must save and stop."""
    args = [*RECIPE, *tiny(tmp_path, *QUIET, "--training.local_batch_size", "2", "--training.steps", "200")]
    command = " ".join(map(shlex.quote, torchrun_command(2, FAULTS, ["none", "0", "0", *args], ("--standalone",))))
    job = subprocess.Popen(["bash", "-c", f"trap '' USR1; exec {command}"], cwd=REPO, env=worker_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not re.search(r"step +2/200", (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists()
                        else ""):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-4000:]
        time.sleep(0.2)
    # What `scancel --signal=USR1` does to a job step: Slurm's process tracking signals every process of it,
    # torchrun's workers included (they run in sessions of their own, out of the agent's process group).
    for pid in [job.pid, *_descendants(job.pid)]:
        os.kill(pid, signal.SIGUSR1)
    output = job.communicate(timeout=120)[0]
    stopped = re.search(r"preempted: stopped after step (\d+) on SIGUSR1", output)
    assert stopped and "exitcode  : 75" in output, output[-4000:]  # the agent lived to report the workers' 75
    assert _checkpoints(tmp_path) == [f"step-{int(stopped.group(1)):08d}"]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_stuck_rank_dumps_every_ranks_stacks_and_ends_the_job(tmp_path):
    args = [*RECIPE, *tiny(tmp_path, *QUIET, "--training.local_batch_size", "2", "--job.stall_factor", "3",
                           "--job.stall_abort_s", "8")]
    proc = torchrun(2, FAULTS, "sleep", "1", "5", *args, check=False, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 124" in output, output[-4000:]
    for rank in (0, 1):  # each rank's own watchdog saw the step stall and wrote its stacks
        assert f"rank {rank}: step 5 has run for" in output, output[-6000:]
    assert "in train_step_with_fault" in output  # rank 1's stack shows where it is stuck
    assert "ending the process with exit status 124" in output


def test_ranks_waiting_for_the_data_to_be_built_give_up_after_their_own_timeout_with_one_line(tmp_path):
    """Rank 0 (the node's first) takes 60 s to build the data; rank 1 waits data.build_timeout_s = 3 s, not the
    collectives' timeout, and says what to do."""
    args = [*RECIPE, *tiny(tmp_path, *QUIET, "--training.local_batch_size", "2", "--data.build_timeout_s", "3")]
    started = time.monotonic()
    proc = torchrun(2, FAULTS, "slow_data", "0", "60", *args, check=False, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - started < 50, output[-4000:]
    said = re.search(r"error: rank 1: the data were not built on every node within data.build_timeout_s = 3 s "
                     r"\(.*\); tokenise a large corpus ahead with python -m torchtrain.data.prepare", output)
    assert said, output[-4000:]


def test_a_killed_rank_restarts_the_group_from_the_newest_checkpoint_with_the_same_losses(tmp_path, single):
    args = [*RECIPE, *tiny(tmp_path, *QUIET, "--training.local_batch_size", "2", "--checkpoint.every", "2")]
    proc = torchrun(2, FAULTS, "kill", "1", "5", *args, launch=("--standalone", "--max-restarts=1"))
    log = (tmp_path / "train.log").read_text()
    assert "resumed from checkpoint" in log and "step-00000004" in log, proc.stderr[-4000:]
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(1, 9))
    for step in losses:
        assert losses[step] == pytest.approx(single[step], rel=1e-5, abs=1e-5), step


def test_two_nodes_with_hsdp_across_them_match_one_process(tmp_path, single):
    out = tmp_path / "losses.json"
    torchrun_nodes(2, 2, REPO / "tests/workers/train_losses.py", "--out", out, *RECIPE,
                   *tiny(tmp_path, *QUIET, "--checkpoint.enabled", "false", "--training.local_batch_size", "1",
                         "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"))
    losses = {int(k): v for k, v in json.loads(out.read_text())["losses"].items()}
    assert sorted(losses) == list(range(1, 9))
    for step in losses:
        assert losses[step] == pytest.approx(single[step], rel=1e-5, abs=1e-5), step
