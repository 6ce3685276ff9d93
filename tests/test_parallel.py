"""Parallel dims validation and the compile fallback."""

import logging

import pytest
import torch

from torchtrain.config import ConfigError, Parallelism
from torchtrain.models import Transformer, get_model_args
from torchtrain.parallel.compile import apply_compile
from torchtrain.parallel.mesh import ParallelDims


def test_dp_shard_takes_what_is_left():
    dims = ParallelDims.resolve(Parallelism(dp_replicate=2, dp_shard=-1), world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.dp) == (2, 4, 8)


def test_sizes_must_multiply_to_the_world_size():
    with pytest.raises(ConfigError, match=r"multiply to 4, but 8 processes were launched"):
        ParallelDims.resolve(Parallelism(dp_replicate=2, dp_shard=2), world_size=8)
    with pytest.raises(ConfigError, match=r"= 3 does not divide the world size 8"):
        ParallelDims.resolve(Parallelism(dp_replicate=3), world_size=8)


def test_dimensions_not_yet_available_are_named():
    with pytest.raises(ConfigError, match=r"\{'tp': 2\} is not available.*dp_replicate, dp_shard"):
        ParallelDims.resolve(Parallelism(tp=2), world_size=2)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    # A C++ compiler that does not exist: inductor cannot build CPU kernels.
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++-compiler",))
    model = Transformer(get_model_args("debug"))
    with caplog.at_level(logging.WARNING):
        assert apply_compile(model, "inductor", torch.device("cpu")) is False
    assert "training continues in eager mode" in caplog.text
    assert not any(type(b).__name__ == "OptimizedModule" for b in model.layers.values())
