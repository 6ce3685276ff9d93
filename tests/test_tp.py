"""Tensor parallelism (sequence parallel, vocabulary-parallel loss) on 2 gloo ranks against one process.

One torchrun launch checks every case (starting the processes is the expensive part); the worker,
tests/workers/tp_parity.py, says what each case compares. Each case prints ``ok CASE`` on rank 0
only after its loss and every gradient matched, so a missing line is a failure.
"""

from launcher import REPO, torchrun

CASES = ("validate", "loss", "eager", "docs", "tied", "stages", "ac", "compile", "ac_compile", "fsdp")


def test_tensor_parallel_matches_one_process():
    proc = torchrun(2, REPO / "tests" / "workers" / "tp_parity.py", *CASES)
    passed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert passed == list(CASES), proc.stdout[-4000:] + proc.stderr[-4000:]
