"""The one attention function the model calls, and the backends behind it.

``attention(q, k, v, backend=...)`` takes queries ``[B, Hq, S, D]`` and keys/values
``[B, Hkv, S, D]`` (grouped-query attention: ``Hq`` is a multiple of ``Hkv``; K/V are
never repeated by the caller) and returns ``[B, Hq, S, D]`` in the dtype of ``q``.

Backends live in :data:`BACKENDS`, a plain dict from name to function: ``"sdpa"``
(``F.scaled_dot_product_attention``), ``"reference"`` (the pure-PyTorch oracle) and
``"triton"`` (the FlashAttention-2 style op ``torchtrain::flash_attention`` from
``kernels.attention``).

Every backend takes ``(q, k, v, causal, document_ids, scale)`` and must agree with
:func:`reference_attention`, the pure-PyTorch oracle the kernel tests compare against. It
lives beside the kernel in ``kernels/attention/reference.py`` (one reference for both) and is
re-exported here with :func:`document_mask`.

Masking semantics shared by all backends:

* ``causal``: query ``i`` sees keys ``j <= i`` (top-left aligned, as ``is_causal`` in
  ``F.scaled_dot_product_attention``).
* ``document_ids``: an int tensor ``[B, S]``; query ``i`` only sees keys of the same
  document. Packed sequences use this so documents never attend across each other.
* A query row that can see no key at all returns zeros (never NaN).
* Negative document ids (padding: sees nothing, seen by nothing) are defined only for the
  ``"reference"`` and ``"triton"`` backends; the loader never produces them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor

from kernels.attention import flash_attention
from kernels.attention.reference import document_mask, reference_attention

__all__ = ["attention", "reference_attention", "document_mask", "BACKENDS"]

AttentionBackend = Callable[[Tensor, Tensor, Tensor, bool, Optional[Tensor], Optional[float]], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
          scale: Optional[float]) -> Tensor:
    mask = None if document_ids is None else document_mask(document_ids, causal)
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
               scale: Optional[float]) -> Tensor:
    return reference_attention(q, k, v, causal=causal, document_ids=document_ids, scale=scale)[0]


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool, document_ids: Optional[Tensor],
            scale: Optional[float]) -> Tensor:
    # NOTE: the op ``torchtrain::flash_attention`` runs the Triton kernels on CUDA; on CPU it
    # runs them under the Triton interpreter when ``TRITON_INTERPRET=1`` is set before its
    # first call, and otherwise falls back to the reference (see ``kernels/attention/op.py``).
    return flash_attention(q, k, v, causal=causal, document_ids=document_ids, scale=scale)[0]


BACKENDS: dict[str, AttentionBackend] = {
    "sdpa": _sdpa,
    "reference": _reference,
    "triton": _triton,
}
"""Attention backends by name; ``ModelArgs.attention`` picks one of these keys."""


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str, causal: bool = True,
              document_ids: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Scaled dot-product attention through the named backend.

    Args:
        q: queries ``[B, Hq, S, D]``.
        k, v: keys and values ``[B, Hkv, S, D]``; ``Hq`` must be a multiple of ``Hkv``.
        backend: a key of :data:`BACKENDS` (``"sdpa"``, ``"reference"``, ...).
        causal: mask future keys.
        document_ids: optional ``[B, S]`` int tensor; tokens attend within their document.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``[B, Hq, S, D]`` in the dtype of ``q``.
    """
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; valid choices: {sorted(BACKENDS)}") from None
    return fn(q, k, v, causal, document_ids, scale)
