"""The one way tests start multi-process jobs: torchrun with gloo on CPU, like a real launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# Deprecations of torch's that our code once triggered, fixed since; they fail any test that brings them back.
FIXED_DEPRECATIONS = ["Slicing a flattened dim", "`torch.distributed.all_gather_into_tensor` is deprecated",
                      "`torch.distributed.reduce_scatter_tensor` is deprecated"]


def warnings_as_errors() -> str:
    """PYTHONWARNINGS for the workers, doing what conftest.py does in the pytest process: warnings raised
    from our own modules, and the fixed deprecations, fail. (PYTHONWARNINGS matches a module by its
    whole name, so every module of ours is listed.)"""
    roots = {"torchtrain": REPO / "torchtrain", "torchtrain.kernels": REPO / "kernels"}
    modules = sorted({".".join((package, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
                      for package, root in roots.items() for path in root.rglob("*.py")})
    return ",".join([f"error:::{module}" for module in modules] + [f"error:{m}" for m in FIXED_DEPRECATIONS])


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 600,
             launch: tuple[str, ...] = ("--standalone",), check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local processes; raise with the combined output if it fails (``check``).

    ``launch``: torchrun's own options (rendezvous, restarts); ``--standalone`` by default."""
    proc = subprocess.run(torchrun_command(nproc, script, args, launch), cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def torchrun_nodes(nnodes: int, nproc: int, script: str | Path, *args: str, timeout: float = 600) -> list[str]:
    """Run ``script`` as a job of ``nnodes`` "nodes" on this machine: one torchrun agent each, meeting at a c10d
    rendezvous on 127.0.0.1, as on a cluster; raise with the output unless every agent succeeds."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = (f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test")
    agents = [subprocess.Popen(torchrun_command(nproc, script, args, launch), cwd=REPO, env=worker_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(nnodes)]
    outputs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    if any(agent.returncode != 0 for agent in agents):
        raise AssertionError("\n".join(f"agent {i} ({agent.returncode}):\n{out[-4000:]}"
                                       for i, (agent, out) in enumerate(zip(agents, outputs))))
    return outputs


def worker_env() -> dict[str, str]:
    """The environment of a test's torchrun: one thread per process, this checkout importable, our warnings fatal."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS=warnings_as_errors())
    env.pop("TRITON_INTERPRET", None)  # workers run the trainer's own CPU path, whatever the caller's shell set
    return env


def torchrun_command(nproc: int, script: str | Path, args, launch) -> list[str]:
    """The torchrun command line that starts ``script`` on ``nproc`` processes with torchrun's options ``launch``."""
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}", str(script),
            *map(str, args)]


def run_cases(nproc: int, script: str | Path, cases: tuple[str, ...]) -> tuple[set[str], str]:
    """Run a worker that prints ``ok CASE`` on rank 0 after each case it checked, once for all ``cases``
    (starting the processes is the expensive part): the cases that passed, and the output for messages.
    A failing case ends the run, so it and the cases after it are not in the set."""
    try:
        output = torchrun(nproc, script, *cases).stdout
    except AssertionError as e:
        output = str(e)
    return {line.split()[1] for line in output.splitlines() if line.startswith("ok ")}, output[-6000:]
