"""How many microbatches' activations a pipeline schedule keeps alive on each rank.

The planner cannot run the schedule (the fake process group does not carry point-to-point
messages), so it runs one microbatch per stage and multiplies: it needs, for every backward a
rank runs, how many forwards of each of its stages have run without their backward yet.

The action order of each schedule is the one torch builds (torch/distributed/pipelining/schedules.py):

* ``gpipe``: every forward, then every backward: all microbatches in flight.
* ``1f1b``: ``pp - rank - 1`` warm-up forwards, then one forward and one backward in turn: at
  most ``pp - rank`` in flight (capped at the number of microbatches).
* ``interleaved_1f1b``: torch's own ``_get_1f1b_rank_ops`` with its warm-up rule
  (``(stages_per_rank - 1) * microbatches_per_round + 2 * (pp - 1 - rank)`` warm-up forwards),
  replayed here so the counts are torch's.
* ``interleaved_zb`` and ``zbv`` are counted like ``interleaved_1f1b``. NOTE: an approximation:
  their split backward keeps the weight-gradient inputs of a microbatch until its deferred
  weight pass, which this count ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.pipelining.schedules import _ComputationType, _get_1f1b_rank_ops, _get_warmup_ops


@dataclass(frozen=True)
class BackwardEvent:
    """A backward of ``stage`` while ``in_flight[s]`` microbatches of each local stage ``s`` are alive."""

    stage: int
    in_flight: dict[int, int]


def backward_events(schedule: str, pp: int, pp_rank: int, stage_ids: list[int],
                    num_microbatches: int) -> list[BackwardEvent]:
    """Every backward of this rank's schedule, with the in-flight counts just before it."""
    events, alive = [], dict.fromkeys(stage_ids, 0)
    for stage, is_forward in _action_order(schedule, pp, pp_rank, stage_ids, num_microbatches):
        if is_forward:
            alive[stage] += 1
        else:
            events.append(BackwardEvent(stage, dict(alive)))
            alive[stage] -= 1
    return events


def _action_order(schedule: str, pp: int, pp_rank: int, stage_ids: list[int],
                  num_microbatches: int) -> list[tuple[int, bool]]:
    """(stage, is_forward) for each compute action of this rank, in the schedule's order."""
    if schedule == "gpipe":
        (stage,) = stage_ids
        return [(stage, True)] * num_microbatches + [(stage, False)] * num_microbatches
    if schedule == "1f1b":
        (stage,) = stage_ids
        warmup = min(pp - pp_rank - 1, num_microbatches)
        order = [(stage, True)] * warmup
        for _ in range(num_microbatches - warmup):
            order += [(stage, True), (stage, False)]
        return order + [(stage, False)] * warmup
    return _interleaved_order(pp, pp_rank, len(stage_ids), num_microbatches)


def _interleaved_order(pp: int, pp_rank: int, stages_per_rank: int, num_microbatches: int) -> list[tuple[int, bool]]:
    # The same arithmetic as ScheduleInterleaved1F1B._calculate_single_rank_operations.
    rounds = max(1, num_microbatches // pp)
    per_round = num_microbatches // rounds
    warmup = _get_warmup_ops(pp_rank, stages_per_rank, per_round, pp, num_microbatches, multiply_factor=2)
    total = stages_per_rank * num_microbatches

    def forward_stage(step: int) -> int:
        return ((step // per_round) % stages_per_rank) * pp + pp_rank

    def backward_stage(step: int) -> int:
        return (stages_per_rank - 1 - ((step - warmup) // per_round) % stages_per_rank) * pp + pp_rank

    actions = _get_1f1b_rank_ops(stages_per_rank, pp, warmup, total - warmup, warmup, pp_rank,
                                 forward_stage, backward_stage)
    order = []
    for action in actions:
        if action is None:
            continue
        if action.computation_type == _ComputationType.FORWARD:
            order.append((action.stage_index, True))
        elif action.computation_type == _ComputationType.FULL_BACKWARD:
            order.append((action.stage_index, False))
    return order


def peak_in_flight(events: list[BackwardEvent]) -> dict[int, int]:
    """The most microbatches of each stage ever alive at once (for the report)."""
    most: dict[int, int] = {}
    for event in events:
        for stage, count in event.in_flight.items():
            most[stage] = max(most.get(stage, 0), count)
    return most
