"""One real training step of one rank, at the full world size, without allocating or communicating.

:func:`measure_rank` joins a fake process group as one rank of the layout, builds the model with
the trainer's own :func:`~torchtrain.train.build_model` (pipeline split, tensor parallel,
activation checkpointing, FSDP), materialises it under ``FakeTensorMode`` (shapes and dtypes,
no data), builds the trainer's optimizer and runs one step under the memory tracker and the
FLOP/collective counter:

* each of the rank's pipeline stages runs the forward and backward of one microbatch of the
  right shape (the first stage gets token ids, later ones the hidden-state shard a schedule
  would send; non-last stages get an output gradient of their output's shape). Under pipeline
  parallelism with FSDP the stages run as the schedule runs them: gradient reduction deferred
  (two microbatches, the second accumulating into the first's unsharded gradients), then the
  schedule's final reduction;
* then gradient clipping (:func:`~torchtrain.train.clip_grad_norm`) and ``optimizer.step()``.

Mixed precision without FSDP is autocast, entered as the trainer's ``train_step`` enters it: once
around each accumulation microbatch, or once around a whole pipeline step (every microbatch of the
schedule), so that autocast's cached casts of the parameters live as long as they do in training.
A GPU plan's ops save for the backward what their CUDA kernels save (:mod:`torchtrain.plan.gpu_ops`).

The same function runs for real (``fake=False``) inside a gloo job: that is how the planner's
accuracy is checked (``tests/workers/plan_memory.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchtrain.config import Config
from torchtrain.data import Batch
from torchtrain.models import ModelArgs
from torchtrain.parallel import ParallelDims, build_mesh
from torchtrain.parallel.mesh import MESH_DIMS
from torchtrain.parallel.pp import pipeline_settings
from torchtrain.plan.counters import CommVolume, StepCounter, comm_since, copy_comm
from torchtrain.plan.gpu_ops import gpu_autograd
from torchtrain.plan.tracker import MemorySnapshot, MemoryTracker, fsdp_known_tensors


def gpu_model_args(config):
    """The recipe's model shape for a GPU run, as the planner traces it: ``model.attention = "auto"`` is
    planned with our Triton op, a stand-in for what auto picks on CUDA (SDPA's flash and cuDNN kernels and
    FlexAttention save the same q, k, v, output and log-sum-exp and run the same FLOPs) that the fake
    step can trace without a device."""
    from torchtrain.models.shape import model_args_for

    args = model_args_for(config, torch.device("cuda"))
    if config.model.attention == "auto":
        args.attention = "triton"
    return args


@dataclass(frozen=True)
class Target:
    """What the plan is for. GPU plans use bf16 and the Triton attention; the CPU target is the
    trainer's CPU path (fp32, sdpa), which is what a gloo run on this machine can check."""

    device_type: str = "cuda"
    param_dtype: torch.dtype = torch.bfloat16


@dataclass
class StageMeasure:
    stage_id: int
    description: str
    activation_bytes: int  # alive from one microbatch's forward to its backward
    # Peak while this stage runs one microbatch (forward + backward) with the gradients of earlier
    # microbatches of the step already allocated (the steady state); with one microbatch per step,
    # the same as first_peak_bytes.
    peak_bytes: int
    flops_per_microbatch: int  # this rank's FLOPs of one microbatch forward + backward (recomputation included)
    comm_per_microbatch: dict[str, CommVolume]
    num_blocks: int = 0
    attention_flops_per_microbatch: int = 0  # the part of flops_per_microbatch that attention ops execute
    memory_bytes_per_microbatch: int = 0  # read and written by its ops without a FLOP formula (counters.py)
    # Under pipeline parallelism with FSDP: the all-gathers of the first microbatch of each pipeline
    # step (the gathered parameters are then kept until the schedule's final reduction).
    comm_per_pipeline_step: dict[str, CommVolume] = field(default_factory=dict)
    first_peak_bytes: int = 0  # the peak of the step's first microbatch (no gradients yet); 0: not measured
    # Autocast's casts of the stage's parameters made by its first microbatch's forward (not in
    # activation_bytes: under a pipeline one copy serves every microbatch of the step).
    cast_parameter_bytes: int = 0


@dataclass
class RankMeasure:
    """One rank's step, as measured; :mod:`torchtrain.plan.report` turns it into a plan."""

    rank: int
    pp_rank: int
    stages: list[StageMeasure]
    num_params: int  # elements this rank stores (its shards)
    step_peak: MemorySnapshot  # the peak of the measured step (one microbatch per stage)
    after_step: MemorySnapshot  # what stays between steps (parameters, optimizer state, gradients freed)
    comm_per_step: dict[str, CommVolume] = field(default_factory=dict)  # collectives once per step / pipeline step
    flops_per_step_extra: int = 0  # FLOPs of the update (norm, clipping): not matmuls, near zero
    memory_bytes_per_step: int = 0  # read and written by the update (clipping, AdamW) once per step
    # What is alive after the last backward, before the update (a quiet moment: the step's
    # persistent memory, by category; torchtrain.plan.depth takes its per-block growth from it).
    after_backward: MemorySnapshot = field(default_factory=MemorySnapshot)


def microbatch_size(config: Config, dims: ParallelDims) -> int:
    """Samples in one forward: the pipeline splits local_batch_size into pp_microbatches."""
    if dims.pp > 1:
        return config.training.local_batch_size // pipeline_settings(config, dims.pp).num_microbatches
    return config.training.local_batch_size


def microbatches_per_step(config: Config, dims: ParallelDims) -> int:
    """Forward-backward passes of each stage per optimizer step."""
    per_pipeline_step = pipeline_settings(config, dims.pp).num_microbatches if dims.pp > 1 else 1
    return config.training.grad_accum_steps * per_pipeline_step


def measure_rank(config: Config, model_args: ModelArgs, dims: ParallelDims, rank: int, target: Target,
                 fake: bool = True, keep_blocks: Optional[dict[int, list[int]]] = None) -> RankMeasure:
    """Build this rank's share of the model and run one measured step (see the module docstring).

    With ``fake=True`` the caller must not be in a process group: a fake one of the layout's world
    size is created for ``rank`` and destroyed after. With ``fake=False`` the caller's (real)
    process group is used and ``rank`` must be this process's rank.

    ``keep_blocks`` ({stage id: block indices}): run the rank's stages with only these of their
    blocks (the ends stay as the stage has them); :mod:`torchtrain.plan.depth` extrapolates from there.
    """
    from torchtrain.train import build_model  # the trainer's own code path

    world_size = dims.pp * dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp
    if fake:
        _clear_dtensor_caches()
        dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        device = torch.device("cpu")
        mesh = build_mesh(dims, device)
        parts = build_model(model_args, config, mesh, dims, device, target.param_dtype, materialize=False)
        if keep_blocks is not None:
            _keep_blocks(parts, keep_blocks, dims)
        fake_mode = _fake_mode() if fake else contextlib.nullcontext()
        with fake_mode, gpu_autograd(target.device_type):
            return _measure(config, model_args, dims, mesh, parts, rank, target, device)
    finally:
        if fake:
            dist.destroy_process_group()


def _clear_dtensor_caches() -> None:
    """Forget DTensor's cached sharding decisions from an earlier (destroyed) fake process group.

    NOTE: DTensor caches each op's output sharding keyed by the input specs, and a device mesh
    compares equal to an earlier one of the same shape, so a cache hit hands this step's outputs the
    earlier mesh, whose process groups no longer exist ("Could not resolve the process group
    registered under the name ..." in the second tensor-parallel measure of a process).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    torch._C._clear_DTensor_sharding_propagator_cache()  # the C++ fast path's own cache
    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
    clear_redistribute_planner_cache()


def _keep_blocks(parts, keep: dict[int, list[int]], dims: ParallelDims) -> None:
    """Drop the blocks not in ``keep`` from the rank's (parallelized, still meta) stages.

    NOTE: done after the trainer's build_model, so the kept blocks are wrapped exactly as in the full
    model (tensor parallel, the checkpointing of their global index, FSDP with the reshard policy of
    their position: the stage's last block is always kept). FSDP's root collects its blocks at the
    first forward, so the dropped ones are simply never seen.
    """
    from torchtrain.parallel.pp import merge_stages

    for stage_id, stage in zip(parts.stage_ids, parts.stages):
        names = set(map(str, keep[stage_id]))
        for name in list(stage.layers.keys()):
            if name not in names:
                del stage.layers[name]
    if dims.pp > 1:
        parts.model = merge_stages(parts.stages)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # NOTE: allow_non_fake_inputs: the device mesh keeps a small real tensor of rank ids.
    return FakeTensorMode(allow_non_fake_inputs=True)


def _measure(config, model_args, dims, mesh, parts, rank, target, device) -> RankMeasure:
    from torchtrain.optim import build_optimizer
    from torchtrain.train import clip_grad_norm, uses_fsdp

    for stage in parts.stages:
        stage.to_empty(device=device)
        if not _is_fake(stage):  # a fake stage has no values to draw; its shapes are all a plan needs
            stage.init_weights(seed=config.job.seed)
    optimizer = build_optimizer(parts.model, config.optimizer, device)
    fsdp = uses_fsdp(config, dims)
    autocast = (torch.autocast(device.type, dtype=target.param_dtype)
                if target.param_dtype != torch.float32 and not fsdp else contextlib.nullcontext())
    # NOTE: as in train_step: a pipeline schedule runs all its microbatches inside one autocast context,
    # so autocast's cached casts of the parameters are made once per step; without a pipeline each
    # microbatch (forward and backward) has its own context.
    step_autocast, microbatch_autocast = ((autocast, contextlib.nullcontext()) if dims.pp > 1
                                          else (contextlib.nullcontext(), autocast))
    pp_rank, pipe = mesh["pp"].get_local_rank(), pipeline_settings(config, dims.pp)
    hidden_dtype = target.param_dtype  # FSDP's cast parameters or autocast: the compute dtype (models/llama.py)

    _create_optimizer_state(parts.model, optimizer)
    tracker = model_state_tracker(parts, optimizer)
    if not isinstance(autocast, contextlib.nullcontext):
        tracker.file_casts_of(parts.model.parameters())
    counter = StepCounter(_group_labels(mesh))

    deferred = fsdp and dims.pp > 1  # the schedule reduces gradients once, after every microbatch
    # NOTE: with more than one microbatch per step (pipelining or accumulation) every backward but
    # the first runs with the stage's gradients already allocated, so a second microbatch is run and
    # its peak is the steady-state one; the first microbatch's peak is kept for the first backward.
    # The rank's stages (several under interleaved schedules) each run once before any runs again:
    # in the steady state of a schedule every stage of the rank has done a backward, so a stage's
    # steady peak includes the gradients of the rank's other stages (measuring each stage's two
    # microbatches in a row left those out: 7 MiB, 8%, on the interleaved accuracy cases).
    runs = 2 if deferred or microbatches_per_step(config, dims) > 1 else 1
    rank_stages = sorted(zip(parts.stage_ids, parts.stages), key=lambda pair: pair[0])
    measures: dict[int, list[StageMeasure]] = {stage_id: [] for stage_id, _ in rank_stages}
    with counter, tracker:  # tracker innermost-entered (top of the mode stack) so it can pause
        with step_autocast:
            for _ in range(runs):
                for stage_id, stage in rank_stages:
                    if deferred:
                        _defer_gradient_reduction(stage)
                    measures[stage_id].append(_run_microbatch(mesh, stage, stage_id, pipe.num_stages, config,
                                                              model_args, dims, hidden_dtype, microbatch_autocast,
                                                              tracker, counter))
        stages = []
        for stage_id, _ in rank_stages:
            first, last = measures[stage_id][0], measures[stage_id][-1]
            stages.append(dataclasses.replace(
                last, activation_bytes=first.activation_bytes, first_peak_bytes=first.peak_bytes,
                cast_parameter_bytes=first.cast_parameter_bytes,
                comm_per_pipeline_step=comm_since(first.comm_per_microbatch, last.comm_per_microbatch)
                if deferred else {}))
        before_update, memory_before_update = copy_comm(counter.comm), counter.memory_bytes
        tracker.classify_known()
        after_backward = tracker.current.copy()
        if deferred:
            for stage in parts.stages:
                _reduce_deferred_gradients(stage)
        params = [p for p in parts.model.parameters() if p.grad is not None]
        pp_group = mesh["pp"].get_group() if dims.pp > 1 else None
        clip_grad_norm(params, config.training.max_norm, pp_group)
        with tracker.paused():
            # NOTE: under FakeTensorMode the fused AdamW's fake kernel leaves per-parameter
            # temporaries alive (a 7B model's step read as 109 GiB); the real kernel has none worth
            # counting, so the step runs unwatched and only the state it creates is counted.
            optimizer.step()
        track_optimizer_state(tracker, optimizer)
        tracker.check_peak()
        step_peak = tracker.peak.copy()
        optimizer.zero_grad(set_to_none=True)
        after_step = tracker.current.copy()
    per_step = comm_since(counter.comm, before_update)
    update_memory_bytes = counter.memory_bytes - memory_before_update
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parts.model.parameters())
    return RankMeasure(rank, pp_rank, stages, held, step_peak, after_step, per_step,
                       memory_bytes_per_step=update_memory_bytes, after_backward=after_backward)


def _create_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Measure a steady-state step: AdamW's moments exist from the second step on, through the
    whole forward and backward, so they are created first (a step on zero gradients)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def model_state_tracker(parts, optimizer: torch.optim.Optimizer) -> MemoryTracker:
    """A tracker with the model's parameters and buffers and the optimizer's state filed.

    The planner's fake step and the real runs it is checked against (tests/workers/plan_memory.py)
    both start from this, so they classify memory alike.
    """
    tracker = MemoryTracker(lambda: known_tensors(parts))
    for p in parts.model.parameters():
        tracker.track(p, "parameters")
    track_optimizer_state(tracker, optimizer)
    for stage in parts.stages:
        for b in stage.buffers():
            tracker.track(b, "parameters")
    return tracker


def track_optimizer_state(tracker: MemoryTracker, optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                tracker.track(value, "optimizer state")


def _is_fake(module: torch.nn.Module) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    p = next(module.parameters(), None)
    local = p.to_local() if isinstance(p, DTensor) else p
    return isinstance(local, FakeTensor)


def known_tensors(parts):
    """(category, tensor) of the tensors only FSDP or autograd point to (see MemoryTracker).

    NOTE: the stage modules are walked as well as ``parts.model``: under pipeline parallelism the
    model merges the stages' blocks but not the stages themselves, whose root FSDP unit holds the
    embedding and output projection (missing them filed their gathered copies as activations).
    """
    for module in (parts.model, *parts.stages):
        yield from fsdp_known_tensors(module.modules())
    for p in parts.model.parameters():
        yield "gradients", p.grad


def _group_labels(mesh) -> dict[str, str]:
    """Process group name -> the mesh dimension it spans, the flattened ones included.

    NOTE: FSDP runs over its own mesh (``dp_shard_cp``, and with HSDP a copy of ``dp_replicate``),
    whose groups are not the world mesh's: left unnamed, FSDP's traffic showed as "group of N" and
    was timed as exposed whenever FSDP was combined with CP, TP or PP.
    """
    named = [(mesh.world, name) for name in MESH_DIMS]
    named += [(mesh.fsdp, name) for name in mesh.fsdp.mesh_dim_names] + [(mesh.dp, "dp"), (mesh.dp_cp, "dp_cp")]
    labels = {}
    for device_mesh, name in named:
        if device_mesh.size(device_mesh.mesh_dim_names.index(name)) > 1:
            labels.setdefault(device_mesh.get_group(name).group_name, name)  # a world dimension's name first
    return labels


def _run_microbatch(mesh, stage, stage_id, num_stages, config, model_args, dims, hidden_dtype, autocast,
                    tracker: MemoryTracker, counter: StepCounter) -> StageMeasure:
    from torchtrain.train import attention_inputs

    is_first, is_last = stage.tok_embeddings is not None, stage.output is not None
    flops_before, attention_before, comm_before = counter.flops, counter.attention_flops, copy_comm(counter.comm)
    memory_before = counter.memory_bytes
    tracker.reset_peak()
    before = tracker.current.by_category["activations"]
    casts_before = tracker.current.by_category["cast parameters"]
    batch = _shard_for_cp(mesh, config, _fake_batch(microbatch_size(config, dims), config.training.seq_len,
                                                     model_args.vocab_size))
    if is_first:
        inputs = batch.tokens
    else:
        # The hidden-state shard a schedule sends: [B, S / (tp * cp), dim] (see parallel/tp.py).
        seq = config.training.seq_len // (dims.tp * dims.cp)
        inputs = torch.zeros(batch.tokens.shape[0], seq, model_args.dim, dtype=hidden_dtype, requires_grad=True)
    with autocast:
        out = stage(inputs, labels=batch.labels, **attention_inputs(batch, config))
        # NOTE: only what the forward saved for the backward is per microbatch; the forward's growth
        # in total memory also holds FSDP's gathered parameters and all-gather buffers, and autocast's
        # cached parameter casts, which a second microbatch in flight does not duplicate (counting
        # gathered parameters over-predicted PP x FSDP by 12%).
        tracker.classify_known()
        activation_bytes = tracker.current.by_category["activations"] - before
        cast_bytes = tracker.current.by_category["cast parameters"] - casts_before
        if is_last:
            (out / float(batch.tokens.numel())).backward()
        else:
            out.backward(torch.ones_like(out))
        del out, inputs, batch
    return StageMeasure(stage_id, _describe(stage), activation_bytes, tracker.peak.total,
                        counter.flops - flops_before, comm_since(counter.comm, comm_before), len(stage.layers),
                        attention_flops_per_microbatch=counter.attention_flops - attention_before,
                        memory_bytes_per_microbatch=counter.memory_bytes - memory_before,
                        cast_parameter_bytes=cast_bytes)


def _shard_for_cp(mesh, config: Config, batch: Batch) -> Batch:
    """This rank's share of the sequence under context parallelism, cut by the trainer's own sharder."""
    if config.parallelism.cp == 1:
        return batch
    from torchtrain.parallel.cp import batch_sharder

    return batch_sharder(mesh, config.data.document_mask)(batch)


def _fake_batch(batch_size: int, seq_len: int, vocab_size: int) -> Batch:
    """A batch of the loader's shapes and dtypes; values do not matter to memory or FLOPs."""
    shape = (batch_size, seq_len)
    labels = torch.zeros(shape, dtype=torch.long)
    return Batch(tokens=torch.zeros(shape, dtype=torch.long), labels=labels,
                 document_ids=torch.zeros(shape, dtype=torch.int32),
                 positions=torch.arange(seq_len).expand(shape).contiguous())


def _defer_gradient_reduction(stage: torch.nn.Module) -> None:
    # What torch's PipelineStage.backward_maybe_with_nosync does for an FSDP stage before each backward.
    if isinstance(stage, FSDPModule):
        stage.set_is_last_backward(False)
        stage.set_reshard_after_backward(False)
        stage.set_requires_gradient_sync(False)


def _reduce_deferred_gradients(stage: torch.nn.Module) -> None:
    # What torch's PipelineStage.perform_reduce_grad does after the schedule's last backward.
    if not isinstance(stage, FSDPModule):
        return
    from torch.distributed.fsdp import fully_shard

    stage.set_is_last_backward(True)
    stage.set_reshard_after_backward(True)
    stage.set_requires_gradient_sync(True)
    state = fully_shard.state(stage)
    for each in state._state_ctx.all_states:
        for group in each._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()


def _describe(stage: torch.nn.Module) -> str:
    keys = [int(k) for k in stage.layers.keys()]
    return (("embed + " if stage.tok_embeddings is not None else "")
            + (f"blocks {min(keys)}-{max(keys)}" if keys else "no blocks")
            + (" + output" if stage.output is not None else ""))
