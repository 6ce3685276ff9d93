"""From measured ranks to a plan: peak memory per pipeline stage, FLOPs, traffic and step time.

:func:`plan_layout` measures the first rank of every pipeline stage (:func:`measure_rank`: the
real model, parallelism, optimizer and one microbatch per stage under a fake process group, traced
on a few blocks per stage and extrapolated to all of them by :mod:`torchtrain.plan.depth`; ranks whose
stages hold alike blocks are measured once), then scales what one microbatch costs to a whole step:

* memory: the pipeline schedule keeps several microbatches' activations alive at once. For every
  backward the rank's schedule runs (:mod:`torchtrain.plan.schedule`), the peak is that stage's
  measured one-microbatch peak plus the activations of the other microbatches in flight; the
  largest over the schedule (or the measured step's own peak, if larger) is the prediction;
* FLOPs and collectives: per microbatch times microbatches per step, plus what happens once per
  step (FSDP's deferred reduction under pipelining, the gradient norm);
* pipeline sends: computed (the fake process group does not carry them): each microbatch sends
  its hidden-state shard ``[B, S / (tp * cp), dim]`` forward and its gradient back, per stage boundary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from torchtrain.config import Config, ConfigError
from torchtrain.models import ModelArgs
from torchtrain.checks import check_run
from torchtrain.parallel import ParallelDims
from torchtrain.parallel.mesh import FLATTENED_DIMS, MESH_DIMS
from torchtrain.parallel.pp import pipeline_settings
from torchtrain.plan.counters import CommVolume
from torchtrain.plan.depth import block_kinds, describe_stage, measure_rank_by_depth, stage_blocks
from torchtrain.plan.fake_step import RankMeasure, Target, microbatch_size
from torchtrain.plan.schedule import backward_events, peak_in_flight
from torchtrain.plan.timing import (Device, StepTime, bubble_fraction, comm_seconds, group_crosses_nodes,
                                    step_time)

IN_FLIGHT = "other microbatches in flight"  # the breakdown's pipeline part
# The groups FSDP (and HSDP) communicate over; their traffic overlaps the compute (see timing.py).
FSDP_DIMS = ("dp_replicate", "dp_shard", "dp_shard_cp")


@dataclass
class RolePlan:
    """One pipeline rank (every rank of a pipeline stage holds and does the same)."""

    pp_rank: int
    rank: int
    stages: str
    num_params: int
    fsdp_units: int  # blocks + one root per stage: what FSDP gathers one at a time
    peak_bytes: int
    breakdown: dict[str, int]  # sums to peak_bytes
    in_flight: dict[int, int]  # stage -> most microbatches alive at once
    flops_per_step: float  # executed by this rank, recomputation included
    comm_per_step: dict[str, CommVolume]  # by mesh dimension ("pp": computed sends)
    attention_flops_per_step: float = 0.0  # the part of flops_per_step that attention ops execute
    memory_traffic_per_step: float = 0.0  # bytes read and written by the ops without a FLOP formula
    time: StepTime | None = None


@dataclass
class Plan:
    config: Config
    dims: ParallelDims
    gpu: Device
    efficiency: float
    roles: list[RolePlan]
    flops_per_token: int  # the project's convention (ModelArgs.flops_per_token)
    tokens_per_step_per_gpu: float
    schedule: str = ""
    num_microbatches: int = 1
    bubble: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return math.prod(self.dims.sizes)

    @property
    def peak_bytes(self) -> int:
        return max(r.peak_bytes for r in self.roles)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.usable_memory_bytes

    @property
    def step_seconds(self) -> float:
        return max(r.time.total_s for r in self.roles)

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.tokens_per_step_per_gpu / self.step_seconds

    @property
    def mfu(self) -> float:
        return self.tokens_per_second_per_gpu * self.flops_per_token / self.gpu.peak_flops

    def layout(self) -> str:
        return " x ".join(f"{name} {size}" for name, size in zip(MESH_DIMS, self.dims.sizes) if size > 1) or "1 rank"


def plan_layout(config: Config, model_args: ModelArgs, world_size: int, gpu: Device, efficiency: float,
                target: Target = Target(), ends_only: bool = False, exact: bool = False) -> Plan:
    """Measure and plan the recipe's layout at ``world_size`` on ``gpu`` (ConfigError if impossible).

    Every pipeline rank is planned; ranks whose stages hold alike blocks are measured once
    (:func:`measure_pipeline_ranks`). ``ends_only``: plan the first and last pipeline ranks only (the
    first keeps the most microbatches in flight, the last holds the output layer, but a middle rank
    can hold more blocks, or, interleaved, a heavier pair of stages, so this can miss the peak).
    ``exact``: trace every block instead of a few per stage (:mod:`torchtrain.plan.depth`).
    """
    dims = check_run(config, model_args, world_size, torch.device(target.device_type))
    pipe = pipeline_settings(config, dims.pp)
    pp_ranks = sorted({0, dims.pp - 1}) if ends_only else range(dims.pp)
    roles = [role_plan(measure, config, model_args, dims, target)
             for measure in measure_pipeline_ranks(config, model_args, dims, pp_ranks, target, exact)]
    seq = config.training.seq_len
    tokens = config.training.local_batch_size * config.training.grad_accum_steps * dims.dp * seq / world_size
    plan = Plan(config, dims, gpu, efficiency, roles, model_args.flops_per_token(seq), tokens,
                pipe.schedule if dims.pp > 1 else "", pipe.num_microbatches if dims.pp > 1 else 1)
    plan.bubble = bubble_fraction(pipe.schedule, dims.pp, pipe.num_microbatches, pipe.stages_per_rank)
    plan = on_gpu(plan, gpu)
    if dims.cp > 1 and config.parallelism.cp_rotate == "ring":
        # NOTE: the ring runs inside one opaque op whose point-to-point sends the counters do not see.
        plan.notes.append("cp_rotate = 'ring': its attention FLOPs and point-to-point traffic are not counted, so "
                          "the step time is too low; memory is measured. Plan with 'allgather' to compare speed.")
    return plan


def on_gpu(plan: Plan, gpu: Device) -> Plan:
    """``plan`` timed on ``gpu``: the same measured memory, FLOPs and traffic, that device's rates."""
    roles = [dataclasses.replace(r, time=role_time(r, plan.dims, gpu, plan.efficiency, plan.bubble))
             for r in plan.roles]
    return dataclasses.replace(plan, gpu=gpu, roles=roles)


def measure_pipeline_ranks(config: Config, model_args: ModelArgs, dims: ParallelDims, pp_ranks,
                           target: Target, exact: bool = False) -> list[RankMeasure]:
    """The measure of each pipeline rank of ``pp_ranks``, each rank's stages measured once per kind of rank.

    NOTE: a rank's measured step depends on what its stages hold (the embedding, the output, and its
    blocks in order, by kind: checkpointed or not under "layers"), not on where they sit in the
    pipeline: each rank measured is the first of its stage, so every other mesh coordinate is the
    same. What does depend on the position (the schedule's microbatches in flight and torch's receive
    buffers, which a middle stage holds three kinds of and an end stage one or two) is computed per
    rank from its stage ids by :func:`predicted_peak`. A 1F1B pipeline of 16 ranks is then measured
    as three or four ranks instead of sixteen, and no rank is left out.
    """
    ranks_per_stage = math.prod(dims.sizes) // dims.pp
    kind_of = block_kinds(config, model_args)
    num_stages = pipeline_settings(config, dims.pp).num_stages if dims.pp > 1 else 1
    measured: dict[tuple, RankMeasure] = {}
    out = []
    for pp_rank in pp_ranks:
        blocks = stage_blocks(config, model_args, dims, pp_rank)
        contents = tuple((stage == 0, stage == num_stages - 1, tuple(map(kind_of, ids)))
                         for stage, ids in blocks.items())
        rank = pp_rank * ranks_per_stage
        if contents not in measured:
            measured[contents] = measure_rank_by_depth(config, model_args, dims, rank, target, exact)
        out.append(as_rank(measured[contents], pp_rank, rank, blocks))
    return out


def as_rank(measure: RankMeasure, pp_rank: int, rank: int, blocks: dict[int, list[int]]) -> RankMeasure:
    """``measure`` (of a rank whose stages hold the same contents) as the measure of ``pp_rank``."""
    stages = [dataclasses.replace(stage, stage_id=stage_id, description=describe_stage(stage.description, ids))
              for stage, (stage_id, ids) in zip(measure.stages, blocks.items(), strict=True)]
    return dataclasses.replace(measure, rank=rank, pp_rank=pp_rank, stages=stages)


def role_plan(measure: RankMeasure, config: Config, model_args: ModelArgs, dims: ParallelDims,
              target: Target) -> RolePlan:
    peak, breakdown, in_flight = predicted_peak(measure, config, model_args, dims, target)
    pipe = pipeline_settings(config, dims.pp)
    accum = config.training.grad_accum_steps
    per_step = accum * (pipe.num_microbatches if dims.pp > 1 else 1)  # microbatch forwards per step
    flops = sum(s.flops_per_microbatch for s in measure.stages) * per_step
    attention_flops = sum(s.attention_flops_per_microbatch for s in measure.stages) * per_step
    memory_traffic = (sum(s.memory_bytes_per_microbatch for s in measure.stages) * per_step
                      + measure.memory_bytes_per_step)
    comm: dict[str, CommVolume] = {}
    for stage in measure.stages:
        _add(comm, stage.comm_per_microbatch, per_step)
        _add(comm, stage.comm_per_pipeline_step, 1)
    # The update's collectives (gradient norm) happen once; so does, under pipelining, FSDP's deferred
    # gathering and reduction (measured in the same phase), however many pipeline steps accumulate.
    _add(comm, measure.comm_per_step, 1)
    if dims.pp > 1:
        comm["pp"] = pipeline_sends(measure, config, model_args, dims, target, per_step)
    return RolePlan(measure.pp_rank, measure.rank, " + ".join(s.description for s in measure.stages),
                    measure.num_params, sum(s.num_blocks + 1 for s in measure.stages), peak, breakdown, in_flight,
                    flops, comm, attention_flops, memory_traffic)


def predicted_peak(measure: RankMeasure, config: Config, model_args: ModelArgs, dims: ParallelDims,
                   target: Target) -> tuple[int, dict[str, int], dict]:
    """(peak bytes, breakdown summing to it, most microbatches in flight per stage) of one rank."""
    breakdown = dict(measure.step_peak.by_category)
    peak = measure.step_peak.total
    if dims.pp == 1:
        return peak, breakdown, {}
    pipe = pipeline_settings(config, dims.pp)
    stage_ids = [s.stage_id for s in measure.stages]
    events = backward_events(pipe.schedule, dims.pp, measure.pp_rank, stage_ids, pipe.num_microbatches)
    scheduled = max(_backward_peaks(measure, events))
    breakdown[IN_FLIGHT] = max(0, scheduled - peak)
    peak = max(peak, scheduled)
    # NOTE: the stages hold a microbatch's receive buffers only while it is in flight
    # (parallel/pp.py: InFlightBuffersStage): a received activation is the stage's input, which the
    # forward saves (activations in flight), and the gradient buffers live within one backward (the
    # measured one-microbatch peak has them): nothing grows with the step's microbatch count.
    return peak, breakdown, peak_in_flight(events)


def _backward_peaks(measure: RankMeasure, events: list) -> list[int]:
    """The rank's memory at each backward of its schedule: the stage's measured one-microbatch peak
    (its first backward's, before any gradient exists, then the steady-state one) plus the
    activations of the other microbatches alive then."""
    stages = {s.stage_id: s for s in measure.stages}
    seen: set[int] = set()
    peaks = []
    for event in events:
        stage = stages[event.stage]
        one = stage.peak_bytes if event.stage in seen else stage.first_peak_bytes
        seen.add(event.stage)
        peaks.append(one - stage.activation_bytes
                     + sum(count * stages[s].activation_bytes for s, count in event.in_flight.items()))
    return peaks


def hidden_shard_bytes(config: Config, model_args: ModelArgs, dims: ParallelDims, target: Target) -> int:
    """Bytes of the hidden state one microbatch sends between pipeline stages, ``[B, S / (tp * cp), dim]``."""
    from torchtrain.train import uses_fsdp

    dtype = target.param_dtype if uses_fsdp(config, dims) else torch.float32
    return (microbatch_size(config, dims) * config.training.seq_len // (dims.tp * dims.cp) * model_args.dim
            * torch.tensor([], dtype=dtype).element_size())


def pipeline_sends(measure: RankMeasure, config: Config, model_args: ModelArgs, dims: ParallelDims,
                   target: Target, microbatches: int) -> CommVolume:
    shard = hidden_shard_bytes(config, model_args, dims, target)
    pipe = pipeline_settings(config, dims.pp)
    volume = CommVolume(group_size=dims.pp)
    for stage in measure.stages:
        sends = (stage.stage_id < pipe.num_stages - 1) + (stage.stage_id > 0)  # activation forward, gradient back
        volume.calls["send"] += sends * microbatches
        volume.wire_bytes["send"] += sends * microbatches * shard
    return volume


def _add(total: dict[str, CommVolume], part: dict[str, CommVolume], times: float) -> None:
    for dim, volume in part.items():
        total[dim] = total[dim].plus(volume.scaled(times)) if dim in total else volume.scaled(times)


def dimension_spans(dims: ParallelDims) -> tuple[dict[str, int], dict[str, int]]:
    """(rank distance between neighbours, size) of each mesh dimension, flattened ones included.

    The mesh is row-major, tp innermost; a flattened dimension spans adjacent ones, so its ranks are
    its innermost part's stride apart.
    """
    strides, sizes, stride = {}, dict(zip(MESH_DIMS, dims.sizes)), 1
    for name, size in reversed(list(zip(MESH_DIMS, dims.sizes))):
        strides[name] = stride
        stride *= size
    for name, parts in FLATTENED_DIMS.items():
        strides[name], sizes[name] = strides[parts[-1]], math.prod(sizes[part] for part in parts)
    return strides, sizes


def role_time(role: RolePlan, dims: ParallelDims, gpu: Device, efficiency: float, bubble: float) -> StepTime:
    strides, sizes = dimension_spans(dims)
    seconds = {"fsdp": 0.0, "pp": 0.0, "exposed": 0.0}
    for dim, volume in role.comm_per_step.items():
        crosses = group_crosses_nodes(strides.get(dim, 1), sizes.get(dim, volume.group_size))
        t = comm_seconds(volume.wire_bytes, crosses, gpu)
        seconds["fsdp" if dim in FSDP_DIMS else "pp" if dim == "pp" else "exposed"] += t
    return step_time(role.flops_per_step, role.attention_flops_per_step, role.memory_traffic_per_step,
                     seconds["exposed"], seconds["pp"], seconds["fsdp"], role.fsdp_units, bubble, gpu, efficiency)


def check_world_size(world_size: int) -> None:
    if world_size < 1:
        raise ConfigError(f"--ngpu {world_size}: the number of GPUs must be a positive integer")


def predict_peaks(config: Config, model_args: ModelArgs, world_size: int, target: Target,
                  exact: bool = False) -> list[tuple[int, int]]:
    """(pp_rank, predicted peak bytes) of each pipeline rank: the memory part of a plan alone."""
    dims = check_run(config, model_args, world_size, torch.device(target.device_type))
    peaks = []
    for pp_rank in range(dims.pp):
        measure = measure_rank_by_depth(config, model_args, dims, pp_rank * (world_size // dims.pp), target, exact)
        peaks.append((pp_rank, predicted_peak(measure, config, model_args, dims, target)[0]))
    return peaks
