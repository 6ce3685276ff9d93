"""Pipeline parallelism: consecutive blocks per stage, run by a ``torch.distributed.pipelining`` schedule.

The flow on each pipeline rank::

    with torch.device("meta"):
        model = Transformer(args)
    layers = split_layers(args, num_stages, parallelism.pp_layers_per_stage, seq_len)
    stage_ids = stage_ids_for_rank(pp_rank, pp_size, stages_per_rank, schedule)
    modules = [build_stage(model, layers[s], s == 0, s == num_stages - 1) for s in stage_ids]
    # ... TP -> AC -> compile -> FSDP on each module, to_empty, init_weights / load ...
    pipeline = build_pipeline(modules, stage_ids, num_stages, pp_mesh, device, schedule, num_microbatches)
    loss_sum = pipeline.step(tokens, labels, num_valid_tokens, positions=..., document_ids=...)

A stage module is an ordinary :class:`~torchtrain.models.Transformer` that lost the blocks of the
other stages (the survivors keep their keys ``layers.<i>``, so checkpoints and parameter names
are the same as without pipelining) and, unless it is the first or last stage, its embedding or
its final norm and output projection. Everything that parallelizes a ``Transformer`` therefore
applies to a stage unchanged.

The schedule splits the batch into microbatches along dim 0 and sends every keyword argument
(``labels``, ``positions``, ``document_ids``) to every stage, split the same way. The last stage is
called with the labels, so its output is the summed token loss of its microbatch; the schedule's
loss function only divides that by the step's divisor (the trainer's global count of valid
tokens), and the schedule is built with ``scale_grads=False`` so nothing else rescales.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FULL_BACKWARD,
    REDUCE_GRAD,
    _PipelineScheduleRuntime,
)

from torchtrain.config import Config
from torchtrain.models.llama import ModelArgs, Transformer

__all__ = ["SCHEDULES", "Pipeline", "PipelineSettings", "build_pipeline", "build_stage", "check_schedule",
           "merge_stages", "pipeline_settings", "resolve_microbatches", "resolve_stages_per_rank", "split_layers",
           "split_model", "stage_ids_for_rank"]

logger = logging.getLogger(__name__)

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}
_SINGLE_STAGE = ("gpipe", "1f1b")  # one stage per rank
ZERO_BUBBLE_SCHEDULES = ("interleaved_zb", "zbv")  # backward split into input-gradient and weight-gradient passes


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------

def resolve_stages_per_rank(schedule: str, stages_per_rank: int = 0) -> int:
    """Stages each rank holds: ``stages_per_rank``, or the schedule's default when it is 0.

    gpipe and 1f1b run exactly one stage per rank; the interleaved schedules need at least two
    (with one they are plain 1F1B); zbv's V shape is exactly two. Defaults: 1, 2, 2.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"parallelism.pp_schedule={schedule!r} is not known; valid choices: {list(SCHEDULES)}")
    if stages_per_rank < 0:
        raise ValueError(f"parallelism.pp_stages_per_rank must be >= 0 (0 = the schedule's default), "
                         f"got {stages_per_rank}")
    if stages_per_rank == 0:
        return 1 if schedule in _SINGLE_STAGE else 2
    if schedule in _SINGLE_STAGE and stages_per_rank != 1:
        raise ValueError(f"parallelism.pp_schedule={schedule!r} runs one stage per rank, but "
                         f"parallelism.pp_stages_per_rank={stages_per_rank}; use 1 (or 0), or an interleaved schedule")
    if schedule.startswith("interleaved") and stages_per_rank < 2:
        raise ValueError(f"parallelism.pp_schedule={schedule!r} needs parallelism.pp_stages_per_rank >= 2, "
                         f"got {stages_per_rank}")
    if schedule == "zbv" and stages_per_rank != 2:
        raise ValueError(f"parallelism.pp_schedule='zbv' needs exactly 2 stages per rank (its V shape), "
                         f"but parallelism.pp_stages_per_rank={stages_per_rank}")
    return stages_per_rank


def resolve_microbatches(num_microbatches: int, local_batch_size: int) -> int:
    """Microbatches per pipeline step: ``num_microbatches``, or one per sample when it is 0.

    NOTE: one sample per microbatch is the default because more microbatches shrink the pipeline
    bubble (idle fraction ~ (stages - 1) / microbatches for 1F1B); the cost is smaller matmuls.
    """
    if num_microbatches < 0:
        raise ValueError(f"parallelism.pp_microbatches must be >= 0 (0 = one per sample), got {num_microbatches}")
    if num_microbatches == 0:
        return local_batch_size
    if local_batch_size % num_microbatches:
        raise ValueError(f"parallelism.pp_microbatches={num_microbatches} must divide "
                         f"training.local_batch_size={local_batch_size}")
    return num_microbatches


@dataclass(frozen=True)
class PipelineSettings:
    """The recipe's pipeline settings with their defaults (0 = automatic) filled in."""

    schedule: str
    stages_per_rank: int
    num_stages: int
    num_microbatches: int


def pipeline_settings(config: Config, pp_size: int) -> PipelineSettings:
    p = config.parallelism
    stages_per_rank = resolve_stages_per_rank(p.pp_schedule, p.pp_stages_per_rank)
    microbatches = resolve_microbatches(p.pp_microbatches, config.training.local_batch_size)
    return PipelineSettings(p.pp_schedule, stages_per_rank, pp_size * stages_per_rank, microbatches)


def check_schedule(schedule: str, pp_size: int, stages_per_rank: int, num_microbatches: int) -> None:
    """Raise ``ValueError`` for settings the installed schedule would reject later, less clearly.

    The constraints are those of torch's own constructors (torch/distributed/pipelining/schedules.py).
    """
    resolve_stages_per_rank(schedule, stages_per_rank)
    num_stages = pp_size * stages_per_rank
    if schedule == "1f1b" and num_microbatches < num_stages:
        raise ValueError(f"parallelism.pp_schedule='1f1b' needs at least one microbatch per stage: "
                         f"parallelism.pp_microbatches={num_microbatches} < {num_stages} stages")
    if schedule.startswith("interleaved"):
        # NOTE: torch runs max(1, microbatches // pp) rounds of equal size ("flexible" interleaving).
        rounds = max(1, num_microbatches // pp_size)
        if num_microbatches % rounds:
            raise ValueError(
                f"parallelism.pp_schedule={schedule!r} runs the microbatches in {rounds} equal rounds "
                f"(microbatches // pp = {num_microbatches} // {pp_size}), so parallelism.pp_microbatches="
                f"{num_microbatches} must be a multiple of {rounds}; a multiple of pp={pp_size} always works")


# ---------------------------------------------------------------------------------------
# Splitting the model
# ---------------------------------------------------------------------------------------

def _stage_costs(args: ModelArgs, seq_len: int) -> tuple[int, int, int]:
    """Training FLOPs per token of (one block, the first stage's extra, the last stage's extra).

    A block: its share of ``ModelArgs.flops_per_token``, i.e. ``6 * block_params + 12 * d * s``.
    The last stage's extra: final norm, output projection and loss, ``6 * (d * V + d)`` (the
    projection's matmul forward and its two gradient matmuls; the loss itself is elementwise).
    The first stage's extra: the embedding lookup, a gather of ``d`` values forward and a
    scatter-add of ``d`` backward. It does no matmul; we count it as ``6 * d``, the same as a
    norm's weight, i.e. as bytes moved rather than FLOPs: negligible next to a block, but it
    makes the first stage the one that gives up a block when two splits are otherwise equal.
    """
    d, vocab = args.dim, args.vocab_size
    head = 6 * (d * vocab + d)
    block = (args.flops_per_token(seq_len) - head) // args.num_layers
    return block, 6 * d, head


def _best_split(num_layers: int, min_blocks: list[int], stage_cost, combine, cap: float = math.inf) -> tuple:
    """Exact DP over contiguous splits: ``(value, blocks per stage)`` minimising a fold of the stage costs.

    ``stage_cost(k, blocks)`` is stage k's cost; ``combine(folded, cost)`` folds one more stage
    in (``max`` for the bottleneck, ``a + c * c`` for evenness); stages costing more than ``cap``
    are not allowed. O(stages x layers^2): microseconds at these sizes.
    """
    num_stages = len(min_blocks)
    # best[k][end]: the best fold over the first k stages holding blocks [0, end).
    best = [[math.inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(num_stages):
        for end in range(num_layers + 1):
            for start in range(end - min_blocks[k] + 1):
                cost = stage_cost(k, end - start)
                value = combine(best[k][start], cost)
                if cost <= cap and value < best[k + 1][end]:
                    best[k + 1][end], choice[k + 1][end] = value, start
    sizes, end = [], num_layers
    for k in range(num_stages, 0, -1):
        sizes.append(end - choice[k][end])
        end = choice[k][end]
    return best[num_stages][num_layers], sizes[::-1]


def _min_blocks(num_stages: int) -> list[int]:
    """Fewest blocks each stage may hold: 1, except the first and last stage, which may hold none.

    NOTE: the ends carry vocabulary-sized work (the embedding; the output projection and loss,
    ~2.4 blocks' worth for Llama-3-8B), so a stage of only the head can be the balanced choice;
    a middle stage without blocks would only pass activations on.
    """
    if num_stages == 1:
        return [1]
    return [0] + [1] * (num_stages - 2) + [0]


# NOTE: cached because the planner's search checks every layout it enumerates (3,492 for a 70B model on
# 128 GPUs), each pipelined one splitting the same model into one of a few stage counts: uncached, those
# checks took 40 s on two CPU cores, cached half a second.
@functools.lru_cache(maxsize=256)
def _balanced_sizes(num_layers: int, num_stages: int, block: int, first: int, last: int) -> tuple[int, ...]:
    """Blocks per stage of the split that minimises the most expensive stage (see :func:`split_layers`)."""
    extra = [0] * num_stages
    extra[0] += first
    extra[-1] += last

    def stage_cost(k: int, blocks: int) -> int:
        return blocks * block + extra[k]

    # NOTE: many splits share the smallest bottleneck; among them, the smallest sum of squared
    # stage costs is the one whose other stages are also as even as possible.
    min_blocks = _min_blocks(num_stages)
    cap, _ = _best_split(num_layers, min_blocks, stage_cost, max)
    _, sizes = _best_split(num_layers, min_blocks, stage_cost, lambda a, c: a + c * c, cap)
    return tuple(sizes)


def split_layers(model_args: ModelArgs, num_stages: int, layers_per_stage: Optional[list[int]] = None,
                 seq_len: Optional[int] = None) -> list[list[int]]:
    """Block indices of each pipeline stage, in order: contiguous, every block exactly once.

    ``layers_per_stage`` (``parallelism.pp_layers_per_stage``) gives the count per stage
    explicitly. Otherwise the split minimises the cost of the most expensive stage (the pipeline
    runs at the pace of its slowest stage), with cost = training FLOPs per token at ``seq_len``
    (default ``model_args.max_seq_len``): each block's, plus the embedding on the first stage and
    the final norm, output projection and loss on the last (see :func:`_stage_costs`); ties go to
    the most even split. Middle stages hold at least one block; the first and last may hold none
    (see :func:`_min_blocks`).
    """
    num_layers = model_args.num_layers
    if num_stages < 1:
        raise ValueError(f"the number of pipeline stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages (parallelism.pp x parallelism.pp_stages_per_rank) "
                         f"but the model has only {num_layers} blocks; use fewer stages")
    min_blocks = _min_blocks(num_stages)
    if layers_per_stage:
        sizes = list(layers_per_stage)
        if len(sizes) != num_stages:
            raise ValueError(f"parallelism.pp_layers_per_stage={sizes} has {len(sizes)} entries, "
                             f"but there are {num_stages} stages (parallelism.pp x parallelism.pp_stages_per_rank)")
        if any(size < low for size, low in zip(sizes, min_blocks)):
            raise ValueError(f"parallelism.pp_layers_per_stage={sizes}: every stage but the first and last "
                             "needs at least 1 block, and no count may be negative")
        if sum(sizes) != num_layers:
            raise ValueError(f"parallelism.pp_layers_per_stage={sizes} sums to {sum(sizes)}, "
                             f"but the model has {num_layers} blocks")
    else:
        sizes = _balanced_sizes(num_layers, num_stages, *_stage_costs(model_args, seq_len or model_args.max_seq_len))
    starts = [sum(sizes[:k]) for k in range(num_stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


def stage_ids_for_rank(pp_rank: int, pp_size: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stages pipeline rank ``pp_rank`` holds, in increasing order.

    "Loop" placement (gpipe, 1f1b, interleaved): rank r holds r, r + pp, r + 2 pp, ... "V"
    placement (zbv, exactly 2 per rank): rank r holds r and 2 pp - 1 - r, so the first and last
    stage share rank 0 and the turn of the V (stages pp - 1 and pp) needs no communication.
    These must match how each torch schedule maps stages to ranks, or stages would wait for
    activations from the wrong peer.
    """
    stages_per_rank = resolve_stages_per_rank(schedule, stages_per_rank)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside [0, {pp_size})")
    if schedule == "zbv":
        return sorted([pp_rank, 2 * pp_size - 1 - pp_rank])
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def build_stage(model: Transformer, layer_ids: list[int], is_first: bool, is_last: bool) -> Transformer:
    """A copy of ``model`` that keeps only the blocks ``layer_ids`` and, if first/last, the ends.

    Build ``model`` on the meta device: the deep copy then allocates nothing. The blocks keep
    their keys (``layers.<i>``), ``tok_embeddings`` is ``None`` unless ``is_first``, and ``norm``
    and ``output`` are ``None`` unless ``is_last``. Apply TP, activation checkpointing, compile and
    FSDP to the returned module afterwards, as to a whole model.
    """
    if model.args.tie_embeddings and not (is_first and is_last):
        raise ValueError("model.tie_embeddings: a tied output projection shares the embedding's weight, which a "
                         "pipeline puts on different stages; pipeline parallelism needs an untied model")
    unknown = sorted(set(map(str, layer_ids)) - set(model.layers.keys()))
    if unknown:
        raise ValueError(f"blocks {unknown} are not in the model (it has {list(model.layers.keys())})")
    stage = copy.deepcopy(model)
    keep = set(map(str, layer_ids))
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if not is_first:
        stage.tok_embeddings = None
    if not is_last:
        stage.norm = None
        stage.output = None
    return stage


def split_model(model: Transformer, config: Config, pp_size: int, pp_rank: int) -> tuple[list[int], list[Transformer]]:
    """Pipeline rank ``pp_rank``'s stages of ``model`` (on the meta device) and their stage ids: the
    recipe's split of the blocks (:func:`split_layers`), placed by its schedule. At pp = 1, ``model``
    itself is stage 0."""
    if pp_size == 1:
        return [0], [model]
    pipe = pipeline_settings(config, pp_size)
    layers = split_layers(model.args, pipe.num_stages, config.parallelism.pp_layers_per_stage, config.training.seq_len)
    stage_ids = stage_ids_for_rank(pp_rank, pp_size, pipe.stages_per_rank, pipe.schedule)
    return stage_ids, [build_stage(model, layers[i], i == 0, i == pipe.num_stages - 1) for i in stage_ids]


def merge_stages(stages: list[nn.Module]) -> nn.Module:
    """One module holding the parameters of this rank's stages under the whole model's names.

    It is never run: the optimizer, the gradient norm and checkpoints use it, so a checkpoint
    saved with any pipeline split (or none) holds ``layers.<i>...`` keys that load into any other.
    The stages' own modules are shared, not copied, so it sees their parallelized parameters.
    """
    merged = nn.Module()
    merged.layers = nn.ModuleDict()
    for stage in stages:
        for end in ("tok_embeddings", "norm", "output"):
            if getattr(stage, end) is not None:
                merged.add_module(end, getattr(stage, end))
        for key, block in stage.layers.items():
            merged.layers[key] = block
    return merged


# ---------------------------------------------------------------------------------------
# Running the schedule
# ---------------------------------------------------------------------------------------

def _scaled_loss(output: Tensor, target: Tensor, *, divisor: Union[Tensor, float], sums: list[Tensor]) -> Tensor:
    """The schedule's loss function: the last stage already returns its microbatch's summed loss.

    Divides by this step's ``divisor`` (the global count of valid tokens) and records the
    undivided sum for logging. ``target`` is unused: the labels reach the model as a keyword.
    """
    sums.append(output.detach())
    return output / divisor


def _reduction_left_to_a_later_step(grad_scale_factor: int) -> None:
    """Stands in for ``PipelineStage.perform_reduce_grad`` (see :meth:`Pipeline._gradients_kept_unreduced`)."""


def _skip_action(action, ctx) -> None:
    """Skip a backward or gradient-reduction action of the schedule (see :meth:`Pipeline._forward_only`).

    Drops the gradient receive the schedule posted for a backward action (an empty list of
    requests when the stages have no backward), as the action itself would have consumed it.
    """
    ctx.schedule_ref.bwd_recv_ops.pop((action.stage_index, action.microbatch_index), None)


@dataclass
class Pipeline:
    """The schedule and this rank's stages; :meth:`step` trains, :meth:`eval_step` evaluates."""

    schedule: Union[ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble,
                    ScheduleZBVZeroBubble]
    stages: list[PipelineStage]
    num_microbatches: int
    has_first_stage: bool
    has_last_stage: bool

    def step(self, tokens: Tensor, labels: Tensor, loss_divisor: Union[Tensor, float],
             positions: Optional[Tensor] = None, document_ids: Optional[Tensor] = None,
             reduce_gradients: bool = True) -> Optional[Tensor]:
        """Forward and backward of one batch through the pipeline; gradients accumulate into ``.grad``.

        Every pipeline rank passes the same batch (``tokens`` is read by the first stage only,
        ``labels`` by the last). The gradient is that of ``sum of token losses / loss_divisor``,
        which may differ every step. Returns the undivided summed loss (a detached fp32 scalar)
        on the rank holding the last stage, else ``None``. ``reduce_gradients=False`` (every
        accumulation step of an optimizer step but the last) leaves FSDP's gradients unreduced and
        its parameters gathered, to be reduced once by the step that reduces.
        """
        with contextlib.nullcontext() if reduce_gradients else self._gradients_kept_unreduced():
            return self._run(self.schedule.step, tokens, labels, loss_divisor, positions, document_ids)

    @contextlib.contextmanager
    def _gradients_kept_unreduced(self):
        """Make this step's schedule skip FSDP's gradient reduction.

        NOTE: every schedule of the installed torch ends a step with ``PipelineStage.perform_reduce_grad``
        (single-stage schedules call it, the others through their REDUCE_GRAD action): FSDP's
        reduce-scatter of what the step's microbatches accumulated, then resharding. The stages'
        backwards run with FSDP's gradient sync off, so with that call shadowed for the step the
        gradients stay unsharded and keep accumulating, and the parameters stay gathered: an
        optimizer step of several pipeline steps gathers and reduces once, as without a pipeline
        (it gathered and reduced once per pipeline step before).
        """
        for stage in self.stages:
            stage.perform_reduce_grad = _reduction_left_to_a_later_step
        try:
            yield
        finally:
            for stage in self.stages:
                del stage.perform_reduce_grad

    @torch.no_grad()
    def eval_step(self, tokens: Tensor, labels: Tensor, positions: Optional[Tensor] = None,
                  document_ids: Optional[Tensor] = None) -> Optional[Tensor]:
        """Forward only: the summed token loss of the batch on the last stage's rank, else ``None``.

        NOTE: torch infers the shapes sent between stages on the first call after each switch
        between ``step`` and ``eval_step`` (one extra microbatch forward per stage, plus a backward
        when switching back to training), so consecutive calls of one kind need batches of one
        shape, split into the same ``num_microbatches``.
        """
        with self._forward_only():
            return self._run(self.schedule.eval, tokens, labels, 1.0, positions, document_ids)

    @contextlib.contextmanager
    def _forward_only(self):
        """Make the multi-stage schedules skip their backward and gradient-reduction actions.

        NOTE: ``schedule.eval`` only marks the stages as having no backward, and the schedule
        still walks its backward actions. In the installed torch, the zbv schedule's input-gradient
        action then hands a gradient between its two stages on the same rank and fails ("can't
        steal_bwd_input if this stage doesn't have backward"), and the FSDP gradient reduction still
        runs at the end. Registering no-op functions for those actions (torch's
        ``register_custom_function`` hook) for the duration of the evaluation avoids both.
        """
        schedule = self.schedule
        if not isinstance(schedule, _PipelineScheduleRuntime):
            yield
            return
        saved = dict(schedule._comp_type_to_function_map)
        try:
            for action in (FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, REDUCE_GRAD):
                schedule.register_custom_function(action, _skip_action)
            yield
        finally:
            schedule._comp_type_to_function_map.clear()
            schedule._comp_type_to_function_map.update(saved)

    def _run(self, run, tokens: Tensor, labels: Tensor, loss_divisor: Union[Tensor, float],
             positions: Optional[Tensor], document_ids: Optional[Tensor]) -> Optional[Tensor]:
        batch = tokens.shape[0]
        if batch % self.num_microbatches:
            raise ValueError(f"a batch of {batch} samples does not split into parallelism.pp_microbatches="
                             f"{self.num_microbatches} microbatches (training.local_batch_size must be a multiple)")
        kwargs = {"labels": labels}
        if positions is not None:
            # NOTE: keyword arguments are split along dim 0 like the batch; one shared [S] row would be cut.
            kwargs["positions"] = positions.expand(batch, -1) if positions.dim() == 1 else positions
        if document_ids is not None:
            kwargs["document_ids"] = document_ids
        sums: list[Tensor] = []
        # NOTE: return_outputs=False: the outputs are scalar losses, which torch's merge (a cat
        # along dim 0) cannot join; the losses come back through `sums` instead.
        run(tokens, target=labels, return_outputs=False,
            loss_kwargs={"divisor": loss_divisor, "sums": sums}, **kwargs)
        if not self.has_last_stage:
            return None
        # The first step (and each switch between step and eval_step) also calls the loss once while
        # torch infers the stages' shapes, before any microbatch: keep the microbatches' calls only.
        return torch.stack(sums[-self.num_microbatches:]).sum()


class InFlightBuffersStage(PipelineStage):
    """A ``PipelineStage`` that holds a microbatch's receive buffers only while the microbatch is in flight.

    NOTE: torch's stage allocates, on its first step, a receive buffer per microbatch of the step for
    the activation from the previous stage (``args_recv_info``) and one for the gradient from the next
    (``grad_recv_info``), and keeps them for good; a received activation is an autograd leaf, so its
    gradient stays too, until the next step. That is 3 x microbatches hidden-state shards per stage,
    growing with the step's microbatch count instead of the schedule's bound (Megatron allocates per
    microbatch in flight): 16 GiB per buffer kind for Llama-2-70B at 32k, TP 8, 256 microbatches.
    Here a buffer is made just before its receive is posted and the stage's reference to it dropped
    once the microbatch's backward is done (autograd keeps what its saved tensors need), so the
    stage holds the receive buffers of the microbatches between forward and backward only.
    ``_retrieve_recv_activations`` and the gradient retrieval read the same ``_RecvInfo.buffer`` the
    receive filled; local hand-overs between two stages of one rank set it themselves.
    """

    def _prepare_forward_infra(self, *args, **kwargs):
        meta = super()._prepare_forward_infra(*args, **kwargs)
        for infos in self.args_recv_info.values():
            _drop_buffers(infos)
        return meta

    def _prepare_backward_infra(self, *args, **kwargs):
        meta = super()._prepare_backward_infra(*args, **kwargs)
        for infos in self.grad_recv_info.values():
            _drop_buffers(infos)
        return meta

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        self._allocate(self.args_recv_info[fwd_chunk_id])
        return super().get_fwd_recv_ops(fwd_chunk_id)

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        self._allocate(self.grad_recv_info[bwd_chunk_id])
        return super().get_bwd_recv_ops(bwd_chunk_id)

    def backward_one_chunk(self, bwd_chunk_id: int, loss=None, *args, **kwargs):
        result = super().backward_one_chunk(bwd_chunk_id, loss, *args, **kwargs)
        _drop_buffers(self.args_recv_info.get(bwd_chunk_id, ()))
        _drop_buffers(self.grad_recv_info.get(bwd_chunk_id, ()))
        if loss is not None:
            # NOTE: the schedule keeps every microbatch's loss until the step ends; through the graph's
            # AccumulateGrad node it kept the microbatch's received activation alive (one hidden-state
            # shard per microbatch on the last stage, measured). Cut off from its graph, it keeps nothing.
            loss.detach_()
        return result

    def _allocate(self, infos) -> None:
        for info in infos:
            if not info.is_root_arg and info.buffer is None and info.tensor_meta is not None:
                meta = info.tensor_meta  # the layout the sending stage announced, strides included
                info.buffer = torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device=self.device)


def _drop_buffers(infos) -> None:
    for info in infos:
        if not info.is_root_arg:
            info.buffer = None


def build_pipeline(stage_modules: list[nn.Module], stage_ids: list[int], num_stages: int,
                   pp_group: Union[dist.ProcessGroup, DeviceMesh], device: torch.device, schedule_name: str,
                   num_microbatches: int) -> Pipeline:
    """Wrap this rank's stage modules in ``PipelineStage`` s and build the named schedule.

    ``stage_ids`` are the stages of ``stage_modules`` (from :func:`stage_ids_for_rank`), out of
    ``num_stages``; ``pp_group`` is the pipeline process group or the 1-D "pp" mesh. The schedule
    runs ``num_microbatches`` per :meth:`Pipeline.step` and does not rescale gradients
    (``scale_grads=False``): the loss is already divided by the global count of valid tokens.

    With FSDP on the stage modules, the schedule defers gradient reduction to the last
    microbatch's backward itself (``set_requires_gradient_sync(False)`` until then).
    """
    group = pp_group.get_group() if isinstance(pp_group, DeviceMesh) else pp_group
    pp_size = dist.get_world_size(group)
    if len(stage_modules) != len(stage_ids):
        raise ValueError(f"{len(stage_modules)} stage modules but {len(stage_ids)} stage ids")
    stages_per_rank = len(stage_ids)
    if num_stages != pp_size * stages_per_rank:
        raise ValueError(f"{num_stages} stages do not fill {pp_size} pipeline ranks with {stages_per_rank} each "
                         "(parallelism.pp_stages_per_rank must be the same on every rank)")
    check_schedule(schedule_name, pp_size, stages_per_rank, num_microbatches)
    expected = stage_ids_for_rank(dist.get_rank(group), pp_size, stages_per_rank, schedule_name)
    if sorted(stage_ids) != expected:
        raise ValueError(f"parallelism.pp_schedule={schedule_name!r} places stages {expected} on this rank, "
                         f"got {sorted(stage_ids)}")
    if schedule_name in ZERO_BUBBLE_SCHEDULES and any(
            isinstance(m, OptimizedModule) for mod in stage_modules for m in mod.modules()):
        # NOTE: torch splits the backward into input and weight passes by walking the autograd
        # graph, which a compiled region hides; its constructor raises a RuntimeError.
        raise ValueError(f"parallelism.pp_schedule={schedule_name!r} splits the backward in two, which "
                         "torch does not support for compiled blocks; set compile.enabled=false or use "
                         "1f1b / interleaved_1f1b")
    order = sorted(range(len(stage_ids)), key=lambda k: stage_ids[k])
    stages = [InFlightBuffersStage(stage_modules[k], stage_ids[k], num_stages, device, group=group) for k in order]
    schedule_cls = SCHEDULES[schedule_name]
    common = dict(n_microbatches=num_microbatches, loss_fn=_scaled_loss, scale_grads=False)
    if schedule_name in _SINGLE_STAGE:
        schedule = schedule_cls(stages[0], **common)
    else:
        schedule = schedule_cls(stages, **common)
    logger.info("pipeline: %s, %d stages (this rank: %s), %d microbatches",
                schedule_name, num_stages, [s.stage_index for s in stages], num_microbatches)
    return Pipeline(schedule=schedule, stages=stages, num_microbatches=num_microbatches,
                    has_first_stage=any(s.is_first for s in stages), has_last_stage=any(s.is_last for s in stages))
