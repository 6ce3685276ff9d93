"""A plan's cost independent of depth: trace a few blocks per stage, extrapolate to all of them.

The blocks of a Llama-family model are identical, so everything a stage's step measures grows
by the same amount with each block of the same kind: parameters, gradients and optimizer state,
the activations it saves, its FLOPs and its collectives on every mesh dimension. Tracing a 7B
model's 32 blocks under ``FakeTensorMode`` costs minutes on a CPU; tracing two or three costs
seconds, so :func:`measure_rank_by_depth` runs the fake step (:func:`measure_rank`) on stages cut
down to a few of their blocks, keeping their embedding and output ends, and extrapolates:

* a *base* step keeps :data:`BASE_BLOCKS` of the stage's blocks, always including its last one
  (FSDP's default keeps the last block of a stage gathered after its forward: that block is not
  like the others, and it stays measured rather than extrapolated);
* one more step per stage and *kind* of block adds one block of that kind to that stage. There
  are two kinds under ``activation_checkpoint.mode = "layers"`` (checkpointed blocks keep only
  their input, the others everything they save), one otherwise; a rank with two stages
  (interleaved schedules) runs one step per stage, since a stage's peak also holds the other
  stage's parameters and optimizer state;
* every measured quantity ``q`` (FLOPs, collectives per mesh dimension, parameters held, saved
  activations) is then ``q(base) + n × (q(base + 1 block) − q(base))`` per stage and kind, ``n``
  being the stage's blocks of that kind not in the base;
* peaks grow by each missing block's *steady-state* increment: its persistent memory read after
  the backward (parameters, gradients, optimizer state, and gathered parameters where FSDP keeps
  them) plus the activations its forward saved (see :func:`_peak_increments` for why the peaks
  themselves are not extrapolated). tests/test_plan.py checks plans made this way against fully
  traced ones (debug model at 8 blocks: FSDP with reshard "never" and accumulation, FSDP x TP with
  "layers" checkpointing, interleaved PP x FSDP) within 1%; they agreed to 4 digits in every case
  tried (docs/plan.md).

The base has two blocks, not one: with a single block the stage's first and last block coincide
(and FSDP has no neighbour to prefetch), so the step from one to two blocks need not be the step
from ``k`` to ``k + 1``. ``exact=True`` (``--exact``) traces every block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torchtrain.config import Config
from torchtrain.models import ModelArgs
from torchtrain.parallel import ParallelDims
from torchtrain.parallel.pp import pipeline_settings, split_layers, stage_ids_for_rank
from torchtrain.plan.counters import CommVolume
from torchtrain.plan.fake_step import RankMeasure, Target, measure_rank
from torchtrain.plan.tracker import MemorySnapshot

BASE_BLOCKS = 2  # blocks of each stage in the base step, its last one included (see the module docstring)
PLAIN, CHECKPOINTED = "plain", "checkpointed"


def stage_blocks(config: Config, model_args: ModelArgs, dims: ParallelDims, pp_rank: int) -> dict[int, list[int]]:
    """{stage id: its block indices} for the stages of pipeline rank ``pp_rank`` (the trainer's split)."""
    if dims.pp == 1:
        return {0: list(range(model_args.num_layers))}
    pipe = pipeline_settings(config, dims.pp)
    layers = split_layers(model_args, pipe.num_stages, config.parallelism.pp_layers_per_stage, config.training.seq_len)
    return {s: list(layers[s]) for s in stage_ids_for_rank(pp_rank, dims.pp, pipe.stages_per_rank, pipe.schedule)}


def block_kinds(config: Config, model_args: ModelArgs) -> Callable[[int], str]:
    """The kind of each block: under "layers" checkpointing, checkpointed or plain; otherwise all alike."""
    ac = config.activation_checkpoint
    if ac.mode != "layers":
        return lambda block: PLAIN
    from torchtrain.parallel.ac import checkpointed_blocks

    chosen = set(checkpointed_blocks(model_args.num_layers, ac.num_layers))
    return lambda block: CHECKPOINTED if block in chosen else PLAIN


def measure_rank_by_depth(config: Config, model_args: ModelArgs, dims: ParallelDims, rank: int, target: Target,
                          exact: bool = False) -> RankMeasure:
    """:func:`measure_rank` of ``rank``, traced on a few blocks per stage and extrapolated to all of them."""
    pp_rank = rank // (dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp)  # the mesh is pp-major
    blocks = stage_blocks(config, model_args, dims, pp_rank)
    kind_of = block_kinds(config, model_args)
    base: dict[int, list[int]] = {}
    rest: dict[int, dict[str, list[int]]] = {}  # stage -> kind -> blocks outside the base, in order
    for stage, ids in blocks.items():
        base[stage] = _base_blocks(ids, kind_of)
        rest[stage] = {}
        for block in ids:
            if block not in base[stage]:
                rest[stage].setdefault(kind_of(block), []).append(block)
    if exact or not any(rest.values()):
        return measure_rank(config, model_args, dims, rank, target)
    measured = measure_rank(config, model_args, dims, rank, target, keep_blocks=base)
    # NOTE: one block is added to one stage at a time: a stage's peak also holds the parameters,
    # gradients and optimizer state of the rank's other stages, so a block added to one stage
    # moves the measured peaks of all of them, by amounts only separate runs tell apart.
    terms = []  # (blocks of the kind not in the base, measure with one of them added)
    for stage, per_kind in sorted(rest.items()):
        for kind, extra in sorted(per_kind.items()):
            added = {**base, stage: sorted(base[stage] + extra[:1])}
            terms.append((len(extra), measure_rank(config, model_args, dims, rank, target, keep_blocks=added)))
    # NOTE: under reshard "never" every block's gathered parameters live from its forward to its
    # backward: per block at the peak, yet freed by the time the backward ends.
    kept_gathered = config.parallelism.fsdp_reshard_after_forward == "never"
    return _extrapolate(measured, terms, blocks, kept_gathered)


def _base_blocks(ids: list[int], kind_of: Callable[[int], str]) -> list[int]:
    """The stage's last block and the ones before it, up to BASE_BLOCKS; under "layers" checkpointing
    the base also keeps its kinds apart: it holds the last block plus, if there are two kinds, one
    block of the other kind (so each kind's increment is measured next to a neighbour of both)."""
    if len(ids) <= BASE_BLOCKS:
        return list(ids)
    chosen = [ids[-1]]
    others = [b for b in reversed(ids[:-1]) if kind_of(b) != kind_of(ids[-1])][:1]
    for block in others + list(reversed(ids[:-1])):
        if len(chosen) == BASE_BLOCKS:
            break
        if block not in chosen:
            chosen.append(block)
    return sorted(chosen)


# Alive for the whole step, per block (gathered parameters: when FSDP keeps them, under pipelining or
# reshard "never"; otherwise that category is ~0 after the backward and its growth is 0).
_PERSISTENT = ("parameters", "gradients", "optimizer state", "gathered parameters")
# Made by each block's forward and alive until its backward (parameter casts: under autocast).
_SAVED_BY_FORWARD = ("activations", "cast parameters")


def _extrapolate(base: RankMeasure, terms: list[tuple[int, RankMeasure]], blocks: dict[int, list[int]],
                 kept_gathered: bool = False) -> RankMeasure:
    """``base + sum over the runs of n × (run − base)``, field by field, stage by stage; peaks by their
    steady-state increment (see :func:`_peak_increments`)."""
    stages = []
    for i, stage in enumerate(base.stages):
        combined = _combine(stage, [(n, run.stages[i]) for n, run in terms],
                            skip=("stage_id", "description", "num_blocks", "peak_bytes", "first_peak_bytes"))
        steady, first = _peak_increments(base, terms, i, kept_gathered)
        if stage.peak_bytes == stage.first_peak_bytes:  # one microbatch per step: no earlier gradients
            steady = first
        ids = blocks[stage.stage_id]
        stages.append(dataclasses.replace(combined, num_blocks=len(ids), description=describe_stage(stage.description, ids),
                                          peak_bytes=stage.peak_bytes + steady,
                                          first_peak_bytes=stage.first_peak_bytes + first if stage.first_peak_bytes
                                          else 0))
    combined = _combine(base, terms, skip=("rank", "pp_rank", "stages", "step_peak"))
    return dataclasses.replace(combined, stages=stages, step_peak=_step_peak(base, terms, kept_gathered))


def _peak_increments(base: RankMeasure, terms: list, stage: int | None, kept_gathered: bool) -> tuple[int, int]:
    """(steady-state, first-microbatch) growth of a peak from the base to the real depth.

    NOTE: the peak itself is not extrapolated: where in the step it falls can differ between one,
    two and three blocks (a 7B model at 32k peaked in the backward's reduce-scatter with two blocks
    and at the loss with more, and the difference of the peaks then grew a "communication buffer"
    per block that does not exist). What each block adds to *any* moment of the steady state is
    its parameters, gradients and optimizer state and the activations its forward saved; the
    transient parts (gathered parameters, temporaries, collective buffers) are those of one block
    and stay as the base measured them.
    """
    steady = first = _transient_bump(base, terms)
    for n, run in terms:
        persistent = sum(_grown(base, run, c, kept_gathered) for c in _PERSISTENT)
        grads = _grown(base, run, "gradients")
        stages = range(len(base.stages)) if stage is None else [stage]
        saved = sum(_saved_by_forward(run.stages[i]) - _saved_by_forward(base.stages[i]) for i in stages)
        steady += n * (persistent + saved)
        first += n * (persistent - grads + saved)
    return round(steady), round(first)


def _saved_by_forward(stage) -> int:
    """What a stage's first forward keeps for the backward: its activations and autocast's parameter casts."""
    return stage.activation_bytes + stage.cast_parameter_bytes


def _grown(base: RankMeasure, run: RankMeasure, category: str, kept_gathered: bool = False) -> int:
    """One block's growth of a persistent category, read after the backward (not at the peaks, which
    can fall where a block's unsharded gradient or gathered parameters are alive for a moment)."""
    grown = run.after_backward.by_category[category] - base.after_backward.by_category[category]
    if category == "gathered parameters" and kept_gathered:
        grown = max(grown, run.step_peak.by_category[category] - base.step_peak.by_category[category])
    return grown


def _transient(snapshot: MemorySnapshot) -> dict[str, int]:
    return {c: v for c, v in snapshot.by_category.items() if c not in _PERSISTENT + _SAVED_BY_FORWARD}


def _transient_bump(base: RankMeasure, terms: list) -> int:
    """The transient categories at their largest over the runs, less the base's (one block more can
    overlap one more collective buffer with the peak; more blocks than that did not, in the checks)."""
    most = _transient(base.step_peak)
    for _, run in terms:
        most = {c: max(v, _transient(run.step_peak)[c]) for c, v in most.items()}
    return sum(most.values()) - sum(_transient(base.step_peak).values())


def _step_peak(base: RankMeasure, terms: list, kept_gathered: bool) -> MemorySnapshot:
    """The measured step's peak, grown by the steady-state increment (persistent categories
    extrapolated, what the forwards saved added to "activations" and "cast parameters", transient
    categories as measured)."""
    out = base.step_peak.copy()
    for _, run in terms:
        for c, v in _transient(run.step_peak).items():
            out.by_category[c] = max(out.by_category[c], v)
    # NOTE: with one microbatch per step the step's peak can come before any gradient exists.
    persistent = [c for c in _PERSISTENT if c != "gradients" or base.step_peak.by_category[c] > 0]
    for c in persistent:
        out.by_category[c] = max(out.by_category[c], base.step_peak.by_category[c]) + round(
            sum(n * _grown(base, run, c, kept_gathered) for n, run in terms))
    for category, field in zip(_SAVED_BY_FORWARD, ("activation_bytes", "cast_parameter_bytes")):
        saved = sum(n * sum(getattr(r, field) - getattr(b, field) for r, b in zip(run.stages, base.stages))
                    for n, run in terms)
        out.by_category[category] += round(saved)
    out.total = sum(out.by_category.values())
    return out


def _combine(base, terms: list[tuple[float, object]], skip: tuple[str, ...]):
    values = {}
    for f in dataclasses.fields(base):
        if f.name in skip:
            continue
        values[f.name] = _linear(getattr(base, f.name), [(n, getattr(v, f.name)) for n, v in terms])
    return dataclasses.replace(base, **values)


def _linear(base, terms):
    if isinstance(base, bool) or base is None:
        return base
    if isinstance(base, int):
        return round(base + sum(n * (v - base) for n, v in terms))
    if isinstance(base, float):
        return base + sum(n * (v - base) for n, v in terms)
    if isinstance(base, MemorySnapshot):
        return MemorySnapshot(_linear(base.total, [(n, v.total) for n, v in terms]),
                              {k: _linear(b, [(n, v.by_category.get(k, 0)) for n, v in terms])
                               for k, b in base.by_category.items()})
    if isinstance(base, dict):  # mesh dimension -> CommVolume
        out = {}
        for dim in set(base).union(*(v for _, v in terms)):
            total = base.get(dim, CommVolume()).scaled(1.0)
            for n, v in terms:
                diff = v.get(dim, CommVolume()).plus(base.get(dim, CommVolume()).scaled(-1.0))
                total = total.plus(diff.scaled(n))
            sizes = [base[dim].group_size] if dim in base else []
            total.group_size = max(sizes + [v[dim].group_size for _, v in terms if dim in v] + [1])
            out[dim] = total
        return out
    raise TypeError(f"cannot extrapolate a {type(base).__name__}")


def describe_stage(measured: str, ids: list[int]) -> str:
    """The stage's description with its real blocks (the measured one names the traced ones)."""
    head = "embed + " if measured.startswith("embed + ") else ""
    tail = " + output" if measured.endswith(" + output") else ""
    return head + (f"blocks {min(ids)}-{max(ids)}" if ids else "no blocks") + tail
