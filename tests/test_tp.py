"""Tensor parallelism (sequence parallel, vocabulary-parallel loss) on 2 gloo ranks against one process.

One torchrun launch checks every case (starting the processes is the expensive part); the worker,
tests/workers/tp_parity.py, says what each case compares, and prints ``ok CASE`` on rank 0 only after
its loss and every gradient matched. Each case is a test of its own over that one launch.
"""

import pytest

from launcher import REPO, run_cases

CASES = ("validate", "loss", "eager", "docs", "tied", "qk_norm", "window", "stages", "ac", "compile", "ac_compile", "fsdp")


@pytest.fixture(scope="module")
def tp_run():
    return run_cases(2, REPO / "tests" / "workers" / "tp_parity.py", CASES)


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_matches_one_process(tp_run, case):
    passed, output = tp_run
    assert case in passed, output


def test_a_parameter_the_plan_does_not_place_is_refused():
    """A block parameter outside the plan (here a norm inside the feed-forward) would stay a plain tensor on every
    tp rank and drift apart; apply_tp names it instead. Run on the meta device over a fake 2-rank group."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from torchtrain.models import Transformer, get_model_args
    from torchtrain.parallel.tp import apply_tp

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with torch.device("meta"):
            whole, extended = Transformer(get_model_args("debug")), Transformer(get_model_args("debug"))
            extended.layers["1"].feed_forward.norm = torch.nn.RMSNorm(32)
        apply_tp(whole, mesh["tp"])
        assert all(isinstance(p, DTensor) for p in whole.parameters())
        with pytest.raises(ValueError, match=r"places no layout on \['layers.1.feed_forward.norm.weight'\]"):
            apply_tp(extended, mesh["tp"])
    finally:
        dist.destroy_process_group()
