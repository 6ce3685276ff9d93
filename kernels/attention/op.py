"""``torchtrain::flash_attention``: the Triton kernels as a torch op (fake, autograd, opcheck-able).

Two ops, so that ``torch.compile`` and AOTAutograd see opaque nodes with known shapes:

* ``torchtrain::flash_attention(q, k, v, document_ids, kv_document_ids, causal, window, scale)
  -> (out, lse)``
* ``torchtrain::flash_attention_backward(dout, dlse, q, k, v, out, lse, document_ids,
  kv_document_ids, causal, window, scale) -> (dq, dk, dv)``, called by the forward op's
  registered autograd formula.

Queries may be fewer than keys (bottom-right aligned: query ``i`` sits at key position
``i + Skv - Sq``), and queries and keys carry their own document ids: context parallelism runs a
local chunk of queries against the all-gathered keys this way.

``lse`` is returned (and differentiable: its gradient folds into ``delta``) so context
parallelism can merge partial attention results.

Where the implementation runs:

* CUDA tensors: the Triton kernels (``triton_kernels.py``).
* CPU tensors: the Triton kernels under the Triton interpreter when the kernel module was
  imported with ``TRITON_INTERPRET=1`` (that is how the kernel tests run them); otherwise the
  pure-PyTorch reference (``reference.py``), same math and masks, so the ``"triton"`` model
  backend works (slowly, materialising ``S x S`` scores) on a CPU-only machine or one without
  Triton. NOTE: Triton chooses interpreter vs. compiler when ``@triton.jit`` decorates, both
  for ``triton.language``'s helpers (when ``triton`` is first imported) and for our kernels;
  so ``TRITON_INTERPRET=1`` must be set before anything imports ``triton``. This module and
  ``torchtrain.models`` import neither ``triton`` nor the kernels until the first call that
  needs them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from torchtrain.kernels.attention.reference import reference_attention, reference_attention_backward

__all__ = ["flash_attention", "kernels_module", "uses_kernels"]

_kernels: Optional[ModuleType] = None


def kernels_module() -> Optional[ModuleType]:
    """The Triton kernel module (imported on first use), or None when Triton is not installed."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = importlib.import_module("torchtrain.kernels.attention.triton_kernels")
        except ImportError:
            return None
    return _kernels


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def uses_kernels(device: torch.device) -> bool:
    """Whether the op runs the Triton kernels (True) or the reference (False) for tensors on ``device``."""
    if device.type == "cuda":
        if kernels_module() is None:
            raise RuntimeError("torchtrain::flash_attention on CUDA needs triton (pip install triton)")
        return True
    if device.type == "cpu" and (_kernels is not None or _interpret_requested()):
        module = kernels_module()  # what decides is how its kernels were decorated, not the env now
        return module is not None and module.INTERPRET
    return False


def _check(q: Tensor, k: Tensor, v: Tensor, document_ids: Optional[Tensor], kv_document_ids: Optional[Tensor],
           window: int) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q [B, Hq, Sq, D] and k, v [B, Hkv, Skv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch or head dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if kv_document_ids is not None and document_ids is None:
        raise ValueError("kv_document_ids needs document_ids (the queries' document ids) as well")
    if document_ids is not None and kv_document_ids is None and q.shape[2] != k.shape[2]:
        raise ValueError(f"document_ids alone need as many queries as keys ({q.shape[2]} vs {k.shape[2]}); "
                         "pass the keys' ids as kv_document_ids")
    for name, ids, length in (("document_ids", document_ids, q.shape[2]),
                              ("kv_document_ids", kv_document_ids, k.shape[2])):
        if ids is not None and (ids.shape != (q.shape[0], length) or ids.is_floating_point()):
            raise ValueError(f"{name} must be an int tensor [B, S] = {(q.shape[0], length)}, "
                             f"got {ids.dtype} {tuple(ids.shape)}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (0 = no window), got {window}")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _docs(document_ids: Optional[Tensor]) -> Optional[Tensor]:
    # NOTE: ids are read as int32 by the kernels (document ids within one sequence are small).
    return None if document_ids is None else document_ids.to(torch.int32).contiguous()


@torch.library.custom_op("torchtrain::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor, document_ids: Optional[Tensor],
                     kv_document_ids: Optional[Tensor], causal: bool, window: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    _check(q, k, v, document_ids, kv_document_ids, window)
    if uses_kernels(q.device):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        return kernels_module().forward(q, k, v, _docs(document_ids), _docs(kv_document_ids), causal, window, scale)
    out, lse = reference_attention(q, k, v, causal=causal, document_ids=document_ids,
                                   kv_document_ids=kv_document_ids, window=window, scale=scale)
    return out.contiguous(), lse.float().contiguous()


@_flash_attention.register_fake
def _(q, k, v, document_ids, kv_document_ids, causal, window, scale):
    batch, num_q_heads, seq_len, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(batch, num_q_heads, seq_len, dtype=torch.float32))


@torch.library.custom_op("torchtrain::flash_attention_backward", mutates_args=())
def _flash_attention_backward(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, document_ids: Optional[Tensor], kv_document_ids: Optional[Tensor],
                              causal: bool, window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if uses_kernels(q.device):
        dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
        dlse = None if dlse is None else dlse.float().contiguous()
        return kernels_module().backward(dout, dlse, q, k, v, out, lse.contiguous(), _docs(document_ids),
                                         _docs(kv_document_ids), causal, window, scale)
    dq, dk, dv = reference_attention_backward(dout, dlse, q, k, v, out, lse, causal=causal,
                                              document_ids=document_ids, kv_document_ids=kv_document_ids,
                                              window=window, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_flash_attention_backward.register_fake
def _(dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids, causal, window, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, document_ids, kv_document_ids, causal, window, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, document_ids, kv_document_ids)
    ctx.causal, ctx.window, ctx.scale = causal, window, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, document_ids, kv_document_ids = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_attention_backward(dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids,
                                           ctx.causal, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_flash_attention.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, document_ids: Optional[Tensor] = None,
                    kv_document_ids: Optional[Tensor] = None, window: int = 0,
                    scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """FlashAttention-2 style attention; returns ``(out [B, Hq, Sq, D] in q's dtype, lse [B, Hq, Sq] fp32)``.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0`` (grouped-query
            attention; K/V are not repeated). With ``Sq < Skv`` the queries are the last ``Sq``
            positions of the keys' sequence (bottom-right aligned, flash-attn's convention).
        causal: query ``i`` sees keys ``j <= i + Skv - Sq``.
        document_ids: optional int ``[B, Sq]``; tokens see keys of their own document only. A
            negative id marks a padding token: it sees no key (out 0, lse ``-inf``) and no
            query sees it.
        kv_document_ids: optional int ``[B, Skv]``, the keys' document ids (default
            ``document_ids``, which then needs ``Sq == Skv``).
        window: sliding window, ``0`` = none; query ``i`` sees keys ``j > i + Skv - Sq - window``.
        scale: softmax scale, default ``D ** -0.5``.

    A row that sees no key gives out 0 and lse ``-inf``. Differentiable in q, k, v (through
    both ``out`` and ``lse``).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.torchtrain.flash_attention(q, k, v, document_ids, kv_document_ids, causal, window, scale)
