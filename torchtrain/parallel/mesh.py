"""Process group start-up and the one named DeviceMesh every parallelism is applied on."""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchtrain.config import Config, ConfigError, Parallelism, check_choice
from torchtrain.models.llama import ModelArgs
from torchtrain.parallel.cp import ROTATE_METHODS
from torchtrain.parallel.pp import SCHEDULES, ZERO_BUBBLE_SCHEDULES, check_schedule, pipeline_settings, split_layers

# Mesh dimensions, outermost first. NOTE: tp is innermost so its ranks are neighbours (one node,
# fastest links); pp outermost because it only sends activations between stages.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# The flattened meshes (see Meshes) and the adjacent dimensions each spans, outermost first.
FLATTENED_DIMS = {"dp": ("dp_replicate", "dp_shard"), "dp_cp": ("dp_replicate", "dp_shard", "cp"),
                  "dp_shard_cp": ("dp_shard", "cp")}


def init_distributed(device: torch.device, timeout_s: float = 600) -> None:
    """Join the job's process group, or make a one-process group when not launched by torchrun.

    Running every job (even one process) inside a process group keeps one code path: DCP, the
    device mesh and the collectives behave the same at world size 1 as at 1,000.
    """
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    # A collective still waiting after the timeout fails (NCCL's watchdog aborts the process; gloo raises).
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=_attempt_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The launcher's key-value store, seen through a prefix of its own for this attempt of the job.

    NOTE: torchrun's restarts (``--max-restarts``) start the new workers on the same agent store as the
    failed attempt (torch 2.13: the same MASTER_PORT, the old keys still there), so the process group
    of the new attempt read the dead workers' addresses and failed to connect. A prefix per attempt
    (``TORCHELASTIC_RESTART_COUNT``) keeps each attempt's rendezvous keys apart. Under torchrun the agent
    hosts the store; under other launchers that set the same variables, rank 0 does.
    """
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not hosted_by_agent and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"torchtrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each mesh dimension, resolved (dp_shard = -1 filled in) and checked."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @classmethod
    def resolve(cls, config: Parallelism, world_size: int, source: str = "recipe") -> "ParallelDims":
        fixed = config.pp * config.dp_replicate * config.cp * config.tp
        dp_shard = config.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    f"{source}: parallelism pp={config.pp} x dp_replicate={config.dp_replicate} x cp={config.cp} "
                    f"x tp={config.tp} = {fixed} does not divide the world size {world_size}"
                )
            dp_shard = world_size // fixed
        dims = cls(config.pp, config.dp_replicate, dp_shard, config.cp, config.tp)
        if math.prod(dims.sizes) != world_size:
            raise ConfigError(
                f"{source}: parallelism sizes {dict(zip(MESH_DIMS, dims.sizes))} multiply to "
                f"{math.prod(dims.sizes)}, but {world_size} processes were launched; make the product equal "
                "the world size (dp_shard = -1 takes whatever is left)"
            )
        return dims

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Ranks that hold different tokens: the data-parallel ranks times the context-parallel ones."""
        return self.dp * self.cp


def check_layout(dims: ParallelDims, config: Config, model_args: ModelArgs) -> None:
    """Reject every layout the model or the batch cannot be split into, before anything is built.

    Each message names the recipe key to change and what would work.
    """
    source, args = config.source, model_args
    check_choice(config, "parallelism", "cp_rotate", ROTATE_METHODS)
    check_choice(config, "parallelism", "pp_schedule", SCHEDULES)
    if dims.tp > 1:
        for what, size in (("num_heads", args.num_heads), ("num_kv_heads", args.num_kv_heads),
                           ("ffn_dim", args.ffn_dim), ("vocab_size", args.vocab_size)):
            if size % dims.tp:
                raise ConfigError(
                    f"{source}: parallelism.tp = {dims.tp} is invalid for model {config.model.name!r}: tensor "
                    f"parallelism splits {what} ({size}) across the tp ranks, so tp must divide it; valid tp: "
                    f"{_divisors_of_all(args)}")
        if config.training.seq_len % dims.tp:
            raise ConfigError(
                f"{source}: parallelism.tp = {dims.tp} is invalid with training.seq_len = "
                f"{config.training.seq_len}: sequence parallelism splits the sequence across the tp ranks, so "
                "tp must divide it")
    if dims.cp > 1:
        _check_cp(dims, config, args)
    if dims.pp > 1:
        # The pipeline module's own checks, run now rather than when the stages are built.
        try:
            pipe = pipeline_settings(config, dims.pp)
            check_schedule(pipe.schedule, dims.pp, pipe.stages_per_rank, pipe.num_microbatches)
            split_layers(args, pipe.num_stages, config.parallelism.pp_layers_per_stage, config.training.seq_len)
        except ValueError as e:
            raise ConfigError(f"{source}: {e} (model {config.model.name!r}, pp = {dims.pp})") from None
        if config.compile.enabled and pipe.schedule in ZERO_BUBBLE_SCHEDULES:
            raise ConfigError(
                f"{source}: parallelism.pp_schedule = {pipe.schedule!r} splits the backward into input and weight "
                "passes, which torch does not support for compiled blocks; set compile.enabled = false or use "
                "1f1b / interleaved_1f1b")


def _check_cp(dims: ParallelDims, config: Config, args: ModelArgs) -> None:
    """Context parallelism cuts each sequence into 2 * cp equal chunks (two per rank, load-balanced),
    and sequence parallelism then splits a rank's share tp ways."""
    source, seq_len = config.source, config.training.seq_len
    if seq_len % (2 * dims.cp):
        raise ConfigError(
            f"{source}: parallelism.cp = {dims.cp} is invalid with training.seq_len = {seq_len}: context "
            f"parallelism cuts each sequence into 2 * cp = {2 * dims.cp} equal chunks, so 2 * cp must divide "
            f"the sequence length; valid cp: {_cp_sizes(seq_len, 1)}")
    if dims.tp > 1 and seq_len % (2 * dims.cp * dims.tp):
        raise ConfigError(
            f"{source}: parallelism.cp = {dims.cp} with parallelism.tp = {dims.tp} is invalid with training.seq_len "
            f"= {seq_len}: each cp rank holds seq_len / cp tokens, which sequence parallelism splits tp ways "
            f"in two chunks, so 2 * cp * tp = {2 * dims.cp * dims.tp} must divide the sequence length; "
            f"valid cp with tp = {dims.tp}: {_cp_sizes(seq_len, dims.tp)}")


def _cp_sizes(seq_len: int, tp: int) -> list[int]:
    return [cp for cp in range(1, seq_len // (2 * tp) + 1) if seq_len % (2 * cp * tp) == 0][:12]


def _divisors_of_all(args: ModelArgs) -> list[int]:
    sizes = (args.num_heads, args.num_kv_heads, args.ffn_dim, args.vocab_size)
    return [d for d in range(1, args.num_kv_heads + 1) if all(size % d == 0 for size in sizes)]


@dataclass(frozen=True)
class Meshes:
    """The run's named mesh and the flattened meshes made from it, kept here rather than sliced from
    the root mesh by their names (which torch deprecates).

    ``meshes["tp"]`` (any name of :data:`MESH_DIMS`) is that dimension of ``world``.
    """

    world: DeviceMesh  # [pp, dp_replicate, dp_shard, cp, tp]
    dp: DeviceMesh  # dp_replicate x dp_shard: ranks that read different data
    # dp x cp: ranks that hold different tokens, over which the loss and the count of valid tokens are summed
    dp_cp: DeviceMesh
    # dp_shard_cp = dp_shard x cp, what FSDP shards over; with dp_replicate > 1 the 2-D (dp_replicate,
    # dp_shard_cp), over whose first dimension HSDP replicates. NOTE: the cp ranks hold the same parameters
    # and compute gradients from different tokens, so those gradients must be summed; sharding over
    # dp_shard x cp does that in FSDP's reduce-scatter, and shards the parameters cp times further for free.
    fsdp: DeviceMesh

    def __getitem__(self, name: str) -> DeviceMesh:
        if name not in MESH_DIMS:
            raise KeyError(f"{name!r} is not a mesh dimension ({', '.join(MESH_DIMS)}); the flattened meshes are "
                           "the attributes dp, dp_cp and fsdp")
        return self.world[name]


def build_mesh(dims: ParallelDims, device: torch.device) -> Meshes:
    """The full named mesh and its flattened data-parallel meshes (see :class:`Meshes`)."""
    world = init_device_mesh(device.type, dims.sizes, mesh_dim_names=MESH_DIMS)
    dp = world[FLATTENED_DIMS["dp"]]._flatten("dp")
    dp_cp = world[FLATTENED_DIMS["dp_cp"]]._flatten("dp_cp")
    if dims.dp_replicate == 1:
        fsdp = world[FLATTENED_DIMS["dp_shard_cp"]]._flatten("dp_shard_cp")
    else:  # NOTE: unflattening makes a second dp_replicate process group, a copy of the world mesh's own
        fsdp = dp_cp._unflatten(0, (dims.dp_replicate, dims.dp_shard * dims.cp), ("dp_replicate", "dp_shard_cp"))
    return Meshes(world, dp, dp_cp, fsdp)
