"""The one attention function the model calls, and the backends behind it.

``attention(q, k, v, backend=...)`` takes queries ``[B, Hq, Sq, D]`` and keys/values
``[B, Hkv, Skv, D]`` (grouped-query attention: ``Hq`` is a multiple of ``Hkv``; K/V are
never repeated by the caller) and returns ``[B, Hq, Sq, D]`` in the dtype of ``q``. The model
calls it with ``Sq == Skv``; context parallelism (``torchtrain/parallel/cp.py``) with a chunk of
queries against the all-gathered keys, ``Sq < Skv``.

Backends live in :data:`BACKENDS`, a plain dict from name to :class:`AttentionBackend`: ``"sdpa"``
(``F.scaled_dot_product_attention``), ``"flex"`` (PyTorch's FlexAttention with a block mask built
from the masks), ``"reference"`` (the pure-PyTorch oracle) and ``"triton"`` (the FlashAttention-2
style op ``torchtrain::flash_attention`` from ``torchtrain.kernels.attention``). A backend declares what the rest of the trainer needs of it:

* its function ``fn(q, k, v, causal, document_ids, kv_document_ids, window, scale) -> (out, lse)``,
  ``lse`` the log-sum-exp ``[B, Hq, Sq]`` of each row's scores, or None where the backend cannot give it;
* the masks it implements (a subset of :data:`MASKS`), checked before a run starts;
* ``block_backward``, the gradients of a block of keys given the attention's final ``out`` and ``lse``
  (the kernels' backward signature), or None: ring context parallelism (``parallel/cp.py``) needs it and
  the ``lse``, and uses another backend when the model's has neither;
* the ops selective activation checkpointing keeps (``parallel/ac.py``) and the FLOP formulas of ops of
  its own (the planner's counters).

No other module names a backend. Every backend must agree with :func:`reference_attention`, the
pure-PyTorch oracle the kernel tests compare against. It lives beside the kernel in
``kernels/attention/reference.py`` (one reference for both) and is re-exported here with
:func:`document_mask`.

Masking semantics shared by all backends:

* Queries are bottom-right aligned with the keys: query ``i`` sits at key position
  ``i + Skv - Sq`` (flash-attn's convention; the usual square case when ``Sq == Skv``).
* ``causal``: query ``i`` sees keys ``j <= i + Skv - Sq``.
* ``document_ids``: an int tensor ``[B, Sq]``; query ``i`` only sees keys of the same
  document. Packed sequences use this so documents never attend across each other.
  ``kv_document_ids`` ``[B, Skv]`` are the keys' ids (default: ``document_ids``).
* ``window > 0`` (a sliding window): query ``i`` sees keys ``j > i + Skv - Sq - window``; with the
  causal mask that is the last ``window`` keys, itself included (Mistral's ``sliding_window``).
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
from torchtrain.kernels.attention.reference import (document_mask, reference_attention, reference_attention_backward,
                                                     visibility_mask)

__all__ = ["AttentionBackend", "attention", "reference_attention", "document_mask", "BACKENDS", "MASKS",
           "masks_of_call"]

# The masks a backend may implement: the causal triangle, packed documents, a sliding window.
MASKS = ("causal", "documents", "window")


@dataclass(frozen=True)
class AttentionBackend:
    """An attention backend as the rest of the trainer sees it."""

    # (q, k, v, causal, document_ids, kv_document_ids, window, scale) -> (out, lse or None)
    fn: Callable[..., tuple[Tensor, Optional[Tensor]]]
    masks: frozenset[str]  # those of MASKS that fn implements
    # (dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids, causal, window, scale) -> (dq, dk, dv) of one
    # block of keys, exact given the out and lse of the attention over all keys; None: the backend has none.
    block_backward: Optional[Callable[..., tuple[Tensor, Tensor, Tensor]]] = None
    # The ops of its forward that selective activation checkpointing keeps rather than recomputes (attention is
    # what that mode exists not to redo). A backend built of plain matmuls needs none: matmuls are kept anyway.
    saved_ops: tuple[Any, ...] = ()
    # FLOP formulas (torch.utils.flop_counter's signature) of ops of its own that torch's counter does not know.
    flop_formulas: dict[Any, Callable[..., int]] = field(default_factory=dict)
    # The device types it has a backward on (what training needs).
    trains_on: frozenset[str] = frozenset({"cpu", "cuda"})


def _sdpa_mask(q_len: int, kv_len: int, causal: bool, document_ids: Optional[Tensor],
               kv_document_ids: Optional[Tensor], window: int, device) -> Optional[Tensor]:
    """The explicit boolean mask SDPA needs, or None where ``is_causal`` (or nothing) says it all.

    NOTE: SDPA's ``is_causal`` is top-left aligned, so with fewer queries than keys the
    bottom-right-aligned causal triangle has to be spelt out.
    """
    if document_ids is None and window == 0 and (not causal or q_len == kv_len):
        return None
    # NOTE: not visibility_mask's padding rule (negative ids see nothing): SDPA gives NaN for such rows.
    mask = document_mask(document_ids, causal, kv_document_ids) if document_ids is not None else None
    if mask is None or window:
        mask = _and(mask, visibility_mask(q_len, kv_len, causal=causal and mask is None, window=window,
                                          device=device))
    return mask


def _and(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a & b


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
          kv_document_ids: Optional[Tensor], window: int, scale: Optional[float]) -> tuple[Tensor, None]:
    mask = _sdpa_mask(q.shape[2], k.shape[2], causal, document_ids, kv_document_ids, window, q.device)
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
    ), None


def _reference(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
               kv_document_ids: Optional[Tensor], window: int, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    return reference_attention(q, k, v, causal=causal, document_ids=document_ids, kv_document_ids=kv_document_ids,
                               window=window, scale=scale)


def _reference_block_backward(dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids, causal, window, scale):
    return reference_attention_backward(dout, dlse, q, k, v, out, lse, causal=causal, document_ids=document_ids,
                                        kv_document_ids=kv_document_ids, window=window, scale=scale)


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
            kv_document_ids: Optional[Tensor], window: int, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    # NOTE: the op ``torchtrain::flash_attention`` runs the Triton kernels on CUDA; on CPU it
    # runs them under the Triton interpreter when ``TRITON_INTERPRET=1`` is set before its
    # first call, and otherwise falls back to the reference (see ``kernels/attention/op.py``).
    return flash_attention(q, k, v, causal=causal, document_ids=document_ids, kv_document_ids=kv_document_ids,
                           window=window, scale=scale)


# The last block mask built outside compiled code, with what it was built from: every layer of a forward (and
# the recomputation of checkpointed ones) passes the same document-id tensors, so one mask serves the batch.
_last_block_mask: tuple = ()


def _flex_block_mask(q: Tensor, k: Tensor, causal: bool, document_ids: Optional[Tensor],
                     kv_document_ids: Optional[Tensor], window: int):
    """FlexAttention's block mask of these masks (None when there are none): which (query, key) pairs are
    visible, evaluated into the sparse block table its kernels skip by; built once per batch in eager code
    (inside a compiled block it is part of the block's graph)."""
    global _last_block_mask
    if not causal and document_ids is None and not window:
        return None
    if torch.compiler.is_compiling():
        return _build_flex_block_mask(q, k, causal, document_ids, kv_document_ids, window)
    # NOTE: tensors are compared by identity and version (an in-place change bumps it), never by value: a
    # comparison of values would cost as much as the mask.
    key = (q.shape[0], q.shape[2], k.shape[2], causal, window, q.device,
           *((t, t._version) if t is not None else (None, None) for t in (document_ids, kv_document_ids)))
    if _last_block_mask and len(_last_block_mask[0]) == len(key) and all(
            a is b if isinstance(a, Tensor) else a == b for a, b in zip(_last_block_mask[0], key)):
        return _last_block_mask[1]
    mask = _build_flex_block_mask(q, k, causal, document_ids, kv_document_ids, window)
    _last_block_mask = (key, mask)
    return mask


def _build_flex_block_mask(q: Tensor, k: Tensor, causal: bool, document_ids: Optional[Tensor],
                           kv_document_ids: Optional[Tensor], window: int):
    from torch.nn.attention.flex_attention import create_block_mask

    q_len, kv_len = q.shape[2], k.shape[2]
    offset = kv_len - q_len  # queries are the last q_len positions
    kv_ids = kv_document_ids if kv_document_ids is not None else document_ids

    def visible(b, h, q_index, kv_index):
        seen = kv_index >= 0
        if causal:
            seen = seen & (kv_index <= q_index + offset)
        if window:
            seen = seen & (kv_index > q_index + offset - window)
        if document_ids is not None:
            seen = seen & (document_ids[b, q_index] == kv_ids[b, kv_index]) & (kv_ids[b, kv_index] >= 0)
        return seen

    return create_block_mask(visible, q.shape[0] if document_ids is not None else None, None, q_len, kv_len,
                             device=q.device)


_compiled_flex_attention = None


def _flex(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
          kv_document_ids: Optional[Tensor], window: int, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    # NOTE: FlexAttention is fused only when compiled: inside the trainer's compiled blocks it is; called
    # eagerly on CUDA it is compiled here once (eager flex is its unfused reference). On CPU it runs eagerly.
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    run = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex_attention is None:
            _compiled_flex_attention = torch.compile(flex_attention)
        run = _compiled_flex_attention
    out, aux = run(q, k, v, block_mask=_flex_block_mask(q, k, causal, document_ids, kv_document_ids, window),
                   scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _autograd_block_backward(fn: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """A block backward (``AttentionBackend.block_backward``) for a backend whose ``fn`` autograd can
    differentiate, log-sum-exp included: the block's ``(out_b, lse_b)`` is recomputed and the gradients of the
    final ``out`` and ``lse`` are carried back through the merge of the blocks,
    ``out = sum_b w_b out_b``, ``lse = log sum_b exp(lse_b)``, ``w_b = exp(lse_b - lse)``:

    * ``d out_b = w_b dout``;
    * ``d lse_b = w_b (rowsum(dout * out_b) - rowsum(dout * out) + dlse)``.

    NOTE: it recomputes the block's forward (the kernels' backward needs none), the price of a backend that
    gives no backward of its own for a block.
    """

    def block_backward(dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids, causal, window, scale):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out_b, lse_b = fn(*leaves, causal, document_ids, kv_document_ids, window, scale)
            acc = torch.promote_types(out_b.dtype, torch.float32)  # at least fp32 for the weights and row sums
            # Rows this block hides entirely (lse_b = -inf) take no part, also where every block hides them.
            weight = torch.where(torch.isfinite(lse_b), torch.exp(lse_b.to(acc) - lse.to(acc)), 0.0)
            dout_acc = dout.to(acc)
            row_terms = (dout_acc * out_b.to(acc)).sum(-1) - (dout_acc * out.to(acc)).sum(-1)
            dlse_b = weight * (row_terms + (dlse.to(acc) if dlse is not None else 0.0))
            grads = torch.autograd.grad((out_b, lse_b), leaves, ((weight.unsqueeze(-1) * dout_acc).to(out_b.dtype),
                                                                 dlse_b.to(lse_b.dtype)), allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))

    return block_backward


def _keys_seen(q_shape, k_shape, window: int) -> tuple[int, ...]:
    """The key shape the kernels compute on: a window's keys at most per query (they skip the tiles outside it)."""
    return (*k_shape[:2], min(k_shape[2], window) if window > 0 else k_shape[2], k_shape[3])


def _flash_attention_flops(q, k, v, document_ids, kv_document_ids, causal, window, scale, *, out_val=None) -> int:
    return sdpa_flop_count(q.shape, _keys_seen(q.shape, k.shape, window), _keys_seen(q.shape, v.shape, window))


def _flash_attention_backward_flops(dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids, causal, window,
                                    scale, *, out_val=None) -> int:
    return sdpa_backward_flop_count(dout.shape, q.shape, _keys_seen(q.shape, k.shape, window),
                                    _keys_seen(q.shape, v.shape, window))


def _cpu_sdpa_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(q.shape, k.shape, v.shape)


def _cpu_sdpa_backward_flops(dout, q, k, v, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(dout.shape, q.shape, k.shape, v.shape)


_aten = torch.ops.aten
BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": AttentionBackend(_sdpa, frozenset(MASKS), saved_ops=(
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    ), flop_formulas={  # torch's FLOP registry has the GPU kernels' formulas, not the CPU one's
        _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    }),
    "reference": AttentionBackend(_reference, frozenset(MASKS), block_backward=_reference_block_backward),
    # FlexAttention has no backward on CPU (torch 2.13): it validates forward parity there, trains on CUDA.
    # Its op is a higher-order operator; torch's selective checkpointing caches its outputs like an op's.
    "flex": AttentionBackend(_flex, frozenset(MASKS), block_backward=_autograd_block_backward(_flex),
                             saved_ops=(torch.ops.higher_order.flex_attention,), trains_on=frozenset({"cuda"})),
    "triton": AttentionBackend(_triton, frozenset(MASKS), block_backward=torch.ops.torchtrain.flash_attention_backward,
                               saved_ops=(torch.ops.torchtrain.flash_attention.default,), flop_formulas={
        torch.ops.torchtrain.flash_attention: _flash_attention_flops,
        torch.ops.torchtrain.flash_attention_backward: _flash_attention_backward_flops,
    }),
}
"""Attention backends by name; ``ModelArgs.attention`` picks one of these keys."""


def masks_of_call(causal: bool, document_ids: Optional[Tensor], window: int) -> list[str]:
    """The :data:`MASKS` an attention call with these arguments applies."""
    return [name for name, used in zip(MASKS, (causal, document_ids is not None, window > 0)) if used]


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str, causal: bool = True,
              document_ids: Optional[Tensor] = None, kv_document_ids: Optional[Tensor] = None, window: int = 0,
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
        window: sliding window (keys each query sees, itself included, under the causal mask); 0: none.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, Hq, Sq, D]`` in the dtype of ``q``.
    """
    try:
        chosen = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; valid choices: {sorted(BACKENDS)}") from None
    if kv_document_ids is not None and document_ids is None:
        raise ValueError("attention: kv_document_ids needs document_ids (the queries' ids) as well")
    missing = [mask for mask in masks_of_call(causal, document_ids, window) if mask not in chosen.masks]
    if missing:
        raise ValueError(f"attention backend {backend!r} does not implement the {', '.join(missing)} mask; "
                         f"backends that do: {[name for name, b in BACKENDS.items() if set(missing) <= b.masks]}")
    return chosen.fn(q, k, v, causal, document_ids, kv_document_ids, window, scale)[0]
