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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
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


def _softmax_grad(logits: Tensor, shift: Tensor, target: Tensor, out: Tensor) -> Tensor:
    """``out = softmax(logits) - one_hot(target)``, 0 on ignored rows; ``out`` may be ``logits``."""
    torch.sub(logits, shift.unsqueeze(1), out=out).exp_()
    # An ignored row (shift = +inf) is already all 0 and must not get the -1.
    return out.scatter_add_(1, target, -torch.isfinite(shift).unsqueeze(1).to(out.dtype))


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
        grad_h, grad_w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = (grad_h * grad_out).to(hidden_dtype).view(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(weight_dtype)
        return grad_h, grad_w, None, None, None
