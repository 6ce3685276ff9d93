"""What a rank executes in a step: FLOPs (local shapes, recomputation included), the memory traffic
of the ops that have no FLOP formula, and collectives.

One dispatch mode, :class:`StepCounter`, does both so the fake step pays for one Python layer
per op. Like the memory tracker it lets DTensor ops through, so it sees the local ops with the
shapes this rank holds: torch's own ``FlopCounterMode`` counts a tensor-parallel matmul at its
global (DTensor) shape, tp times what the rank does.

FLOPs use torch's formulas (``torch.utils.flop_counter``: 2 per multiply-add; attention counted
over the full score matrix, without halving for the causal mask, as the project's convention
does), plus formulas for the project's own attention op, ``torchtrain::flash_attention``.

Memory traffic: an op without a FLOP formula (norms, activations, RoPE, the loss's softmax, the
optimizer, copies) is bound by memory, not arithmetic; it counts the bytes of its tensor inputs and
outputs. Views and allocations move nothing and are left out. A device that gives a rate for it (a
measured profile) adds that time; on a spec sheet it is part of the efficiency.

Communication is recorded per process group and mapped to the mesh dimension that owns the group.
"Wire bytes" are what one rank sends with a ring algorithm: ``(g - 1) / g`` of the gathered size
for all-gather and reduce-scatter, twice that for all-reduce.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from torchtrain.models.attention import BACKENDS

_FORMULAS = {
    **flop_registry,  # already wrapped to take tensors (register_flop_formula)
    # The registry lists addmm but not its in-place form, which the chunked loss accumulates the
    # output layer's weight gradient with (a third of that layer's FLOPs).
    torch.ops.aten.addmm_: flop_registry[torch.ops.aten.addmm],
    **{op: formula for backend in BACKENDS.values() for op, formula in backend.flop_formulas.items()},
}
# Ops that neither compute nor move tensor data (views are recognised by their schema).
_NO_TRAFFIC = frozenset(["empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
                         "alias", "lift_fresh", "_local_scalar_dense", "resize_", "set_", "record_stream",
                         "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"])
# Attention's FLOPs are counted apart from the matmuls': a device may run them at another rate
# (timing.Device.attention_flops; a CPU's flash kernel reaches about 60% of its GEMM rate).
_ATTENTION_OPS = frozenset(
    [op for backend in BACKENDS.values() for op in backend.flop_formulas]
    + [op for op in flop_registry if "attention" in getattr(op, "__name__", type(op).__name__).lower()])

# Collective -> (index of the tensor whose size is the full data, factor of (g - 1) / g that one rank sends).
_ALL_GATHER, _REDUCE_SCATTER, _ALL_REDUCE = "all-gather", "reduce-scatter", "all-reduce"
_COLLECTIVES = {
    # c10d (FSDP): (kind, argument holding the full-size tensor(s))
    "_allgather_base_": (_ALL_GATHER, 0),
    "allgather_into_tensor_coalesced_": (_ALL_GATHER, 0),
    "allgather_": (_ALL_GATHER, 0),
    "_reduce_scatter_base_": (_REDUCE_SCATTER, 1),
    "reduce_scatter_tensor_coalesced_": (_REDUCE_SCATTER, 1),
    "reduce_scatter_": (_REDUCE_SCATTER, 1),
    "allreduce_": (_ALL_REDUCE, 0),
    "allreduce_coalesced_": (_ALL_REDUCE, 0),
    # functional (DTensor / tensor parallel): sizes from the input and the group size
    "all_gather_into_tensor": (_ALL_GATHER, None),
    "all_gather_into_tensor_coalesced": (_ALL_GATHER, None),
    "reduce_scatter_tensor": (_REDUCE_SCATTER, 0),
    "reduce_scatter_tensor_coalesced": (_REDUCE_SCATTER, 0),
    "all_reduce": (_ALL_REDUCE, 0),
    "all_reduce_coalesced": (_ALL_REDUCE, 0),
}


@dataclass
class CommVolume:
    """Collectives of one mesh dimension in a step."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wire_bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # sent per rank
    group_size: int = 1

    @property
    def total_wire_bytes(self) -> float:
        return sum(self.wire_bytes.values())

    def scaled(self, factor: float) -> "CommVolume":
        out = CommVolume(group_size=self.group_size)
        for kind in self.calls:
            out.calls[kind] = round(self.calls[kind] * factor)
            out.wire_bytes[kind] = self.wire_bytes[kind] * factor
        return out

    def plus(self, other: "CommVolume") -> "CommVolume":
        out = self.scaled(1.0)
        out.group_size = max(self.group_size, other.group_size)
        for kind in other.calls:
            out.calls[kind] += other.calls[kind]
            out.wire_bytes[kind] += other.wire_bytes[kind]
        return out


def comm_since(after: dict[str, CommVolume], before: dict[str, CommVolume]) -> dict[str, CommVolume]:
    """The collectives recorded between two :func:`copy_comm` snapshots of a counter."""
    return {dim: volume.plus(before.get(dim, CommVolume()).scaled(-1.0)) for dim, volume in after.items()}


def copy_comm(comm: dict[str, CommVolume]) -> dict[str, CommVolume]:
    return {dim: volume.scaled(1.0) for dim, volume in comm.items()}


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


_PROPAGATING = [0]  # depth of DTensor sharding propagations running (see StepCounter.__enter__)


def in_sharding_propagation() -> bool:
    """Whether the op being dispatched is DTensor's shape inference, not the rank's computation."""
    return _PROPAGATING[0] > 0


class StepCounter(TorchDispatchMode):
    """Counts this rank's FLOPs and, per mesh dimension, its collectives.

    ``group_names`` maps a process group's name to a mesh dimension label (``"tp"``, ``"dp_shard"``, ...).
    """

    def __init__(self, group_names: dict[str, str]):
        super().__init__()
        self.group_names = group_names
        self.flops = 0
        self.attention_flops = 0  # the part of ``flops`` that attention ops execute
        self.memory_bytes = 0  # read and written by the ops without a FLOP formula
        self.comm: dict[str, CommVolume] = defaultdict(CommVolume)

    def __enter__(self):
        # NOTE: on a cache miss DTensor infers an op's output shape by running it on fake tensors of
        # the *global* shape (ShardingPropagator._propagate_tensor_meta_non_cached), which reaches
        # this mode like the rank's own ops: the first tensor-parallel plan of a process counted 18%
        # more FLOPs than the second. Those ops are marked and neither counted nor tracked.
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        original = self._original_propagate = ShardingPropagator._propagate_tensor_meta_non_cached

        def propagate(propagator, op_schema):
            _PROPAGATING[0] += 1
            try:
                return original(propagator, op_schema)
            finally:
                _PROPAGATING[0] -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        return super().__enter__()

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        ShardingPropagator._propagate_tensor_meta_non_cached = self._original_propagate
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if in_sharding_propagation():
            return out
        packet = func._overloadpacket
        formula = _FORMULAS.get(packet)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            self.flops += flops
            if packet in _ATTENTION_OPS:
                self.attention_flops += flops
        elif func.namespace in ("c10d", "_c10d_functional"):
            if func._opname in _COLLECTIVES:
                self._record(func._opname, args)
        elif not func.is_view and func._opname not in _NO_TRAFFIC:
            self.memory_bytes += _nbytes(args) + _nbytes(list(kwargs.values())) + _nbytes(out)
        return out

    def _record(self, name: str, args: tuple) -> None:
        kind, full_arg = _COLLECTIVES[name]
        group_name, size = self._group_of(args)
        if size <= 1:
            return
        if full_arg is None:  # functional all-gather: the input is one rank's shard
            full = _nbytes(args[0]) * size
        else:
            full = _nbytes(args[full_arg])
        share = (size - 1) / size
        volume = self.comm[self.group_names.get(group_name, f"group of {size}")]
        volume.group_size = size
        volume.calls[kind] += 1
        volume.wire_bytes[kind] += full * share * (2 if kind == _ALL_REDUCE else 1)

    @staticmethod
    def _group_of(args: tuple) -> tuple[str, int]:
        for arg in args:
            if isinstance(arg, torch.ScriptObject):  # c10d ops carry the group boxed
                try:
                    arg = dist.ProcessGroup.unbox(arg)
                except (RuntimeError, TypeError):
                    continue
            if isinstance(arg, dist.ProcessGroup):
                return arg.group_name, arg.size()
        # functional collectives end with (..., group_size?, group_name)
        name = args[-1]
        if isinstance(name, str):
            try:
                group = dist.distributed_c10d._resolve_process_group(name)
                return name, group.size()
            except (ValueError, RuntimeError, KeyError):
                return name, 1
        return "?", 1
