"""FlashAttention-2-style Triton kernels: forward, and a three-kernel backward.

Layout: ``q``/``do``/``o``/``dq`` are ``[B, Hq, Sq, D]``, ``k``/``v``/``dk``/``dv`` are
``[B, Hkv, Skv, D]`` (any strides, last dim contiguous), ``lse``/``delta`` are fp32
``[B, Hq, Sq]`` (contiguous), ``document_ids`` int32 ``[B, Sq]`` and ``kv_document_ids`` int32
``[B, Skv]``. Query head ``h`` reads key/value head ``h // (Hq // Hkv)``: grouped-query attention
without repeating K/V. Queries are bottom-right aligned with the keys: query ``i`` sits at key
position ``i + offset`` with ``offset = Skv - Sq`` (0 in the square case; context parallelism runs
a chunk of queries against the keys up to the end of that chunk).

Masks, shared by every kernel through :func:`_visible`:

* tail: query ``i < Sq`` and key ``j < Skv`` (neither need be a multiple of a block);
* ``CAUSAL``: ``j <= i + offset``;
* ``HAS_WINDOW``: ``j > i + offset - window`` (sliding window, combined with causal when set);
* ``HAS_DOCS``: ``doc_q[i] == doc_k[j] >= 0`` (a negative id marks padding: it sees nothing).

Tile skipping: causal and window limits become loop bounds (fully masked key tiles are never
visited), and so do documents: the launcher computes, for each position, the span of positions on the
other side holding its document (:func:`_document_spans`), and a tile visits only the union of its
positions' spans (:func:`_span_range`). The loops thus have no data-dependent branch, which lets
Triton software-pipeline their loads; the mask inside each tile keeps the result exact for ANY ids
(interleaved documents only visit more tiles), and for contiguous packed documents, what our loader
produces, the spans are the documents themselves.

Softmax statistics are fp32 and kept in base 2 (``exp2``, scores pre-multiplied by
``scale * log2(e)``); ``lse`` is stored in natural log. A row that sees no key keeps
``m = -inf, l = 0`` and is written as out 0, lse -inf. Batch/head offsets are ``int64`` so
``B * H * S * D`` beyond 2**31 never overflows.

Interpreter vs. compiled is decided at import: ``triton.jit`` reads ``TRITON_INTERPRET`` when
it decorates, both these kernels and ``triton.language``'s own helpers (decorated when triton
is first imported). :data:`INTERPRET` records what was decided; importing this module with a
setting that differs from triton's raises.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction


def language_interpreted() -> bool:
    """Whether ``triton.language`` itself was imported for the interpreter.

    Its own ``@triton.jit`` helpers (``tl.zeros``, ...) are decorated when ``triton`` is first
    imported, so ``TRITON_INTERPRET`` must be set before THAT import; setting it later gives
    interpreted kernels calling compiled helpers, which fails.
    """
    return not isinstance(tl.zeros, JITFunction)


INTERPRET: bool = bool(knobs.runtime.interpret)
"""Whether these kernels were decorated for the interpreter (they then run on CPU tensors)."""

if INTERPRET != language_interpreted():
    raise RuntimeError(
        f"TRITON_INTERPRET={'1' if INTERPRET else '0'} now, but triton was imported with the opposite "
        "setting; set TRITON_INTERPRET before anything imports triton")

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# ---------------------------------------------------------------------------------------
# Autotuning configs. Key: head dim, causality, masks, and (added by the autotuner) dtypes.
# ---------------------------------------------------------------------------------------


def config_table(kind: str, major: int) -> list[tuple[int, int, int, int]]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` the autotuner tries for kernel ``kind`` ("fwd",
    "dkdv", "dq") on a GPU of compute capability ``major``.x.

    Each config compiles, without spilling a register, within the architecture's shared memory and with
    its tensor-core instructions, for head dims 64 and 128, bf16 and fp16, causal, documents and window:
    ``python bench/kernel_static.py`` compiles them all for sm_80, sm_90 and sm_100 (tests/test_kernel_static.py
    the first of each in CI). The configs that spilled there were removed; dK/dV keeps four tiles in registers
    and spills with a pipelined loop on sm_90/sm_100, so it runs one stage there.
    """
    tables = {
        8: {  # Ampere (and the mma.sync GPUs after it: sm_89, sm_120): 163 KB of shared memory a block on A100
            "fwd": [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
            "dkdv": [(32, 64, 8, 1), (32, 32, 8, 2), (32, 32, 4, 2)],
            "dq": [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)],
        },
        9: {  # Hopper: 227 KB, wgmma needs tiles of at least 64 rows
            "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
            "dkdv": [(64, 64, 8, 1), (128, 64, 8, 1)],
            "dq": [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 2)],
        },
        10: {  # Blackwell: 227 KB, tensor memory
            "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
            "dkdv": [(64, 64, 8, 1), (128, 64, 8, 1)],
            "dq": [(64, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
        },
    }
    return tables[major if major in (9, 10) else 8][kind]


def _configs(kind: str) -> list[triton.Config]:
    if INTERPRET:  # one small config: the interpreter is slow and there is nothing to tune
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 8
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in config_table(kind, major)]


_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_DOCS"]

# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


@triton.jit
def _visible(offs_m, offs_n, q_len, kv_len, offset, window, doc_q, doc_k,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Boolean ``[BLOCK_M, BLOCK_N]``: may query ``offs_m[i]`` see key ``offs_n[j]``."""
    mask = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
    if CAUSAL:
        mask = mask & (offs_n[None, :] <= offs_m[:, None] + offset)
    if HAS_WINDOW:
        mask = mask & (offs_n[None, :] > offs_m[:, None] + offset - window)
    if HAS_DOCS:  # same document, and a negative id (padding) sees and is seen by nothing
        mask = mask & (doc_q[:, None] == doc_k[None, :]) & (doc_k[None, :] >= 0)
    return mask


@triton.jit
def _key_range(start_m, kv_len, offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[lo, hi)`` of key positions a query tile starting at ``start_m`` can see; ``lo`` is BLOCK_N aligned."""
    lo = 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(kv_len, start_m + BLOCK_M + offset)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m + offset - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(start_n, q_len, offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``[lo, hi)`` of query positions that can see a key tile starting at ``start_n``; ``lo`` is BLOCK_M aligned."""
    lo = 0
    hi = q_len
    if CAUSAL:
        lo = (tl.maximum(0, start_n - offset) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(q_len, start_n + BLOCK_N - offset + window - 1)
    return lo, hi


@triton.jit
def _span_range(SPAN, offs, valid, length, other_len, lo, hi, BLOCK: tl.constexpr):
    """``[lo, hi)`` narrowed to the positions that share a document with the tile's positions ``offs``.

    ``SPAN`` is this batch row's ``[2, length]`` spans (``_document_spans``): for each position, the
    first and one-past-the-last position of the other side holding its document. The new ``lo`` is
    ``BLOCK`` aligned; a tile whose documents the other side does not hold gets an empty range."""
    first = tl.load(SPAN + offs, mask=valid, other=other_len)
    end = tl.load(SPAN + length + offs, mask=valid, other=0)
    lo = tl.maximum(lo, (tl.min(first, axis=0) // BLOCK) * BLOCK)
    hi = tl.minimum(hi, tl.max(end, axis=0))
    return lo, hi


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.autotune(configs=_configs("fwd"), key=_KEY)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, DOCS, KV_DOCS, KV_SPAN,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_db, stride_ds, stride_kdb, stride_kds,
    num_q_heads, group, q_len, kv_len, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b = (off_bh // num_q_heads).to(tl.int64)
    h = (off_bh % num_q_heads).to(tl.int64)
    kv_h = h // group

    Q += b * stride_qb + h * stride_qh
    O += b * stride_ob + h * stride_oh
    K += b * stride_kb + kv_h * stride_kh
    V += b * stride_vb + kv_h * stride_vh
    LSE += off_bh.to(tl.int64) * q_len
    offset = kv_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    doc_q = offs_m  # placeholder when there are no documents
    if HAS_DOCS:
        DOCS += b * stride_db
        KV_DOCS += b * stride_kdb
        doc_q = tl.load(DOCS + offs_m * stride_ds, mask=m_valid, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = _key_range(start_m, kv_len, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_DOCS:
        lo, hi = _span_range(KV_SPAN + b * 2 * q_len, offs_m, m_valid, q_len, kv_len, lo, hi, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        doc_k = offs_n
        if HAS_DOCS:
            doc_k = tl.load(KV_DOCS + offs_n * stride_kds, mask=n_valid, other=0)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # base-2 logits
        visible = _visible(offs_m, offs_n, q_len, kv_len, offset, window, doc_q, doc_k, CAUSAL, HAS_WINDOW,
                           HAS_DOCS)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible so far has m_new = -inf: shift by 0 instead so that
        # exp2(-inf - -inf) never produces NaN (p and alpha are then exactly 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if FP32_DOT:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + offs_m, lse, mask=m_valid)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    num_q_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``delta = rowsum(dO * O) - dlse`` (the lse gradient folds into delta: dS = P (dP - delta))."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b = (off_bh // num_q_heads).to(tl.int64)
    h = (off_bh % num_q_heads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = off_bh.to(tl.int64) * seq_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seq_len, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seq_len)


@triton.autotune(configs=_configs("dkdv"), key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOCS, KV_DOCS, Q_SPAN,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_db, stride_ds, stride_kdb, stride_kds,
    num_q_heads, num_kv_heads, group, q_len, kv_len, window, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key tile, kv head): loops over the group's query heads and query tiles,
    so dK/dV are summed over the group inside the kernel (no atomics, deterministic)."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    b = (off_bh // num_kv_heads).to(tl.int64)
    kv_h = (off_bh % num_kv_heads).to(tl.int64)
    offset = kv_len - q_len

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < kv_len
    d_valid = offs_d < HEAD_DIM
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
                other=0.0)

    doc_k = offs_n
    if HAS_DOCS:
        DOCS += b * stride_db
        KV_DOCS += b * stride_kdb
        doc_k = tl.load(KV_DOCS + offs_n * stride_kds, mask=n_valid, other=0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, hi = _query_range(start_n, q_len, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_DOCS:
        lo, hi = _span_range(Q_SPAN + b * 2 * kv_len, offs_n, n_valid, kv_len, q_len, lo, hi, BLOCK_M)
    for g in range(0, group):
        h = kv_h * group + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        row0 = (b * num_q_heads + h) * q_len
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < q_len
            doc_q = offs_m
            if HAS_DOCS:
                doc_q = tl.load(DOCS + offs_m * stride_ds, mask=m_valid, other=0)
            q_mask = m_valid[:, None] & d_valid[None, :]
            q = tl.load(Qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(LSE + row0 + offs_m, mask=m_valid, other=0.0)
            delta = tl.load(DELTA + row0 + offs_m, mask=m_valid, other=0.0)
            # A row with lse = -inf sees no key: every entry is masked below anyway; shift
            # by +inf so exp2 gives 0 rather than inf before the mask is applied.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            if FP32_DOT:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            visible = _visible(offs_m, offs_n, q_len, kv_len, offset, window, doc_q, doc_k, CAUSAL, HAS_WINDOW,
                               HAS_DOCS)
            p = tl.where(visible, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
            if FP32_DOT:
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            if FP32_DOT:
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)

    dk *= sm_scale
    tl.store(DK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs("dq"), key=_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOCS, KV_DOCS, KV_SPAN,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_db, stride_ds, stride_kdb, stride_kds,
    num_q_heads, group, q_len, kv_len, window, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, query head): loops over the visible key tiles."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b = (off_bh // num_q_heads).to(tl.int64)
    h = (off_bh % num_q_heads).to(tl.int64)
    kv_h = h // group
    K += b * stride_kb + kv_h * stride_kh
    V += b * stride_vb + kv_h * stride_vh
    offset = kv_len - q_len

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask,
                 other=0.0)
    row0 = off_bh.to(tl.int64) * q_len
    lse = tl.load(LSE + row0 + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + row0 + offs_m, mask=m_valid, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    doc_q = offs_m
    if HAS_DOCS:
        DOCS += b * stride_db
        KV_DOCS += b * stride_kdb
        doc_q = tl.load(DOCS + offs_m * stride_ds, mask=m_valid, other=0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, kv_len, offset, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    if HAS_DOCS:
        lo, hi = _span_range(KV_SPAN + b * 2 * q_len, offs_m, m_valid, q_len, kv_len, lo, hi, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        doc_k = offs_n
        if HAS_DOCS:
            doc_k = tl.load(KV_DOCS + offs_n * stride_kds, mask=n_valid, other=0)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        visible = _visible(offs_m, offs_n, q_len, kv_len, offset, window, doc_q, doc_k, CAUSAL, HAS_WINDOW,
                           HAS_DOCS)
        p = tl.where(visible, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if FP32_DOT:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)

    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------
# Launchers (plain functions on tensors; the torch op in ``op.py`` calls these)
# ---------------------------------------------------------------------------------------


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, document_ids, kv_document_ids, window: int):
    """The query and key document ids (placeholders without documents, the query ids when the keys
    have none of their own), their four strides, the document spans each way (placeholders without
    documents) and the kernels' compile-time flags."""
    head_dim = q.shape[-1]
    docs = document_ids if document_ids is not None else q.new_zeros(1, 1, dtype=torch.int32)
    kv_docs = kv_document_ids if kv_document_ids is not None else docs
    kv_span = q_span = docs
    if document_ids is not None:
        kv_span, q_span = _document_spans(docs, kv_docs), _document_spans(kv_docs, docs)
    flags = dict(
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_WINDOW=window > 0, HAS_DOCS=document_ids is not None, FP32_DOT=q.dtype == torch.float32,
    )
    strides = (docs.stride(0), docs.stride(1), kv_docs.stride(0), kv_docs.stride(1))
    return docs, kv_docs, kv_span, q_span, strides, flags


def _document_spans(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, 2, len(ids)]``: for each position of ``ids``, the first and one past the last position
    of ``other`` holding the same document id; ``(len(other), 0)``, empty, where none does or the id is
    negative (padding).

    The kernels bound their tile loops by these spans (:func:`_span_range`), so the loops have no
    data-dependent branch and Triton can pipeline their loads; the mask inside a tile stays exact.
    Exact for any ids: sorted by id (stable, so each id's positions stay in order), an id's first and
    last position are the two ends of its run. For contiguous documents (what the loader packs) the span
    is the document itself.
    """
    length = other.shape[1]
    sorted_ids, order = torch.sort(other.to(torch.int64), dim=1, stable=True)
    wanted = ids.to(torch.int64).contiguous()
    left = torch.searchsorted(sorted_ids, wanted, right=False)
    right = torch.searchsorted(sorted_ids, wanted, right=True)
    found = (right > left) & (wanted >= 0)
    first = order.gather(1, left.clamp(max=length - 1))
    last = order.gather(1, (right - 1).clamp(min=0))
    spans = torch.stack([torch.where(found, first, length), torch.where(found, last + 1, 0)], dim=1)
    return spans.to(torch.int32).contiguous()


def forward(q, k, v, document_ids, kv_document_ids, causal: bool, window: int, scale: float):
    """Run the forward kernel; returns ``(out, lse)``. Inputs as prepared by ``op.py``."""
    batch, num_q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    group = num_q_heads // k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, num_q_heads, q_len, dtype=torch.float32, device=q.device)
    docs, kv_docs, kv_span, _, doc_strides, flags = _common(q, document_ids, kv_document_ids, window)
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * num_q_heads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, lse, docs, kv_docs, kv_span,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *doc_strides,
        num_q_heads, group, q_len, kv_len, window, scale * LOG2E,
        CAUSAL=causal, **flags,
    )
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, document_ids, kv_document_ids, causal: bool, window: int,
             scale: float):
    """Run the three backward kernels; returns ``(dq, dk, dv)`` in the dtypes of ``q, k, v``."""
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_q_heads // num_kv_heads
    docs, kv_docs, kv_span, q_span, doc_strides, flags = _common(q, document_ids, kv_document_ids, window)

    delta = torch.empty_like(lse)
    pre_block = 64
    _bwd_preprocess_kernel[(triton.cdiv(q_len, pre_block), batch * num_q_heads)](
        out, dout, dlse if dlse is not None else lse, delta,
        *_strides3(out), *_strides3(dout), num_q_heads, q_len,
        HEAD_DIM=head_dim, BLOCK_D=flags["BLOCK_D"], HAS_DLSE=dlse is not None, BLOCK_M=pre_block,
    )

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout))
    grid_kv = lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]), batch * num_kv_heads)  # noqa: E731
    _bwd_dkdv_kernel[grid_kv](
        q, k, v, dout, lse, delta, dk, dv, docs, kv_docs, q_span,
        *common, *_strides3(dk), *_strides3(dv), *doc_strides,
        num_q_heads, num_kv_heads, group, q_len, kv_len, window, scale * LOG2E, scale,
        CAUSAL=causal, **flags,
    )
    grid_q = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * num_q_heads)  # noqa: E731
    _bwd_dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, docs, kv_docs, kv_span,
        *common, *_strides3(dq), *doc_strides,
        num_q_heads, group, q_len, kv_len, window, scale * LOG2E, scale,
        CAUSAL=causal, **flags,
    )
    return dq, dk, dv
