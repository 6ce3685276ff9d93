"""The one attention function the model calls, and the backends behind it.

``attention(q, k, v, backend=...)`` takes queries ``[B, Hq, Sq, D]`` and keys/values
``[B, Hkv, Skv, D]`` (grouped-query attention: ``Hq`` is a multiple of ``Hkv``; K/V are
never repeated by the caller) and returns ``[B, Hq, Sq, D]`` in the dtype of ``q``. The model
calls it with ``Sq == Skv``; context parallelism (``torchtrain/parallel/cp.py``) with a chunk of
queries against the all-gathered keys, ``Sq < Skv``.

Backends live in :data:`BACKENDS`, a plain dict from name to :class:`AttentionBackend`: ``"sdpa"``
(``F.scaled_dot_product_attention``), ``"reference"`` (the pure-PyTorch oracle) and
``"triton"`` (the FlashAttention-2 style op ``torchtrain::flash_attention`` from
``torchtrain.kernels.attention``). A backend declares, beside its function, the ops selective
activation checkpointing keeps and the FLOP formulas of ops of its own; ``parallel/ac.py`` and the
planner's counters read those declarations and name no backend.

Every backend's function takes ``(q, k, v, causal, document_ids, kv_document_ids, scale)`` and must agree with
:func:`reference_attention`, the pure-PyTorch oracle the kernel tests compare against. It
lives beside the kernel in ``kernels/attention/reference.py`` (one reference for both) and is
re-exported here with :func:`document_mask`.

Masking semantics shared by all backends:

* Queries are bottom-right aligned with the keys: query ``i`` sits at key position
  ``i + Skv - Sq`` (flash-attn's convention; the usual square case when ``Sq == Skv``).
* ``causal``: query ``i`` sees keys ``j <= i + Skv - Sq``.
* ``document_ids``: an int tensor ``[B, Sq]``; query ``i`` only sees keys of the same
  document. Packed sequences use this so documents never attend across each other.
  ``kv_document_ids`` ``[B, Skv]`` are the keys' ids (default: ``document_ids``).
* A query row that can see no key at all returns zeros (never NaN).
* Negative document ids (padding: sees nothing, seen by nothing) are defined only for the
  ``"reference"`` and ``"triton"`` backends; the loader never produces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from torchtrain.kernels.attention import flash_attention
from torchtrain.kernels.attention.reference import causal_mask, document_mask, reference_attention

__all__ = ["AttentionBackend", "attention", "reference_attention", "document_mask", "BACKENDS"]


@dataclass(frozen=True)
class AttentionBackend:
    """An attention backend as the rest of the trainer sees it."""

    fn: Callable[[Tensor, Tensor, Tensor, bool, Optional[Tensor], Optional[Tensor], Optional[float]], Tensor]
    # The ops of its forward that selective activation checkpointing keeps rather than recomputes (attention is
    # what that mode exists not to redo). A backend built of plain matmuls needs none: matmuls are kept anyway.
    saved_ops: tuple[Any, ...] = ()
    # FLOP formulas (torch.utils.flop_counter's signature) of ops of its own that torch's counter does not know.
    flop_formulas: dict[Any, Callable[..., int]] = field(default_factory=dict)


def _sdpa_mask(q_len: int, kv_len: int, causal: bool, document_ids: Optional[Tensor],
               kv_document_ids: Optional[Tensor], device) -> Optional[Tensor]:
    """The explicit boolean mask SDPA needs, or None where ``is_causal`` (or nothing) says it all.

    NOTE: SDPA's ``is_causal`` is top-left aligned, so with fewer queries than keys the
    bottom-right-aligned causal triangle has to be spelt out.
    """
    if document_ids is not None:
        return document_mask(document_ids, causal, kv_document_ids)
    if causal and q_len != kv_len:
        return causal_mask(q_len, kv_len, device)
    return None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
          kv_document_ids: Optional[Tensor], scale: Optional[float]) -> Tensor:
    mask = _sdpa_mask(q.shape[2], k.shape[2], causal, document_ids, kv_document_ids, q.device)
    # NOTE: grouped-query attention goes through ``enable_gqa=True`` rather than repeating
    # K/V with ``repeat_interleave``. Measured on this 2-core CPU (fp32, fwd+bwd,
    # Hq=8, Hkv=2, D=64): B=4,S=512 causal 226 vs 249 ms, with a document mask 248 vs
    # 305 ms; B=1,S=2048 causal 525 vs 537 ms, document mask 845 vs 974 ms. Never slower,
    # and it avoids materialising Hq/Hkv copies of K and V (their memory and the
    # backward's reduction over the copies).
    return F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _reference(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
               kv_document_ids: Optional[Tensor], scale: Optional[float]) -> Tensor:
    return reference_attention(q, k, v, causal=causal, document_ids=document_ids, kv_document_ids=kv_document_ids,
                               scale=scale)[0]


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
            kv_document_ids: Optional[Tensor], scale: Optional[float]) -> Tensor:
    # NOTE: the op ``torchtrain::flash_attention`` runs the Triton kernels on CUDA; on CPU it
    # runs them under the Triton interpreter when ``TRITON_INTERPRET=1`` is set before its
    # first call, and otherwise falls back to the reference (see ``kernels/attention/op.py``).
    return flash_attention(q, k, v, causal=causal, document_ids=document_ids, kv_document_ids=kv_document_ids,
                           scale=scale)[0]


def _flash_attention_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _flash_attention_backward_flops(dout, dlse, q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(dout.shape, q.shape, k.shape, v.shape)


_aten = torch.ops.aten
BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(_sdpa, saved_ops=(
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    )),
    "reference": AttentionBackend(_reference),
    "triton": AttentionBackend(_triton, saved_ops=(torch.ops.torchtrain.flash_attention.default,), flop_formulas={
        torch.ops.torchtrain.flash_attention: _flash_attention_flops,
        torch.ops.torchtrain.flash_attention_backward: _flash_attention_backward_flops,
    }),
}
"""Attention backends by name; ``ModelArgs.attention`` picks one of these keys."""


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str, causal: bool = True,
              document_ids: Optional[Tensor] = None, kv_document_ids: Optional[Tensor] = None,
              scale: Optional[float] = None) -> Tensor:
    """Scaled dot-product attention through the named backend.

    Args:
        q: queries ``[B, Hq, Sq, D]``.
        k, v: keys and values ``[B, Hkv, Skv, D]``; ``Hq`` must be a multiple of ``Hkv``. With
            ``Sq < Skv`` the queries are the last ``Sq`` positions (bottom-right aligned).
        backend: a key of :data:`BACKENDS` (``"sdpa"``, ``"reference"``, ...).
        causal: mask future keys.
        document_ids: optional ``[B, Sq]`` int tensor; tokens attend within their document.
        kv_document_ids: optional ``[B, Skv]`` int tensor, the keys' document ids; default
            ``document_ids`` (then ``Sq`` must equal ``Skv``).
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, Hq, Sq, D]`` in the dtype of ``q``.
    """
    try:
        fn = BACKENDS[backend].fn
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; valid choices: {sorted(BACKENDS)}") from None
    if kv_document_ids is not None and document_ids is None:
        raise ValueError("attention: kv_document_ids needs document_ids (the queries' ids) as well")
    return fn(q, k, v, causal, document_ids, kv_document_ids, scale)
