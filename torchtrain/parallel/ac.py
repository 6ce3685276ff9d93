"""Activation checkpointing: recompute block activations in the backward instead of storing them.

Four modes (``[activation_checkpoint] mode``), each applied per transformer block:

* ``"none"``: every block keeps what autograd saves (~20x its input in fp32 on the debug model).
* ``"full"``: every block keeps only its input and reruns its forward in the backward: one more
  forward of the blocks (~a third more compute), the least memory.
* ``"selective"``: every block keeps its input plus the outputs of its matmuls, of attention and of
  tensor-parallel collectives (:func:`selective_policy`), and recomputes only element-wise work
  (norms, RoPE, SwiGLU's activation, residual adds): no matmul and no collective is rerun.
* ``"layers"``: ``num_layers`` of the blocks are fully checkpointed, spread evenly over the depth
  (:func:`checkpointed_blocks`); the others keep everything. The "checkpoint layers" knob of
  Megatron-style runs: memory between "none" and "full", recompute in proportion.

``offload`` additionally moves each checkpointed block's input to pinned host memory on a side
stream during the forward and brings it back for the recompute (:class:`_BlockInputOffload`), so a
checkpointed block holds nothing on the GPU between its forward and its backward. GPU only:
:func:`check_activation_checkpoint` rejects it elsewhere.

``bench/memory.py`` measures what each mode keeps (figures in docs/performance.md).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper, checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from torchtrain.config import Config, ConfigError, check_choice, invalid
from torchtrain.models.attention import BACKENDS
from torchtrain.parallel.cp import RING_OPS

__all__ = ["MODES", "apply_activation_checkpointing", "check_activation_checkpoint", "checkpointed_blocks",
           "selective_policy"]

logger = logging.getLogger(__name__)

MODES = ("none", "full", "selective", "layers")

_aten = torch.ops.aten
# Outputs that "selective" keeps: they cost a matmul (or an attention kernel) to recompute, while
# everything between them is element-wise and cheap to redo from them. The attention ops are what each
# backend declares (models/attention.py), and context parallelism's ring op (parallel/cp.py), whose
# recomputation would also send the keys and values around the ring again.
# NOTE: aten.linear is composite and normally decomposes into mm/addmm before a dispatch mode sees
# it; it is listed for the paths that keep it whole.
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.linear.default,
    *(op for backend in BACKENDS.values() for op in backend.saved_ops),
    *RING_OPS,
}
_SAVED_NAMESPACES = ("_c10d_functional",)  # tensor parallelism's collectives (see selective_policy)


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The per-op policy of ``mode = "selective"``: save matmuls, attention and collectives; recompute the rest.

    NOTE: ``MUST_SAVE`` rather than ``PREFER_SAVE`` so that torch.compile's partitioner, which
    applies these tags to the compiled graph, does not trade them back for recomputation.

    NOTE (tensor parallelism): the blocks' all-gathers and reduce-scatters (``_c10d_functional``
    ops, and their ``wait_tensor``) are saved too. Recomputing them would put a collective on the
    backward's critical path, and the all-gathered norm output is what the q/k/v and gate/up
    projections need for their weight gradients anyway; the price is that output held for the whole
    sequence rather than this rank's 1/tp of it.
    """
    if op in _SAVED_OPS or getattr(op, "namespace", None) in _SAVED_NAMESPACES:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(num_blocks: int, num_checkpointed: int) -> list[int]:
    """The ``num_checkpointed`` of ``num_blocks`` block indices that ``mode = "layers"`` checkpoints.

    Index ``floor((j + 1/2) * num_blocks / num_checkpointed)`` for ``j = 0 .. num_checkpointed - 1``:
    one block in the middle of each of ``num_checkpointed`` equal runs of blocks (k = L/2 picks the
    odd blocks, k = L all, k = 0 none). The steps are at least one block apart, so the picks are
    distinct.

    NOTE (why spread): on one device it does not matter which blocks are checkpointed (at the end
    of the forward every block's activations are held, whichever they are). Under pipeline
    parallelism each stage holds a run of consecutive blocks, and picking by the global index spreads
    the checkpointed blocks, their memory saving and their recompute evenly over the stages, and a
    stage checkpoints the same blocks the whole model would.
    """
    if not 0 <= num_checkpointed <= num_blocks:
        raise ValueError(f"activation_checkpoint.num_layers = {num_checkpointed} is invalid; it must be in "
                         f"[0, {num_blocks}] (the model has {num_blocks} blocks)")
    return [math.floor((j + 0.5) * num_blocks / num_checkpointed) for j in range(num_checkpointed)]


def check_activation_checkpoint(config: Config, model_args: Any, device: torch.device) -> None:
    """Every check of the [activation_checkpoint] keys: the mode, ``num_layers`` (only with "layers", within
    the model's depth) and ``offload`` (only with a checkpointing mode, only on a GPU).

    NOTE: offloading moves accelerator memory to pinned host memory over a side stream; on a CPU
    the activations already are in host memory, so there is nothing to gain and no stream to use.
    """
    ac = config.activation_checkpoint
    check_choice(config, "activation_checkpoint", "mode", MODES)
    if ac.num_layers < 0:
        raise invalid(config, "activation_checkpoint", "num_layers", "it must be zero or positive")
    if ac.num_layers and ac.mode != "layers":
        raise invalid(config, "activation_checkpoint", "num_layers", f"it is used by mode = 'layers' only (mode is "
                                                                     f"{ac.mode!r}); set mode = 'layers' or num_layers = 0")
    if ac.num_layers > model_args.num_layers:
        raise invalid(config, "activation_checkpoint", "num_layers", f"model {config.model.name!r} has "
                      f"{model_args.num_layers} blocks; valid: 0 .. {model_args.num_layers}")
    if ac.offload and ac.mode == "none":
        raise invalid(config, "activation_checkpoint", "offload", "it offloads the inputs of checkpointed blocks; set "
                                                                  "mode to 'full', 'selective' or 'layers', or offload = false")
    if ac.offload and device.type != "cuda":
        raise ConfigError(f"{config.source}: activation_checkpoint.offload = true moves GPU activations to pinned "
                          f"CPU memory, but this run is on {device.type}; set it to false")


def apply_activation_checkpointing(model: nn.Module, mode: str, num_layers: int = 0, offload: bool = False) -> None:
    """Wrap the blocks of ``model`` (a Transformer, or a pipeline stage of one) according to ``mode``.

    ``mode``: one of :data:`MODES` (see the module docstring); ``num_layers``: how many blocks of the
    whole model ``"layers"`` checkpoints; ``offload``: also keep the checkpointed blocks' inputs in
    host memory between forward and backward (CUDA only; see :func:`check_activation_checkpoint`).

    The blocks of ``model.layers`` are keyed by their index in the whole model, so a pipeline stage
    checkpoints exactly the blocks the whole model would under ``"layers"``. The wrappers keep
    state-dict names unchanged (``named_parameters`` shows ``_checkpoint_wrapped_module.``).

    NOTE: applied before FSDP so that recomputation re-gathers parameters through FSDP's hooks like
    the first forward, and before torch.compile so the compiled region is the checkpointed block,
    except for whole-block checkpoints under tensor parallelism (see ``parallelize``).
    """
    if mode not in MODES:
        raise ValueError(f"activation_checkpoint.mode = {mode!r} is invalid; valid choices: {', '.join(MODES)}")
    if mode == "none":
        if offload:
            raise ValueError("activation_checkpoint.offload = true needs a checkpointing mode; mode is 'none'")
        return
    chosen = _chosen_blocks(model, mode, num_layers)
    # preserve_rng_state=False: the blocks use no randomness, and saving RNG state costs a sync.
    options = {"preserve_rng_state": False}
    if mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    for name in chosen:
        block = checkpoint_wrapper(model.layers[name], **options)
        model.layers.register_module(name, _OffloadedInput(block) if offload else block)
    logger.info("activation checkpointing: %s, %d of %d blocks (%s)%s", mode, len(chosen), len(model.layers),
                ", ".join(chosen), ", inputs offloaded to host memory" if offload else "")


def _chosen_blocks(model: nn.Module, mode: str, num_layers: int) -> list[str]:
    """Names in ``model.layers`` to checkpoint: all of them, or for ``"layers"`` those picked by global index."""
    if mode != "layers":
        return list(model.layers.keys())
    picked = set(checkpointed_blocks(model.args.num_layers, num_layers))
    return [name for name in model.layers.keys() if int(name) in picked]


class _OffloadedInput(ActivationWrapper):
    """Runs a checkpointed block with its input offloaded to host memory until the backward needs it.

    NOTE: the non-reentrant checkpoint stores its inputs as saved tensors before it installs its own
    hooks, so saved-tensor hooks entered around the call see the block input (eager), and, around a
    compiled block, the tensors the compiled graph saves (which include the input). Only tensors
    sharing the input's storage are offloaded: parameters and the RoPE tables (shared by every block)
    stay where they are.

    NOTE (torch.compile): this forward runs eagerly (``recursive=False``: the frames it calls are
    still compiled, so the checkpointed block inside is): hooks around a compiled region are
    honoured by its autograd function, whereas dynamo cannot trace them from inside.
    """

    @torch.compiler.disable(recursive=False)
    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        with _offload_hooks(hidden):
            return self._checkpoint_wrapped_module(hidden, *args, **kwargs)


@torch.compiler.disable  # dynamo would otherwise trace this frame, called from the eager forward above
def _offload_hooks(hidden: Tensor) -> torch.autograd.graph.saved_tensors_hooks:
    offload = _BlockInputOffload(hidden)
    return torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack)


class _BlockInputOffload:
    """Saved-tensor hooks that keep one tensor (a block's input) in host memory between forward and backward.

    ``pack`` copies it device-to-host on a side stream, so the copy overlaps the next blocks'
    forward, and the device memory is released as soon as the copy is done (``record_stream`` tells
    the caching allocator so). ``unpack`` (at the recompute) copies it back on the side stream and
    makes the compute stream wait for that copy only.

    Device-agnostic through ``torch.get_device_module``; on a CPU tensor it degrades to a plain copy
    (which is only useful to test the hooks: :func:`check_activation_checkpoint` refuses CPU runs).

    NOTE: an eager tensor-parallel block receives its input as a DTensor; it is left in place
    (rebuilding a DTensor inside autograd's unpack is not supported). Compiled blocks save the
    local shard, a plain tensor, which is offloaded.
    """

    # One side stream per device, shared by every block, so the copies run in the blocks' order.
    _streams: dict[torch.device, Any] = {}

    def __init__(self, hidden: Tensor):
        # A DTensor input is saved as itself by an eager block (left in place) and as its local shard
        # by a compiled one (offloaded): the key is the local shard's storage.
        self.key = _storage_key(hidden._local_tensor if isinstance(hidden, DTensor) else hidden)
        self.device = hidden.device
        self.module = torch.get_device_module(hidden.device.type)
        self.on_accelerator = hidden.device.type != "cpu"

    def _stream(self) -> Any:
        if self.device not in self._streams:
            self._streams[self.device] = self.module.Stream() if self.on_accelerator else None
        return self._streams[self.device]

    def pack(self, t: Tensor) -> Any:
        if isinstance(t, DTensor) or _storage_key(t) != self.key:
            return t
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.on_accelerator)
        stream = self._stream()
        if stream is None:
            host.copy_(t)
            return _Offloaded(host, t.device, None)
        # The copy may start only once the compute stream has produced t.
        stream.wait_stream(self.module.current_stream(t.device))
        with self.module.stream(stream):
            host.copy_(t, non_blocking=True)
            done = stream.record_event()
        t.record_stream(stream)  # the allocator must not reuse t's memory before the copy has read it
        return _Offloaded(host, t.device, done)

    def unpack(self, packed: Any) -> Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        stream = self._stream()
        if stream is None:
            return packed.host.clone()
        with self.module.stream(stream):
            stream.wait_event(packed.copied)
            t = packed.host.to(packed.device, non_blocking=True)
        compute = self.module.current_stream(packed.device)
        compute.wait_stream(stream)
        t.record_stream(compute)  # allocated on the side stream, used and freed on the compute stream
        return t


class _Offloaded:
    """A packed block input: its host copy, where it came from, and the event marking the copy done."""

    __slots__ = ("host", "device", "copied")

    def __init__(self, host: Tensor, device: torch.device, copied: Any):
        self.host, self.device, self.copied = host, device, copied


def _storage_key(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()
