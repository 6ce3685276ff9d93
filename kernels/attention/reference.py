"""Pure-PyTorch attention with the kernels' signature and masks: the test oracle and the CPU path.

Everything is computed in ``promote(dtype, float32)`` (fp32 math for half inputs, fp64 for
fp64 inputs, which is what the kernel tests compare against). Masking semantics, shared with
the Triton kernels:

* queries may be fewer than keys (``Sq <= Skv``): the queries are then the LAST ``Sq``
  positions of the key sequence (bottom-right aligned, flash-attn's convention), so query ``i``
  sits at key position ``i + Skv - Sq``. Context parallelism uses this: a chunk of queries
  attends to the all-gathered keys up to and including its own chunk. With ``Sq == Skv`` that
  is the usual square case;
* ``causal``: query ``i`` sees keys ``j <= i + Skv - Sq``;
* ``window > 0``: query ``i`` sees keys ``j > i + Skv - Sq - window`` (a sliding window; with
  ``causal`` that is the last ``window`` keys including itself); ``0`` means no window;
* ``document_ids`` ``[B, Sq]`` and ``kv_document_ids`` ``[B, Skv]`` (default: ``document_ids``,
  which then needs ``Sq == Skv``): query ``i`` sees keys of the same document only; a negative
  key id marks padding, which no query sees (a negative query id matches no key's id, so such a
  query sees nothing either). The loader never produces one; it is how a row with no visible key
  arises, and :func:`document_mask`, which the ``sdpa`` backend uses, does not apply this rule,
  since SDPA would return NaN for such rows;
* a row that sees no key returns out 0 and lse ``-inf`` (never NaN, also in the gradients).

GQA: the ``Hq`` query heads are viewed as ``[Hkv, Hq // Hkv]`` and K/V broadcast over the
group dimension, so K/V are never copied.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["document_mask", "causal_mask", "visibility_mask", "reference_attention", "reference_attention_backward"]


def document_mask(document_ids: Tensor, causal: bool = True, kv_document_ids: Optional[Tensor] = None) -> Tensor:
    """Boolean mask ``[B, 1, Sq, Skv]``: True where query ``i`` may attend to key ``j``.

    Block-diagonal over documents (query ids ``document_ids`` ``[B, Sq]``, key ids
    ``kv_document_ids`` ``[B, Skv]``, default the query ids), intersected with the
    bottom-right-aligned causal triangle when ``causal``.
    NOTE: this materialises ``B * Sq * Skv`` booleans, fine on CPU and for modest lengths;
    the Triton kernel reads the ids directly instead.
    """
    kv_document_ids = document_ids if kv_document_ids is None else kv_document_ids
    mask = document_ids.unsqueeze(-1) == kv_document_ids.unsqueeze(-2)  # [B, Sq, Skv]
    if causal:
        mask = mask & causal_mask(document_ids.shape[-1], kv_document_ids.shape[-1], mask.device)
    return mask.unsqueeze(1)


def causal_mask(q_len: int, kv_len: int, device=None) -> Tensor:
    """``[Sq, Skv]`` booleans: query ``i`` sees key ``j <= i + Skv - Sq`` (bottom-right aligned)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def visibility_mask(q_len: int, kv_len: int, *, causal: bool, document_ids: Optional[Tensor] = None,
                    kv_document_ids: Optional[Tensor] = None, window: int = 0, device=None) -> Optional[Tensor]:
    """Boolean mask broadcastable to ``[B, 1, Sq, Skv]`` (True = may attend), or None for "all"."""
    if document_ids is not None:
        kv_ids = document_ids if kv_document_ids is None else kv_document_ids
        visible = document_mask(document_ids, causal, kv_ids) & (kv_ids >= 0)[:, None, None, :]
    elif causal:
        visible = causal_mask(q_len, kv_len, device)
    else:
        visible = None
    if window > 0:
        i = torch.arange(q_len, device=device).unsqueeze(-1) + (kv_len - q_len)  # key position of query i
        j = torch.arange(kv_len, device=device)
        in_window = j > i - window
        visible = in_window if visible is None else visible & in_window
    return visible


def _grouped(q: Tensor, k: Tensor, v: Tensor):
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = num_q_heads // num_kv_heads
    qf = q.to(dtype).reshape(batch, num_kv_heads, group, q_len, head_dim)
    kf = k.to(dtype).unsqueeze(2)  # [B, Hkv, 1, S, D], broadcast over the group
    vf = v.to(dtype).unsqueeze(2)
    return qf, kf, vf, group


def _visible5(q: Tensor, k: Tensor, group: int, causal: bool, document_ids: Optional[Tensor],
              kv_document_ids: Optional[Tensor], window: int, mask: Optional[Tensor]) -> Optional[Tensor]:
    """Visibility broadcastable to the grouped scores ``[B, Hkv, G, Sq, Skv]``."""
    batch, num_q_heads, q_len, _ = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    visible = visibility_mask(q_len, kv_len, causal=causal, document_ids=document_ids,
                              kv_document_ids=kv_document_ids, window=window, device=q.device)
    if visible is not None and visible.dim() == 4:
        visible = visible.unsqueeze(1)  # [B, 1, 1, Sq, Skv]
    if mask is not None:
        mask = mask.expand(batch, num_q_heads, q_len, kv_len).reshape(batch, num_kv_heads, group, q_len, kv_len)
        visible = mask if visible is None else visible & mask
    return visible


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                        document_ids: Optional[Tensor] = None, kv_document_ids: Optional[Tensor] = None,
                        window: int = 0, scale: Optional[float] = None,
                        mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch attention, softmax in (at least) fp32: the oracle for every kernel.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0`` and ``Sq <= Skv``
            (queries bottom-right aligned with the keys).
        causal, document_ids, kv_document_ids, window: the masks described in the module docstring.
        scale: softmax scale, default ``D ** -0.5``.
        mask: optional extra boolean visibility mask broadcastable to ``[B, Hq, Sq, Skv]``
            (True = may attend), ANDed with the others; tests use it for cases the model
            never produces, such as rows that see no key.

    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, Sq, D]`` in ``q``'s dtype and the log-sum-exp of the
        scaled scores ``[B, Hq, Sq]`` in fp32 (fp64 for fp64 inputs), ``-inf`` for a row
        that sees no key: the quantity context parallelism needs to merge partial results.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    qf, kf, vf, group = _grouped(q, k, v)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, Sq, Skv]
    visible = _visible5(q, k, group, causal, document_ids, kv_document_ids, window, mask)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))

    # Softmax by hand so a row with no visible key gives 0 instead of NaN: subtract a
    # finite row max (0 for an all -inf row), exponentiate (exp(-inf) = 0), divide by
    # the row sum clamped away from 0. The max is detached: softmax is shift invariant.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    row_sum = probs.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(row_sum.dtype).tiny
    out = torch.matmul(probs / row_sum.clamp_min(tiny), vf)
    # log of the clamped sum keeps the lse gradient finite for empty rows; then -inf there.
    lse = torch.where(row_sum > 0, row_sum.clamp_min(tiny).log() + row_max, float("-inf")).squeeze(-1)

    out = out.reshape(batch, num_q_heads, q_len, head_dim).to(q.dtype)
    return out, lse.reshape(batch, num_q_heads, q_len)


def reference_attention_backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                                 out: Tensor, lse: Tensor, *, causal: bool = True,
                                 document_ids: Optional[Tensor] = None, kv_document_ids: Optional[Tensor] = None,
                                 window: int = 0, scale: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' backward in plain PyTorch: ``(dq, dk, dv)`` in the dtypes of ``q, k, v``.

    Same algorithm as the Triton backward (recompute ``P = exp(S - lse)``, ``delta =
    rowsum(dO * O) - dlse``, ``dS = P (dP - delta)``), with dK/dV summed over each GQA group.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    scale = head_dim ** -0.5 if scale is None else scale
    qf, kf, vf, group = _grouped(q, k, v)
    dtype = qf.dtype
    shape5 = (batch, k.shape[1], group, q_len)
    dof = dout.to(dtype).reshape(*shape5, head_dim)
    lse5 = lse.to(dtype).reshape(*shape5, 1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    probs = torch.exp(scores - lse5)  # rows with lse = -inf are masked out below
    visible = _visible5(q, k, group, causal, document_ids, kv_document_ids, window, None)
    if visible is None:
        visible = torch.ones((), dtype=torch.bool, device=q.device)
    probs = torch.where(visible & torch.isfinite(lse5), probs, 0.0)

    delta = (dof * out.to(dtype).reshape(*shape5, head_dim)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(dtype).reshape(*shape5, 1)
    dv = torch.matmul(probs.transpose(-1, -2), dof).sum(2)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = probs * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf).sum(2) * scale
    return (dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
