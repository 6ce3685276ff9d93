"""The training loss: summed token cross-entropy, normalised by the caller.

Summing here and dividing by the global number of valid tokens in the trainer (not averaging per
microbatch) is what makes gradient accumulation and data parallelism exact.

Two entry points compute the same number:

* :func:`cross_entropy_sum` takes logits ``[B, S, V]`` (what ``Transformer.forward`` returns
  without labels). It saves only the logits (which the caller holds anyway) and one
  log-sum-exp per token for the backward, which writes the gradient in one pass: no
  log-softmax copy of the logits is kept, unlike ``F.cross_entropy``.
* :func:`linear_cross_entropy_sum` takes the final hidden states ``[..., d]`` and the output
  projection's weight ``[V, d]`` and never holds the logits of the whole batch: it works through
  the tokens in chunks, and for each chunk computes the logits, their log-sum-exp, the loss and
  (when a gradient will be needed) the gradients with respect to the hidden states and the
  weight, then drops the chunk. ``Transformer.forward(tokens, labels=labels)`` uses it.

The fp32 logits of a batch are the largest activation of a small model or of a large
vocabulary: 134 MB for 4,096 tokens at vocab 8,192, 4.2 GB for 8,192 tokens at vocab 128,256;
``F.cross_entropy`` then holds up to three more tensors of that size (the log-softmax it saves,
the gradient of the log-softmax and the gradient of the logits).

Both work on row chunks of the logits, so temporaries stay chunk-sized and the softmax passes over
a chunk run from cache; both compute the softmax in fp32 (fp64 for fp64 inputs).

Under tensor parallelism the output projection's weight is a DTensor sharded by vocabulary rows, and
:func:`linear_cross_entropy_sum` computes the loss vocabulary-parallel (loss parallelism): each rank
holds the logits of its slice of the vocabulary only, and the softmax statistics are combined with
one small collective per chunk. Neither the logits nor the full weight are ever gathered: at a
152,064-token vocabulary and 65,536 tokens per rank, the fp32 logits would be 37 GiB.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor, Replicate, Shard

IGNORE_INDEX = -100  # labels with this value (document boundaries) do not count

# The smallest chunk, in logits (fp32: 4 bytes each). 2**22 (16 MiB) stays in the last-level cache
# of a server CPU and keeps the chunk GEMMs of linear_cross_entropy_sum large enough to be efficient.
MIN_CHUNK_ELEMENTS = 2**22


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over valid tokens of ``-log softmax(logits)[label]``, computed in fp32.

    Same value and gradient as ``F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
    ignore_index=IGNORE_INDEX, reduction="sum")``, with less memory (see the module docstring).
    The gradient has the dtype of ``logits``.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropySum.apply(logits, labels)
    x = logits.reshape(-1, logits.shape[-1])
    return _chunked_loss(x, labels.reshape(-1), _ce_chunk_rows(x))[0]


def linear_cross_entropy_sum(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """``cross_entropy_sum(hidden @ weight.T, labels)`` without materialising the logits.

    Args:
        hidden: final hidden states ``[..., d]`` (after the final norm).
        weight: the output projection ``[V, d]`` (``nn.Linear.weight``; no bias).
        labels: int64 targets, shape ``hidden.shape[:-1]``; ``IGNORE_INDEX`` entries do not count.

    Returns the scalar sum of the token losses (fp32). The matmuls run in the dtype ``nn.Linear``
    would use (autocast's under autocast, else the inputs'); the softmax runs in fp32 and the
    weight gradient is accumulated in fp32 across chunks. Each chunk's logits hold about as many
    elements as the hidden states of the whole batch (at least ``MIN_CHUNK_ELEMENTS``), so the
    extra memory is about one more copy of the hidden states plus the weight's gradient.

    NOTE: when a gradient is needed, both gradients are computed in the forward, chunk by chunk,
    while the chunk's logits are at hand, and the backward only scales them by the incoming
    gradient (the loss is a sum, so its gradient is linear in that scalar). This costs no extra
    matmul, where recomputing the logits in the backward would cost one more; the price is that a
    forward whose loss is never backpropagated has done the backward's work too (under
    ``torch.no_grad()`` it does not).

    Tensor parallelism: when ``weight`` is a DTensor sharded ``Shard(0)`` (by vocabulary) over a 1-D
    mesh, as ``torchtrain.parallel.tp.apply_tp`` leaves the output projection, the loss is computed
    vocabulary-parallel without gathering the logits or the weight (see
    :func:`_vocab_parallel_linear_cross_entropy_sum`). ``hidden`` is then a DTensor on the same mesh,
    sharded along a token dimension (sequence parallelism: the final norm's output, ``Shard(1)``) or
    replicated, or a plain tensor holding the same full hidden states on every rank; ``labels`` are
    the full (unsharded) plain targets. The result is a plain scalar, the whole loss, identical on
    every rank of the mesh.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if isinstance(weight, DTensor):
        return _vocab_parallel_linear_cross_entropy_sum(hidden, weight, labels, compute_dtype, needs_grad)
    if isinstance(hidden, DTensor):
        raise ValueError("linear_cross_entropy_sum: hidden is a DTensor but weight is not; under tensor "
                         "parallelism the output projection's weight must be a DTensor sharded Shard(0)")
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropySum.apply(hidden, weight, labels, compute_dtype, needs_grad)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _ce_chunk_rows(x: Tensor) -> int:
    """Rows per chunk for logits ``x`` ``[N, V]``: at most 8 chunks, none under MIN_CHUNK_ELEMENTS."""
    return max(1, math.ceil(x.shape[0] / 8), MIN_CHUNK_ELEMENTS // x.shape[1])


def _chunk_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Loss sum of one chunk ``[rows, V]`` (in the softmax dtype) and what its gradient needs.

    Returns ``(loss_sum, shift, target)``: ``shift`` is each row's log-sum-exp, or +inf for an
    ignored row (so that ``exp(logits - shift)`` is 0 there); ``target`` the labels as a
    ``[rows, 1]`` index, ignored entries replaced by 0.
    """
    valid = target != IGNORE_INDEX
    target = torch.where(valid, target, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=1)
    loss = torch.where(valid, lse - logits.gather(1, target).squeeze(1), 0.0).sum()
    return loss, torch.where(valid, lse, math.inf), target


def _softmax_grad(logits: Tensor, shift: Tensor, target: Tensor, out: Tensor,
                  hit: Optional[Tensor] = None) -> Tensor:
    """``out = softmax(logits) - one_hot(target)``, 0 on ignored rows; ``out`` may be ``logits``.

    ``hit`` (bool ``[rows]``) marks the rows whose target is one of these columns; by default every
    valid row (a vocabulary shard's logits hold the targets of some rows only).
    """
    torch.sub(logits, shift.unsqueeze(1), out=out).exp_()
    # An ignored row (shift = +inf) is already all 0 and must not get the -1.
    if hit is None:
        hit = torch.isfinite(shift)
    return out.scatter_add_(1, target, -hit.unsqueeze(1).to(out.dtype))


def _chunked_loss(x: Tensor, targets: Tensor, rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Loss sum of logits ``x`` ``[N, V]``, and the per-row shift and target index of the gradient."""
    dtype = _softmax_dtype(x.dtype)
    total = torch.zeros((), device=x.device, dtype=dtype)
    shifts, indices = [], []
    for start in range(0, x.shape[0], rows):
        loss, shift, target = _chunk_loss(x[start:start + rows].to(dtype), targets[start:start + rows])
        total += loss
        shifts.append(shift)
        indices.append(target)
    return total, torch.cat(shifts), torch.cat(indices)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        x = logits.reshape(-1, logits.shape[-1])
        ctx.rows = _ce_chunk_rows(x)
        total, shift, target = _chunked_loss(x, labels.reshape(-1), ctx.rows)
        ctx.save_for_backward(logits, shift, target)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, shift, target = ctx.saved_tensors
        x = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(x)
        dtype = _softmax_dtype(x.dtype)
        for start in range(0, x.shape[0], ctx.rows):
            end = start + ctx.rows
            if dtype == x.dtype:  # written straight into the gradient
                _softmax_grad(x[start:end], shift[start:end], target[start:end], out=grad[start:end]).mul_(grad_out)
            else:  # low-precision logits: the chunk's softmax in fp32, then cast
                chunk = x[start:end].to(dtype)
                grad[start:end] = _softmax_grad(chunk, shift[start:end], target[start:end], out=chunk).mul_(grad_out)
        return grad.view_as(logits), None


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, compute_dtype: torch.dtype,
                needs_grad: bool) -> Tensor:
        dtype = _softmax_dtype(compute_dtype)
        h = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
        w = weight.to(compute_dtype)
        targets = labels.reshape(-1)
        rows = max(1, max(MIN_CHUNK_ELEMENTS, h.numel()) // w.shape[0])
        total = torch.zeros((), device=h.device, dtype=dtype)
        grad_h = torch.empty_like(h) if needs_grad and hidden.requires_grad else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=dtype) if needs_grad and weight.requires_grad else None
        for start in range(0, h.shape[0], rows):
            h_chunk = h[start:start + rows]
            logits = (h_chunk @ w.t()).to(dtype)  # [rows, V]
            loss, shift, target = _chunk_loss(logits, targets[start:start + rows])
            total += loss
            if grad_h is None and grad_w is None:
                continue
            grad = _softmax_grad(logits, shift, target, out=logits).to(compute_dtype)
            if grad_h is not None:
                torch.mm(grad, w, out=grad_h[start:start + rows])
            if grad_w is not None:
                if compute_dtype == dtype:
                    grad_w.addmm_(grad.t(), h_chunk)
                else:  # a low-precision GEMM per chunk (fp32 accumulation inside it), summed in fp32
                    grad_w += grad.t() @ h_chunk
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.hidden_shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = _scaled_gradients(ctx, grad_out)
        if grad_h is not None:
            grad_h = grad_h.view(ctx.hidden_shape)
        return grad_h, grad_w, None, None, None


# ---------------------------------------------------------------------------------------
# Vocabulary-parallel (tensor-parallel) loss
# ---------------------------------------------------------------------------------------

def _vocab_parallel_linear_cross_entropy_sum(hidden: Tensor, weight: DTensor, labels: Tensor,
                                             compute_dtype: torch.dtype, needs_grad: bool) -> Tensor:
    """:func:`linear_cross_entropy_sum` with the weight sharded by vocabulary rows over a 1-D mesh.

    Every rank gathers the hidden states of all tokens (they are sharded along the sequence, and
    ``tokens x d`` is small next to ``tokens x V``), computes the logits of its vocabulary slice
    chunk by chunk, and combines each chunk's per-token log-sum-exp and target logit with one
    all-gather of ``2 x rows`` numbers per rank. As in the plain path, the gradients are computed in
    the forward: the weight's is local to the shard, the hidden states' is a partial sum over the
    vocabulary shards, reduce-scattered back along the sequence (all-reduced if ``hidden`` was
    replicated) once at the end.
    """
    mesh = weight.device_mesh
    if mesh.ndim != 1 or weight.placements != (Shard(0),):
        raise ValueError(
            "linear_cross_entropy_sum: a DTensor weight must be sharded Shard(0) (by vocabulary) over a 1-D "
            f"mesh, got placements {weight.placements} on a {mesh.ndim}-D mesh")
    tp = mesh.size()
    if weight.shape[0] % tp:
        raise ValueError(f"linear_cross_entropy_sum: the vocabulary ({weight.shape[0]}) must be divisible by "
                         f"the tensor-parallel size ({tp})")
    if isinstance(labels, DTensor) or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy_sum: labels must be a plain tensor of the full shape {tuple(hidden.shape[:-1])} "
            f"on every rank, got {type(labels).__name__} {tuple(labels.shape)}")
    token_dim = None  # the dimension hidden is sharded along; None: every rank holds all tokens
    if isinstance(hidden, DTensor):
        if hidden.device_mesh != mesh:
            raise ValueError("linear_cross_entropy_sum: hidden and weight must be DTensors on the same mesh")
        (placement,) = hidden.placements
        if isinstance(placement, Shard):
            token_dim = placement.dim % hidden.ndim
            if token_dim == hidden.ndim - 1 or hidden.shape[token_dim] % tp:
                raise ValueError(
                    f"linear_cross_entropy_sum: hidden {tuple(hidden.shape)} must be sharded evenly along a token "
                    f"dimension, got Shard({placement.dim}) over {tp} ranks")
        elif not isinstance(placement, Replicate):
            raise ValueError(f"linear_cross_entropy_sum: hidden must be Shard or Replicate, got {placement}")
        hidden = hidden.to_local()
    device_type = hidden.device.type
    with torch.autocast(device_type, enabled=False):
        return _VocabParallelLinearCrossEntropySum.apply(
            hidden, weight.to_local(), labels, compute_dtype, needs_grad, mesh.get_group(), token_dim)


def _gather_tokens(x: Tensor, token_dim: int, group: dist.ProcessGroup) -> Tensor:
    """All-gather ``x`` along ``token_dim``; the result has that dimension FIRST (``[tp * n, ...]``)."""
    x = x.movedim(token_dim, 0).contiguous()
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_single(out, x, group=group)
    return out


def _waited(x: Tensor) -> Tensor:
    """``x``, or the tensor behind it if it is the pending result of an asynchronous DTensor collective.

    NOTE: ``DTensor.to_local()`` can return such a wrapper (after a redistribute with ``async_op``);
    the c10d collectives below read the raw storage, so the pending collective must have finished.
    """
    return x.wait() if isinstance(x, AsyncCollectiveTensor) else x


class _VocabParallelLinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, compute_dtype: torch.dtype,
                needs_grad: bool, group: dist.ProcessGroup, token_dim: Optional[int]) -> Tensor:
        dtype = _softmax_dtype(compute_dtype)
        want_grad_h, want_grad_w = needs_grad and hidden.requires_grad, needs_grad and weight.requires_grad
        ctx.dtypes = (hidden.dtype, weight.dtype)
        w = _waited(weight).to(compute_dtype)  # [V / tp, d], this rank's rows of the vocabulary
        vocab_start = dist.get_rank(group) * w.shape[0]
        h = _waited(hidden).to(compute_dtype)
        if token_dim is None:
            targets = labels.reshape(-1)
        else:
            # NOTE: the gathered tokens are kept in [S, B, ...] order (the all-gather's), not
            # transposed back: the loss is a sum over tokens, so the labels are permuted instead,
            # which saves a copy of the hidden states here and of their gradient below.
            h = _gather_tokens(h, token_dim, group)
            gathered_shape = h.shape
            targets = labels.movedim(token_dim, 0).reshape(-1)
        h = h.reshape(-1, h.shape[-1])  # [tokens, d], all tokens of the batch
        valid = targets != IGNORE_INDEX
        local = targets - vocab_start
        hit = valid & (local >= 0) & (local < w.shape[0])  # this shard holds the target's logit
        local = torch.where(hit, local, 0).unsqueeze(1)
        # A chunk's logits hold as many elements as the plain path's: about the hidden states' count.
        rows = max(1, max(MIN_CHUNK_ELEMENTS, h.numel()) // w.shape[0])
        total = torch.zeros((), device=h.device, dtype=dtype)
        grad_h = torch.empty_like(h) if want_grad_h else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=dtype) if want_grad_w else None
        for start in range(0, h.shape[0], rows):
            end = start + rows
            h_chunk = h[start:end]
            logits = (h_chunk @ w.t()).to(dtype)  # [rows, V / tp]
            target_logit = torch.where(hit[start:end], logits.gather(1, local[start:end]).squeeze(1), 0.0)
            # NOTE: one collective per chunk: the log-sum-exp over the whole vocabulary is the
            # log-sum-exp of the shards' log-sum-exps, and exactly one shard holds the target logit.
            stats = torch.stack((torch.logsumexp(logits, dim=1), target_logit))  # [2, rows]
            every = stats.new_empty((dist.get_world_size(group) * 2, stats.shape[1]))
            dist.all_gather_single(every, stats, group=group)
            every = every.view(-1, 2, stats.shape[1])  # [tp, 2, rows]
            lse = torch.logsumexp(every[:, 0], dim=0)
            target_logit = every[:, 1].sum(0)
            chunk_valid = valid[start:end]
            total += torch.where(chunk_valid, lse - target_logit, 0.0).sum()
            if grad_h is None and grad_w is None:
                continue
            shift = torch.where(chunk_valid, lse, math.inf)
            grad = _softmax_grad(logits, shift, local[start:end], out=logits, hit=hit[start:end]).to(compute_dtype)
            if grad_h is not None:
                torch.mm(grad, w, out=grad_h[start:end])  # this shard's part of the sum over the vocabulary
            if grad_w is not None:
                if compute_dtype == dtype:
                    grad_w.addmm_(grad.t(), h_chunk)
                else:
                    grad_w += grad.t() @ h_chunk
        if grad_h is not None:
            # NOTE: the partial sums are reduced in the compute dtype, as the blocks' own tensor-parallel
            # input gradients are.
            if token_dim is None:
                dist.all_reduce(grad_h, group=group)
                grad_h = grad_h.view(hidden.shape)
            else:
                full = grad_h.view(gathered_shape)
                mine = full.new_empty((full.shape[0] // dist.get_world_size(group), *full.shape[1:]))
                dist.reduce_scatter_single(mine, full, group=group)
                grad_h = mine.movedim(0, token_dim).contiguous()
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return *_scaled_gradients(ctx, grad_out), None, None, None, None, None


def _scaled_gradients(ctx, grad_out: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The (hidden, weight) gradients computed in the forward, times the loss's incoming gradient.

    The loss is a sum, so its gradient is linear in that scalar: the backward of both linear +
    cross-entropy functions is this scaling and a cast back to the inputs' dtypes.
    """
    grad_h, grad_w = ctx.saved_tensors
    hidden_dtype, weight_dtype = ctx.dtypes
    if grad_h is not None:
        grad_h = (grad_h * grad_out).to(hidden_dtype)
    if grad_w is not None:
        grad_w = (grad_w * grad_out).to(weight_dtype)
    return grad_h, grad_w
