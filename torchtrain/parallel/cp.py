"""Context parallelism: each sequence split across the ``cp`` ranks, attention over all of it.

Every block but attention works token by token, so the cp ranks simply hold different tokens of
the same sequences (and the same parameters). Attention is the one place a token needs the others:
each rank all-gathers the keys and values of its cp group (the gradients flow back as a
reduce-scatter) and attends its own queries to them, with global positions and document ids so the
causal and document masks are exactly the single-process ones.

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
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from torchtrain.data import Batch
from torchtrain.models.attention import attention

logger = logging.getLogger(__name__)

__all__ = ["ROTATE_METHODS", "apply_cp", "chunk_indices", "shard_sequence", "unshard_sequence", "shard_batch",
           "batch_sharder", "ContextParallelAttention"]

# How the keys and values reach every rank; the recipe's ``parallelism.cp_rotate``.
ROTATE_METHODS = ("allgather",)


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
                 document_ids: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"context parallel attention expects this rank's share of one sequence for queries and "
                             f"keys alike, got {q.shape[2]} queries and {k.shape[2]} keys (a KV cache is not "
                             "supported under context parallelism)")
        # One all-gather for keys and values together (stacked on a new leading dim).
        keys, values = _all_gather_sequence(torch.stack([k, v]), self.cp_mesh, dim=3).unbind(0)
        kv_document_ids = None if document_ids is None else _all_gather_sequence(document_ids, self.cp_mesh, dim=1)
        chunk = q.shape[2] // 2
        outs = []
        for half, index in enumerate(chunk_indices(self.cp, self.rank)):
            # Causal: the chunk sees keys up to the end of its own chunk (bottom-right aligned);
            # the later chunks are fully masked and left out.
            end = (index + 1) * chunk if causal else keys.shape[2]
            outs.append(attention(
                q.narrow(2, half * chunk, chunk), keys[:, :, :end], values[:, :, :end], backend=backend,
                causal=causal, scale=scale,
                document_ids=None if document_ids is None else document_ids.narrow(1, half * chunk, chunk),
                kv_document_ids=None if kv_document_ids is None else kv_document_ids[:, :end]))
        return torch.cat(outs, dim=2)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh, rotate: str = "allgather") -> None:
    """Make every attention module of ``model`` (a Transformer or a pipeline stage) context parallel.

    Sets ``attention_fn`` on each block's ``Attention`` (nothing else of the model changes); apply
    before activation checkpointing and ``torch.compile`` (the compiled graph then contains the
    all-gathers). The caller feeds each cp rank its :func:`shard_batch` share, always with positions.
    """
    if rotate not in ROTATE_METHODS:
        raise ValueError(f"parallelism.cp_rotate = {rotate!r} is not available; valid choices: {ROTATE_METHODS}")
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_cp needs a 1-D context-parallel mesh, got {cp_mesh.ndim}-D {cp_mesh}")
    for block in model.layers.values():
        block.attention.attention_fn = ContextParallelAttention(cp_mesh)
    logger.info("context parallel: cp=%d, load-balanced chunks, K/V %s (%d blocks)", cp_mesh.size(), rotate,
                len(model.layers))


def batch_sharder(mesh: DeviceMesh, document_mask: bool) -> Callable[[Batch], Batch]:
    """What the trainer applies to each batch: :func:`shard_batch` over ``mesh["cp"]``, or nothing at cp = 1."""
    cp_mesh = mesh["cp"]
    if cp_mesh.size() == 1:
        return lambda batch: batch
    return partial(shard_batch, cp_mesh=cp_mesh, document_mask=document_mask)
