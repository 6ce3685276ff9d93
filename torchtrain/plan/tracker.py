"""A memory tracker that sees every tensor storage a training step creates, real or fake.

The planner runs a step under ``FakeTensorMode`` (nothing allocated) and the accuracy check runs the
same step for real over gloo; both are measured by :class:`MemoryTracker`, so "predicted" and
"measured" differ only by what the fake run leaves out (the pipeline schedule, which the planner
accounts for separately), never by how memory is counted.

What is counted: the bytes of every live untyped storage created while the tracker is active, plus
the storages of the parameters and optimizer state it is told about, the way a caching allocator's
``memory_allocated`` would count them (without its rounding and fragmentation). Storages resized
in place (FSDP frees and re-allocates its gathered parameters with ``UntypedStorage.resize_``)
change size in the count as they do in memory.

Each storage belongs to one category, so the peak comes with a breakdown whose parts sum to it:

* ``parameters``: the rank's parameter shards, as the optimizer updates them;
* ``gathered parameters``: FSDP's unsharded copies (all-gather outputs) while they are alive;
* ``cast parameters``: autocast's low-precision copies of the parameters (see :meth:`MemoryTracker.file_casts_of`);
* ``gradients``: ``.grad`` of the parameters, and FSDP's unsharded (accumulated) gradients;
* ``optimizer state``: created inside ``optimizer.step`` (AdamW's two moments and step counts);
* ``activations``: created in the forward and still alive (saved for the backward);
* ``temporaries``: created in the backward (activation gradients, recomputed activations);
* ``communication buffers``: storages a c10d collective writes into (FSDP's all-gather and
  reduce-scatter buffers).

Memory an op allocates and frees inside itself never reaches a dispatch mode. Where such an op is
large enough to set the peak, :data:`OP_WORKSPACE` says how much it holds while it runs; the tracker
counts it (as temporaries) for the duration of the op. The accuracy check against the allocator's
own events (``tests/workers/plan_memory.py``) is what finds them.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from torchtrain.plan.counters import in_sharding_propagation

CATEGORIES = ("parameters", "gathered parameters", "cast parameters", "gradients", "optimizer state",
              "activations", "temporaries", "communication buffers")
# Categories a storage keeps once given: a collective reading a parameter shard does not make it a buffer.
_STICKY = ("parameters", "gradients", "optimizer state")


# op -> bytes it allocates and frees inside itself, from its arguments. The same ATen code runs on every device:
# * logsumexp: ``exp(x - max)`` into a temporary the size of its input (ATen's ``logsumexp_out_impl``); the loss
#   calls it on a chunk of fp32 logits, the largest temporary of the step on small models.
OP_WORKSPACE = {
    torch.ops.aten.logsumexp.default: lambda args, kwargs: args[0].nbytes,
}


@dataclass
class MemorySnapshot:
    total: int = 0
    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    def copy(self) -> "MemorySnapshot":
        return MemorySnapshot(self.total, dict(self.by_category))


def local_storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding ``t``'s data on this rank (a DTensor's local shard)."""
    if isinstance(t, DTensor):
        t = t._local_tensor
    if type(t) is not torch.Tensor and not isinstance(t, torch._subclasses.FakeTensor) \
            and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for name in names for s in local_storages(getattr(t, name))]
    return [t.untyped_storage()]


class MemoryTracker(TorchDispatchMode):
    """Count live storages by category; record the peak and its breakdown.

    ``known_tensors`` is called whenever a new peak is reached (and by :meth:`classify_known`): it
    yields ``(category, tensor)`` pairs for tensors whose role the creation context cannot tell
    (gradients assigned by autograd or FSDP, FSDP's gathered parameters), so that the peak's
    breakdown is up to date. Use as a context manager around the step; read :attr:`peak`.
    """

    def __init__(self, known_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]] = lambda: ()):
        super().__init__()
        self.known_tensors = known_tensors
        self.current = MemorySnapshot()
        self.peak = MemorySnapshot()
        self._info = WeakIdKeyDictionary()  # storage -> [bytes, category]
        self._cast_sources = WeakIdKeyDictionary()  # storage -> True: casts of it are "cast parameters"
        self._in_optimizer = False
        self._hooks: list = []
        self._original_resize = None

    # -- bookkeeping ------------------------------------------------------------------------

    def track(self, t: torch.Tensor, category: str, reclassify: bool = True) -> None:
        """Count ``t``'s storages under ``category`` (reclassifying them if already counted)."""
        for storage in local_storages(t):
            info = self._info.get(storage)
            if info is None:
                nbytes = storage.nbytes()
                info = [nbytes, category]
                self._info[storage] = info
                weakref.finalize(storage, self._release, info)
                self._add(category, nbytes)
            elif reclassify and info[1] != category:
                self._add(info[1], -info[0])
                info[1] = category
                self._add(category, info[0])

    def file_casts_of(self, parameters: Iterable[torch.Tensor]) -> None:
        """File every dtype cast of these tensors under "cast parameters" rather than where it was made.

        NOTE: for autocast. Its cast of a parameter (a leaf that requires grad) is cached until the
        outermost autocast context exits, and every later op on that parameter reuses it: under a
        pipeline schedule, which runs all its microbatches in one autocast context, there is one copy
        per parameter for the whole step, however many microbatches saved it for their backward. Kept
        apart from "activations", the copies are not counted again per microbatch in flight.
        """
        for p in parameters:
            for storage in local_storages(p):
                self._cast_sources[storage] = True

    def _release(self, info: list) -> None:
        self._add(info[1], -info[0])
        info[0] = 0

    def _add(self, category: str, nbytes: int) -> None:
        self.current.total += nbytes
        self.current.by_category[category] += nbytes

    def _resized(self, storage: torch.UntypedStorage) -> None:
        info = self._info.get(storage)
        if info is None:
            return
        nbytes = storage.nbytes()
        self._add(info[1], nbytes - info[0])
        info[0] = nbytes
        self._check_peak()

    def classify_known(self) -> None:
        for category, tensor in self.known_tensors():
            if tensor is not None:
                self.track(tensor, category)

    def _check_peak(self) -> None:
        if self.current.total > self.peak.total:
            self.classify_known()
            self.peak = self.current.copy()

    def check_peak(self) -> None:
        """Take the current memory into the peak if it is higher (after tensors were tracked by hand)."""
        self._check_peak()

    @contextlib.contextmanager
    def paused(self):
        """Run code unwatched: nothing it creates is counted (tensors can be tracked afterwards)."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def reset_peak(self) -> None:
        """Start a new peak from the current memory (e.g. between phases measured separately)."""
        self.classify_known()
        self.peak = self.current.copy()

    # -- the dispatch mode ------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # NOTE: DTensor ops are let through (NotImplemented) so DTensor runs them as local ops,
        # which come back here with the shapes this rank really holds.
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        if in_sharding_propagation():  # DTensor's shape inference on global-shape fakes: not this rank's memory
            return out
        if func.namespace == "c10d":  # in-place collectives: their output arguments are comm buffers
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                    self._mark_buffer(t)
        category = self._creation_category()
        if func is torch.ops.aten._to_copy.default and self._cast_sources \
                and any(s in self._cast_sources for s in local_storages(args[0])):
            category = "cast parameters"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                self.track(t, category, reclassify=False)
        workspace = OP_WORKSPACE.get(func)
        if workspace is not None:  # held with the outputs while the op ran, freed before it returned
            held = workspace(args, kwargs or {})
            self._add("temporaries", held)
            self._check_peak()
            self._add("temporaries", -held)
        self._check_peak()
        return out

    def _mark_buffer(self, t: torch.Tensor) -> None:
        for storage in local_storages(t):
            info = self._info.get(storage)
            if info is not None and info[1] not in _STICKY and info[1] != "gathered parameters":
                self.track(t, "communication buffers")

    def _creation_category(self) -> str:
        if self._in_optimizer:
            return "optimizer state"
        # NOTE: the autograd engine sets a graph task id while it runs a backward; recomputation
        # under activation checkpointing happens there too and is counted as temporaries.
        return "temporaries" if torch._C._current_graph_task_id() != -1 else "activations"

    def __enter__(self):
        self._hooks = [register_optimizer_step_pre_hook(lambda *a: self._set_optimizer(True)),
                       register_optimizer_step_post_hook(lambda *a: self._set_optimizer(False))]
        # NOTE: UntypedStorage.resize_ does not go through the dispatcher; FSDP frees and
        # re-allocates gathered parameters with it, so it is wrapped for the duration.
        original = self._original_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage, size):
            result = original(storage, size)
            tracker._resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def _set_optimizer(self, inside: bool) -> None:
        self._in_optimizer = inside
        if not inside:
            self._check_peak()


def fsdp_known_tensors(modules: Iterable[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """FSDP's gathered parameters and unsharded gradients, which only FSDP's own state points to."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        for fsdp_param in group.fsdp_params:
            for output in getattr(fsdp_param, "all_gather_outputs", None) or ():
                yield "gathered parameters", output
            yield "gradients", fsdp_param.unsharded_accumulated_grad
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                yield "gradients", unsharded.grad
            yield "gradients", fsdp_param.sharded_param.grad
