"""Context parallelism: each sequence split across the ``cp`` ranks, attention over all of it.

Every block but attention works token by token, so the cp ranks simply hold different tokens of
the same sequences (and the same parameters). Attention is the one place a token needs the others,
and there are two ways to bring the keys and values to the queries (``parallelism.cp_rotate``):

* ``"allgather"`` (:class:`ContextParallelAttention`): each rank all-gathers the keys and values of
  its cp group (the gradients flow back as a reduce-scatter) and attends its own queries to them;
* ``"ring"`` (:class:`RingAttention`): each rank keeps only its own share and passes it around the
  cp ring, one step per rank, merging the partial results with the log-sum-exp rule; the backward
  passes the keys and values around again together with their accumulating gradients. It never
  holds the whole sequence's keys and values, and autograd saves only the local ones.

Both use global positions and document ids, so the causal and document masks are exactly the
single-process ones.

Load balancing: the sequence is cut into ``2 * cp`` equal chunks and rank ``r`` holds chunks ``r``
and ``2 * cp - 1 - r``. Under a causal mask a query of chunk ``c`` sees ``c + 1`` chunks of keys, so
every rank does the same amount of attention work (``(r + 1) + (2 * cp - r) = 2 * cp + 1`` chunks),
where contiguous halves would leave the last rank with most of it. Each local chunk of queries is
one attention call against the gathered keys up to the end of that chunk (fewer queries than keys,
bottom-right-aligned causal mask: see ``models/attention.py``), so the fully masked key chunks
beyond it are never computed.

NOTE: this is our own implementation rather than PyTorch's experimental
``torch.distributed.tensor.experimental.context_parallel``: that one patches
``F.scaled_dot_product_attention`` globally (for every caller in the process, inside a context
manager around the step), dispatches only to the CUDA flash/efficient SDPA kernels (no CPU, where
our distributed tests run), and knows nothing of our Triton op or of document masks. Here the
parallel code replaces one attribute per attention module (``Attention.attention_fn``), the model
stays a plain module, and every backend of ``models/attention.py`` works.

The caller shards the batch with :func:`shard_batch` (tokens, labels, positions, document ids: the
same load-balanced cut) and sums the loss and counts its valid tokens over the data-parallel x cp
ranks; FSDP shards the parameters over ``dp_shard x cp``, which also sums the cp ranks' gradients.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from torchtrain.data import Batch
from torchtrain.models.attention import BACKENDS, attention

logger = logging.getLogger(__name__)

__all__ = ["RING_FALLBACK_BACKENDS", "RING_OPS", "ROTATE_METHODS", "ring_backend", "apply_cp", "chunk_indices", "shard_sequence", "unshard_sequence", "shard_batch",
           "batch_sharder", "ContextParallelAttention", "RingAttention", "merge_attention"]

# How the keys and values reach every rank; the recipe's ``parallelism.cp_rotate``.
ROTATE_METHODS = ("allgather", "ring")


def chunk_indices(cp: int, rank: int) -> tuple[int, int]:
    """The two of the ``2 * cp`` sequence chunks rank ``rank`` holds: ``rank`` and ``2 * cp - 1 - rank``."""
    return rank, 2 * cp - 1 - rank


def shard_sequence(x: Tensor, cp: int, rank: int, dim: int = 1) -> Tensor:
    """Rank ``rank``'s load-balanced share of ``x`` along ``dim``: chunks ``rank`` and ``2 * cp - 1 - rank``."""
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"context parallelism cuts the sequence into 2 * cp = {2 * cp} equal chunks, "
                         f"but its length is {x.shape[dim]}")
    chunks = x.chunk(2 * cp, dim)
    first, second = chunk_indices(cp, rank)
    return torch.cat([chunks[first], chunks[second]], dim)


def unshard_sequence(shards: Sequence[Tensor], dim: int = 1) -> Tensor:
    """The whole sequence back from every rank's share (``shards[r]`` is rank ``r``'s), in order."""
    cp = len(shards)
    chunks: list[Optional[Tensor]] = [None] * (2 * cp)
    for rank, shard in enumerate(shards):
        first, second = chunk_indices(cp, rank)
        chunks[first], chunks[second] = shard.chunk(2, dim)
    return torch.cat(chunks, dim)


def shard_batch(batch: Batch, cp_mesh: DeviceMesh, document_mask: bool) -> Batch:
    """This cp rank's share of ``batch`` (every tensor ``[B, S]`` cut the same way).

    ``positions`` become global: the loader's (restarting at each document) with document masking,
    else ``0 .. S-1``. NOTE: without context parallelism the model can default to ``0 .. S-1``; a
    cp rank's tokens are not a prefix of the sequence, so RoPE must be given their positions.
    """
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    positions = batch.positions
    if not document_mask:
        positions = torch.arange(batch.shape[1], device=positions.device).expand(batch.shape[0], -1)
    return replace(batch, **{name: shard_sequence(t, cp, rank) for name, t in (
        ("tokens", batch.tokens), ("labels", batch.labels), ("document_ids", batch.document_ids),
        ("positions", positions))})


def _all_gather_sequence(x: Tensor, cp_mesh: DeviceMesh, dim: int) -> Tensor:
    """Every cp rank's share of ``x`` along ``dim``, gathered and put back in sequence order.

    Differentiable: the all-gather's backward is a reduce-scatter (each rank gets the sum of the
    gradients every rank computed for its keys and values).
    """
    gathered = funcol.all_gather_single(x.contiguous(), dim, cp_mesh)  # rank order: [r0's share, r1's, ...]
    return unshard_sequence(gathered.chunk(cp_mesh.size(), dim), dim)


class ContextParallelAttention:
    """Drop-in for :func:`torchtrain.models.attention.attention` on one cp rank (all-gather K/V).

    Takes this rank's queries, keys and values ``[B, H, 2 * chunk, D]`` (its two load-balanced
    chunks, RoPE already applied at global positions) and its queries' document ids, and returns
    this rank's attention output, equal to the matching rows of single-process attention.
    """

    def __init__(self, cp_mesh: DeviceMesh):
        self.cp_mesh = cp_mesh
        self.cp, self.rank = cp_mesh.size(), cp_mesh.get_local_rank()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, backend: str, causal: bool = True,
                 document_ids: Optional[Tensor] = None, window: int = 0, scale: Optional[float] = None) -> Tensor:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"context parallel attention expects this rank's share of one sequence for queries and "
                             f"keys alike, got {q.shape[2]} queries and {k.shape[2]} keys (a KV cache is not "
                             "supported under context parallelism)")
        if window and not causal:
            raise ValueError("context parallel attention supports a sliding window under the causal mask only")
        # One all-gather for keys and values together (stacked on a new leading dim).
        keys, values = _all_gather_sequence(torch.stack([k, v]), self.cp_mesh, dim=3).unbind(0)
        kv_document_ids = None if document_ids is None else _all_gather_sequence(document_ids, self.cp_mesh, dim=1)
        chunk = q.shape[2] // 2
        outs = []
        for half, index in enumerate(chunk_indices(self.cp, self.rank)):
            # Causal: the chunk sees keys up to the end of its own chunk (bottom-right aligned);
            # the later chunks are fully masked and left out. A sliding window leaves out the keys before
            # its first query's window too (the alignment is kept: the keys still end where they did).
            end = (index + 1) * chunk if causal else keys.shape[2]
            start = max(0, index * chunk - window + 1) if window else 0
            outs.append(attention(
                q.narrow(2, half * chunk, chunk), keys[:, :, start:end], values[:, :, start:end], backend=backend,
                causal=causal, window=window, scale=scale,
                document_ids=None if document_ids is None else document_ids.narrow(1, half * chunk, chunk),
                kv_document_ids=None if kv_document_ids is None else kv_document_ids[:, start:end]))
        return torch.cat(outs, dim=2)


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over two disjoint sets of keys, from the results over each: ``(out, lse)``.

    ``out`` ``[B, H, S, D]`` and ``lse`` ``[B, H, S]`` are one partial result, ``block_out`` and
    ``block_lse`` the other. The log-sum-exp rule: ``lse = logaddexp(lse, block_lse)`` and ``out =
    exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``, computed and returned in fp32 (fp64 for
    fp64 inputs). A row that sees no key in either (``lse = -inf`` in both) gives out 0 and lse
    ``-inf``, not NaN.
    """
    dtype = torch.promote_types(torch.promote_types(lse.dtype, block_lse.dtype), torch.float32)
    lse, block_lse = lse.to(dtype), block_lse.to(dtype)
    merged = torch.logaddexp(lse, block_lse)
    # NOTE: -inf - -inf is NaN; shifting an empty row by 0 instead gives weights exp(-inf) = 0.
    shift = merged.masked_fill(merged == float("-inf"), 0.0)
    out = (torch.exp(lse - shift).unsqueeze(-1) * out.to(dtype)
           + torch.exp(block_lse - shift).unsqueeze(-1) * block_out.to(dtype))
    return out, merged


def _block_mask(query_chunk: int, key_chunk: int, causal: bool) -> Optional[bool]:
    """How a chunk of queries attends to a chunk of keys: None (skip: all in its future), True (the
    causal diagonal: the same chunk) or False (full: every key before it, or no causal mask)."""
    if not causal:
        return False
    if key_chunk > query_chunk:
        return None
    return key_chunk == query_chunk


def _block_window(query_chunk: int, key_chunk: int, chunk: int, window: int) -> tuple[int, int]:
    """A sliding window on a block of an earlier key chunk: ``(rows, block window)``, the first ``rows``
    queries of the chunk (the later ones see no key of it; 0: skip the block) attended without the causal
    mask to the whole key chunk with ``block window`` (0: none), bottom-right aligned as the kernels do.

    NOTE: query ``i`` of the chunk sees key ``j`` when ``j > i + delta - window``, ``delta`` the distance of
    the chunks in positions; the kernels' alignment puts query ``i`` of ``rows`` at key position
    ``i + chunk - rows``, so the block window ``chunk - rows - delta + window`` (at least 1) says exactly that.
    The diagonal block (``delta = 0``) is the square causal case with the model's window itself.
    """
    delta = (query_chunk - key_chunk) * chunk
    if not window or delta == 0 or window >= delta + chunk:  # no window, or every pair within it
        return chunk, window if delta == 0 else 0
    rows = min(chunk, chunk - 1 - delta + window)
    return max(rows, 0), chunk - rows - delta + window


def _ring_blocks(cp: int, rank: int, step: int, causal: bool, chunk: int, window: int):
    """The attention blocks of ``step``: ``(query half, key half, causal, rows, window)`` for this rank's two
    query chunks against the two key chunks it holds at that step (those of rank ``rank - step``): the
    block's first ``rows`` queries attend to the key chunk (the others see none of it; see
    :func:`_block_window`)."""
    source = (rank - step) % cp
    for q_half, q_chunk in enumerate(chunk_indices(cp, rank)):
        for k_half, k_chunk in enumerate(chunk_indices(cp, source)):
            block_causal = _block_mask(q_chunk, k_chunk, causal)
            if block_causal is None:
                continue
            rows, block_window = _block_window(q_chunk, k_chunk, chunk, window)
            if rows:
                yield q_half, k_half, block_causal, rows, block_window


def _ring_pass(tensors: list[Tensor], group: dist.ProcessGroup) -> tuple[list[Tensor], list]:
    """Post the sends of ``tensors`` to the next rank of the ring and the receives of the previous
    rank's into new buffers; returns the buffers and the requests to wait on before reading them."""
    cp, rank = group.size(), group.rank()
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), group=group, group_peer=(rank + 1) % cp) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=(rank - 1) % cp) for t in received]
    return received, dist.batch_isend_irecv(ops)


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


def _half(t: Optional[Tensor], half: int, dim: int, rows: Optional[int] = None) -> Optional[Tensor]:
    """Half ``half`` of ``t`` along ``dim`` (the rank's chunk), or its first ``rows`` entries."""
    if t is None:
        return None
    size = t.shape[dim] // 2
    return t.narrow(dim, half * size, size if rows is None else rows)


def _pad_rows(out: Tensor, lse: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """A block's result over the first queries of a chunk, extended to all ``rows``: the others saw no key
    (out 0, lse -inf, which :func:`merge_attention` merges as nothing)."""
    missing = rows - out.shape[2]
    if not missing:
        return out, lse
    return (torch.cat([out, out.new_zeros(*out.shape[:2], missing, out.shape[3])], dim=2),
            torch.cat([lse, lse.new_full((*lse.shape[:2], missing), float("-inf"))], dim=2))


# The backend whose blocks the ring computes, per device type, when the model's gives no log-sum-exp or block
# backward (SDPA): FlexAttention on GPUs (proven there by others, like the SDPA it stands in for), the
# attention op elsewhere (its pure-PyTorch path on a CPU; FlexAttention has no CPU backward).
RING_FALLBACK_BACKENDS = {"cuda": "flex"}
RING_FALLBACK_DEFAULT = "triton"


def ring_backend(backend: str, device_type: str) -> str:
    """The attention backend the ring runs its blocks with: the model's, where it declares a block backward."""
    if BACKENDS[backend].block_backward is not None:
        return backend
    return RING_FALLBACK_BACKENDS.get(device_type, RING_FALLBACK_DEFAULT)


@torch.library.custom_op("torchtrain::ring_attention", mutates_args=())
def _ring_attention(q: Tensor, k: Tensor, v: Tensor, document_ids: Optional[Tensor], causal: bool, window: int,
                    scale: float, group_name: str, backend: str) -> tuple[Tensor, Tensor]:
    """This rank's ``(out, lse)``: its queries against every rank's keys, passed around the ring."""
    block_attention = BACKENDS[backend].fn
    group = dist.distributed_c10d._resolve_process_group(group_name)
    cp, rank = group.size(), group.rank()
    chunk = q.shape[2] // 2
    merged: list[Optional[tuple[Tensor, Tensor]]] = [None, None]  # (out fp32, lse) per local query chunk
    held = [torch.stack([k, v])] + ([] if document_ids is None else [document_ids])  # those of rank - step
    for step in range(cp):
        # Overlap: the next share travels while this one is computed on.
        incoming, requests = _ring_pass(held, group) if step + 1 < cp else (None, [])
        kv, kv_ids = held[0], held[1] if len(held) > 1 else None
        for q_half, k_half, block_causal, rows, block_window in _ring_blocks(cp, rank, step, causal, chunk, window):
            out, lse = _pad_rows(*block_attention(
                _half(q, q_half, 2, rows), _half(kv[0], k_half, 2), _half(kv[1], k_half, 2), block_causal,
                _half(document_ids, q_half, 1, rows), _half(kv_ids, k_half, 1), block_window, scale), chunk)
            merged[q_half] = ((out.float(), lse) if merged[q_half] is None
                              else merge_attention(*merged[q_half], out, lse))
        _wait(requests)
        held = incoming
    # Every query chunk saw its own (diagonal) block at step 0, so both halves are set.
    return (torch.cat([merged[0][0], merged[1][0]], dim=2).to(q.dtype),
            torch.cat([merged[0][1], merged[1][1]], dim=2).contiguous())


@_ring_attention.register_fake
def _(q, k, v, document_ids, causal, window, scale, group_name, backend):
    batch, num_heads, seq_len, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch, num_heads, seq_len, dtype=torch.float32))


# The ring's forward, an op of its own: selective activation checkpointing keeps its output (parallel/ac.py).
RING_OPS = (torch.ops.torchtrain.ring_attention.default,)


@torch.library.custom_op("torchtrain::ring_attention_backward", mutates_args=())
def _ring_attention_backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, document_ids: Optional[Tensor], causal: bool, window: int, scale: float,
                             group_name: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`_ring_attention`: the keys and values go around the ring again, and
    with them the gradients of those keys and values, accumulated by every rank they pass."""
    block_backward = BACKENDS[backend].block_backward
    group = dist.distributed_c10d._resolve_process_group(group_name)
    cp, rank = group.size(), group.rank()
    chunk = q.shape[2] // 2
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    held = [torch.stack([k, v])] + ([] if document_ids is None else [document_ids])
    arriving: Optional[tuple[list[Tensor], list]] = None  # d(K, V) of the held share from the ranks before
    for step in range(cp):
        incoming, requests = _ring_pass(held, group) if step + 1 < cp else (None, [])
        kv, kv_ids = held[0], held[1] if len(held) > 1 else None
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for q_half, k_half, block_causal, rows, block_window in _ring_blocks(cp, rank, step, causal, chunk, window):
            # NOTE: with the merged (global) out and lse every block's backward is exact:
            # P = exp(S - lse) is the global softmax restricted to the block, delta = rowsum(dO * O) - dlse.
            dq_block, dk_block, dv_block = block_backward(
                _half(dout, q_half, 2, rows), _half(dlse, q_half, 2, rows), _half(q, q_half, 2, rows),
                _half(kv[0], k_half, 2), _half(kv[1], k_half, 2), _half(out, q_half, 2, rows),
                _half(lse, q_half, 2, rows), _half(document_ids, q_half, 1, rows), _half(kv_ids, k_half, 1),
                block_causal, block_window, scale)
            _half(dq, q_half, 2, rows).add_(dq_block)
            _half(dkv[0], k_half, 2).add_(dk_block)
            _half(dkv[1], k_half, 2).add_(dv_block)
        if arriving is not None:
            _wait(arriving[1])
            dkv += arriving[0][0]
        # NOTE: sent in fp32: the gradient of a share is a sum over cp ranks, rounded once at its owner.
        arriving = _ring_pass([dkv], group)
        _wait(requests)
        held = incoming
    # After cp steps the accumulated gradients of this rank's own keys and values have come home.
    _wait(arriving[1])
    dk, dv = arriving[0][0]
    # (copies: an op's outputs may not be views of one tensor)
    return dq.to(q.dtype), dk.to(k.dtype, copy=True), dv.to(v.dtype, copy=True)


@_ring_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, document_ids, causal, window, scale, group_name, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _ring_setup_context(ctx, inputs, output):
    q, k, v, document_ids, causal, window, scale, group_name, backend = inputs
    ctx.save_for_backward(q, k, v, *output, document_ids)
    ctx.causal, ctx.window, ctx.scale, ctx.group_name, ctx.backend = causal, window, scale, group_name, backend


def _ring_backward(ctx, dout, dlse):
    q, k, v, out, lse, document_ids = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _ring_attention_backward(dout, dlse, q, k, v, out, lse, document_ids, ctx.causal, ctx.window,
                                          ctx.scale, ctx.group_name, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


_ring_attention.register_autograd(_ring_backward, setup_context=_ring_setup_context)


class RingAttention:
    """Drop-in for :func:`torchtrain.models.attention.attention` on one cp rank (K/V passed around the ring).

    Same contract as :class:`ContextParallelAttention`. At step ``i`` (``0 .. cp-1``) rank ``r`` holds
    the keys, values and key document ids of rank ``r - i`` (the next share already in flight) and
    attends each of its two query chunks to each of the two key chunks held: skipped if the key
    chunk comes after the query chunk, causal if it is the same chunk, full if it comes before.
    The partial results are merged with :func:`merge_attention`.

    NOTE (op): the ring runs inside the custom ops ``torchtrain::ring_attention`` and
    ``torchtrain::ring_attention_backward`` (an autograd formula registered like the attention op's),
    not in a ``torch.autograd.Function`` around Python P2P calls: torch.compile compiles each block
    with ``fullgraph=True`` and cannot trace ``batch_isend_irecv``, while an op is one opaque node
    in the graph (its fake implementation gives the shapes) that runs eagerly. The process group
    goes in by name, the one argument type an op can carry for it.

    NOTE (backward): a hand-written ring backward rather than autograd through each step: autograd
    would save every step's keys and values (the whole sequence's, as with the all-gather) and
    every partial output. Here autograd saves only the local q, k, v, the merged out and lse; the
    backward passes the keys and values around again, each rank adding the gradient of its
    queries' blocks to the travelling fp32 dK/dV, which arrive back at their owner after cp steps.

    NOTE (backend): the blocks go through the model's attention backend where it declares a block
    backward (and so gives each block's log-sum-exp, which the merge needs), else through
    :data:`RING_FALLBACK_BACKENDS` (SDPA returns no log-sum-exp).

    NOTE (window): under a sliding window a block of an earlier key chunk is skipped when no query of the
    chunk reaches it, and otherwise attends its first queries (those that reach it) without the causal
    mask, with a window shifted to the chunks' distance (:func:`_block_window`): the kernels' bottom-right
    alignment then places each query where it is in the sequence, so every block is one kernel call.
    """

    def __init__(self, cp_mesh: DeviceMesh):
        self.cp_mesh = cp_mesh
        self.group_name = cp_mesh.get_group().group_name

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, backend: str, causal: bool = True,
                 document_ids: Optional[Tensor] = None, window: int = 0, scale: Optional[float] = None) -> Tensor:
        if window and not causal:
            raise ValueError("ring attention supports a sliding window under the causal mask only")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"ring attention expects this rank's share of one sequence for queries and keys alike, "
                             f"got {q.shape[2]} queries and {k.shape[2]} keys (a KV cache is not supported under "
                             "context parallelism)")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        return torch.ops.torchtrain.ring_attention(q, k, v, document_ids, causal, window, scale, self.group_name,
                                                   ring_backend(backend, q.device.type))[0]


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, rotate: str = "allgather") -> None:
    """Make every attention module of ``model`` (a Transformer or a pipeline stage) context parallel.

    Sets ``attention_fn`` on each block's ``Attention`` (nothing else of the model changes) to
    :class:`ContextParallelAttention` (``rotate="allgather"``) or :class:`RingAttention` (``"ring"``);
    apply before activation checkpointing and ``torch.compile`` (the compiled graph then contains the
    all-gathers, or the ring op). The caller feeds each cp rank its :func:`shard_batch` share, always
    with positions.
    """
    if rotate not in ROTATE_METHODS:
        raise ValueError(f"parallelism.cp_rotate = {rotate!r} is not available; valid choices: {ROTATE_METHODS}")
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_cp needs a 1-D context-parallel mesh, got {cp_mesh.ndim}-D {cp_mesh}")
    attention_fn = RingAttention(cp_mesh) if rotate == "ring" else ContextParallelAttention(cp_mesh)
    for block in model.layers.values():
        block.attention.attention_fn = attention_fn
    logger.info("context parallel: cp=%d, load-balanced chunks, K/V %s (%d blocks)", cp_mesh.size(), rotate,
                len(model.layers))


def batch_sharder(mesh: DeviceMesh, document_mask: bool) -> Callable[[Batch], Batch]:
    """What the trainer applies to each batch: :func:`shard_batch` over ``mesh["cp"]``, or nothing at cp = 1."""
    cp_mesh = mesh["cp"]
    if cp_mesh.size() == 1:
        return lambda batch: batch
    return partial(shard_batch, cp_mesh=cp_mesh, document_mask=document_mask)
