"""Parallel dims validation and the compile fallback."""

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchtrain.config import Compile, Config, ConfigError, Parallelism, Training
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.mesh import ParallelDims, check_layout


def test_dp_shard_takes_what_is_left():
    dims = ParallelDims.resolve(Parallelism(dp_replicate=2, dp_shard=-1), world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 4, 8)


def test_sizes_must_multiply_to_the_world_size():
    with pytest.raises(ConfigError, match=r"multiply to 4, but 8 processes were launched"):
        ParallelDims.resolve(Parallelism(dp_replicate=2, dp_shard=2), world_size=8)
    with pytest.raises(ConfigError, match=r"= 3 does not divide the world size 8"):
        ParallelDims.resolve(Parallelism(dp_replicate=3), world_size=8)


def _layout(world_size: int, **settings) -> None:
    """Resolve and check a layout of the debug model (8 heads, 2 KV heads, 4 blocks, FFN 704)."""
    training = {k: settings.pop(k) for k in ("seq_len", "local_batch_size") if k in settings}
    compile_ = Compile(enabled=settings.pop("compile", False))
    config = Config(parallelism=Parallelism(**settings), training=Training(**training), compile=compile_)
    config.source = "recipes/x.toml"
    dims = ParallelDims.resolve(config.parallelism, world_size)
    check_layout(dims, config, get_model_args("debug"))


@pytest.mark.parametrize("settings, message", [
    (dict(tp=4), r"parallelism.tp = 4 is invalid for model 'debug': tensor parallelism splits num_kv_heads \(2\)"
                 r".*valid tp: \[1, 2\]"),
    (dict(tp=2, seq_len=255), r"training.seq_len = 255: sequence parallelism splits the sequence"),
    (dict(pp=8), r"8 pipeline stages .* but the model has only 4 blocks"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=4), r"8 pipeline stages .* only 4 blocks"),
    (dict(pp=2, pp_schedule="1f1b", pp_stages_per_rank=2), r"'1f1b' runs one stage per rank"),
    (dict(pp=2, pp_schedule="zbv", pp_stages_per_rank=1), r"'zbv' needs exactly 2 stages per rank"),
    (dict(pp=2, pp_layers_per_stage=[1, 2]), r"pp_layers_per_stage=\[1, 2\] sums to 3, but the model has 4 blocks"),
    (dict(pp=2, pp_schedule="interleaved_1f1b", pp_layers_per_stage=[1, 0, 2, 1]),
     r"every stage but the first and last needs at least 1 block"),
    (dict(pp=2, pp_microbatches=3, local_batch_size=8), r"pp_microbatches=3 must divide training.local_batch_size=8"),
    (dict(pp=2, local_batch_size=1), r"'1f1b' needs at least one microbatch per stage"),
    (dict(pp=2, pp_schedule="interleaved_zb", local_batch_size=9, pp_microbatches=9), r"must be a multiple of 4"),
    (dict(pp=2, pp_schedule="zbv", compile=True), r"compile.enabled = false"),
])
def test_impossible_layouts_fail_before_the_model_is_built(settings, message):
    with pytest.raises(ConfigError, match=message):
        _layout(2 * settings.get("pp", 1) * settings.get("tp", 1), **settings)


@pytest.mark.parametrize("settings", [
    dict(tp=2, dp_shard=4), dict(pp=2, tp=2, dp_shard=2), dict(pp=2, pp_layers_per_stage=[1, 3]),
    dict(pp=2, pp_schedule="interleaved_1f1b"), dict(pp=2, pp_schedule="zbv", local_batch_size=4),
    dict(pp=2, pp_schedule="interleaved_1f1b", pp_layers_per_stage=[1, 1, 2, 0]),
])
def test_possible_layouts_pass(settings):
    _layout(8, **{"dp_shard": -1, **settings})


def test_compile_falls_back_to_eager_with_a_warning():
    # A C++ compiler that does not exist: inductor cannot build CPU kernels. In a process of its own:
    # inductor remembers what it learnt about the toolchain, and later tests must compile for real.
    script = """
import logging, torch
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.compile import apply_compile
logging.basicConfig(level=logging.WARNING)
torch._inductor.config.cpp.cxx = ("no-such-c++-compiler",)
model = Transformer(get_model_args("debug"))
assert apply_compile(model, "inductor", torch.device("cpu")) is False
assert not any(type(b).__name__ == "OptimizedModule" for b in model.layers.values())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training continues in eager mode" in proc.stderr


def test_compiled_blocks_fuse_their_projections_and_match_eager(monkeypatch):
    from torch._dynamo.utils import counters

    # A compilation served from the on-disk caches skips the passes, and their counters.
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)

    torch._dynamo.reset()
    counters.clear()
    args = dataclasses.replace(get_model_args("debug"), dim=64, num_layers=1, ffn_dim=96, vocab_size=256)
    eager = Transformer(args)
    eager.init_weights(seed=0)
    compiled = copy.deepcopy(eager)
    assert apply_compile(compiled, "inductor", torch.device("cpu"), fuse_projections=True)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (eager, compiled):
        model(tokens, labels=tokens).backward()
    # q/k/v and gate/up: two groups of projections became two GEMMs.
    assert counters["inductor"]["batch_linear_lhs"] == 2
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
