"""The Llama-family decoder-only Transformer, readable top to bottom.

One model covers Llama 2/3, InternLM, Qwen (1, 2, 3) and Mistral: pre-norm RMSNorm blocks,
grouped-query attention with rotary position embeddings, and a SwiGLU feed-forward; the families
differ only in sizes, RoPE base/scaling, which projections carry a bias, a head width other than
``dim // num_heads`` and a per-head q/k norm (Qwen3), and a sliding window (Mistral): see ``ModelArgs``.

Parameter names follow the original Llama code (``wq/wk/wv/wo``, ``w1/w2/w3``) and the
layout follows Hugging Face's (RoPE rotates the two halves of each head, not interleaved
pairs), so HF checkpoints map onto this model by renaming keys, with no permutation.

Building and initialising, the way the trainer does it::

    with torch.device("meta"):
        model = Transformer(args)      # no memory allocated
    # ... parallelize (TP, activation checkpointing, compile, FSDP) ...
    model.to_empty(device="cuda")
    model.init_weights(seed=0)         # the same values under every parallel layout

The model knows nothing of parallelism. A pipeline splitter may delete blocks from
``layers`` (a ``ModuleDict`` keyed by the block index, so the remaining names stay stable)
and set ``tok_embeddings``, ``norm`` or ``output`` to ``None``; ``forward`` then takes hidden
states in and/or gives hidden states out.
"""

from __future__ import annotations

import math
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchtrain.loss import linear_cross_entropy_sum
from torchtrain.models.attention import BACKENDS, attention
from torchtrain.models.kv_cache import KVCache, LayerKVCache

__all__ = ["RopeScaling", "ModelArgs", "Transformer", "TransformerBlock", "Attention", "FeedForward",
           "RMSNorm", "rope_tables", "apply_rope"]


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1-style RoPE frequency scaling ("llama3" rope_type in Hugging Face).

    Low frequencies (wavelength longer than ``original_max_seq_len / low_freq_factor``) are
    divided by ``factor``, high frequencies (wavelength shorter than
    ``original_max_seq_len / high_freq_factor``) are kept, and the band in between is
    interpolated smoothly.
    """

    factor: float = 8.0  # divisor applied to the low frequencies
    low_freq_factor: float = 1.0  # wavelengths above original_max_seq_len / this are scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max_seq_len / this are kept
    original_max_seq_len: int = 8192  # context length the model was pretrained with

    def validate(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.original_max_seq_len <= 0:
            raise ValueError(f"rope_scaling.original_max_seq_len must be > 0, got {self.original_max_seq_len}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}")


@dataclass
class ModelArgs:
    """Shape of a Llama-family Transformer. Named sizes live in ``registry.MODELS``."""

    dim: int = 256  # model (residual stream) width
    num_layers: int = 4  # number of Transformer blocks
    num_heads: int = 8  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); == num_heads for MHA
    vocab_size: int = 8192  # rows of the embedding table and columns of the output projection
    ffn_dim: int = 704  # hidden width of the SwiGLU feed-forward (w1/w3 out, w2 in)
    norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base: frequency i is rope_theta ** (-2i / head_dim)
    rope_scaling: Optional[RopeScaling] = None  # Llama-3.1-style frequency scaling, or None
    max_seq_len: int = 2048  # longest sequence (and largest position id + 1) the RoPE table covers
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen, InternLM)
    out_bias: bool = False  # bias on the attention output projection wo (InternLM)
    tie_embeddings: bool = False  # output projection shares the embedding weight
    attention: str = "sdpa"  # attention backend, a key of models.attention.BACKENDS
    sliding_window: int = 0  # keys each token attends to, itself included (Mistral); 0: every earlier key
    # Width of each attention head when it is not dim // num_heads (Qwen3-32B: 128, not 5120 / 64 = 80);
    # 0: dim // num_heads. Read the resolved width as ``head_dim``.
    explicit_head_dim: int = 0
    qk_norm: bool = False  # RMSNorm over each head of q and of k, before RoPE (Qwen3's q_norm / k_norm)

    @property
    def head_dim(self) -> int:
        """The width of each attention head: ``explicit_head_dim``, else ``dim // num_heads``."""
        return self.explicit_head_dim or self.dim // self.num_heads

    @property
    def q_dim(self) -> int:
        """The width of all query heads together (the attention's inner width; ``dim`` unless the head width is set)."""
        return self.num_heads * self.head_dim

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if the shape is inconsistent."""
        for name in ("dim", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.explicit_head_dim, int) or self.explicit_head_dim < 0:
            raise ValueError(f"ModelArgs.explicit_head_dim must be an integer >= 0 (0: dim // num_heads), got "
                             f"{self.explicit_head_dim!r}")
        if not self.explicit_head_dim and self.dim % self.num_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by num_heads ({self.num_heads}), "
                             "or explicit_head_dim set")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelArgs.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelArgs.head_dim (explicit_head_dim, else dim // num_heads) must be even for RoPE, "
                             f"got {self.head_dim}")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
            raise ValueError(f"ModelArgs.sliding_window must be an integer >= 0 (0: no window), got "
                             f"{self.sliding_window!r}")
        if self.attention not in BACKENDS:
            raise ValueError(
                f"ModelArgs.attention={self.attention!r} is not a known backend; valid choices: {sorted(BACKENDS)}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count, computed from the shape (no model needed).

        ``exclude_embedding=False``: every distinct parameter (a tied output projection is
        the embedding table, counted once). ``exclude_embedding=True``: everything except the
        input embedding table; the output projection is counted, even when tied, because
        it does matmul work in every step (this is the N in the FLOP formula).
        """
        d, hd = self.dim, self.head_dim
        q_dim, kv_dim = self.num_heads * hd, self.num_kv_heads * hd
        attn = d * q_dim + 2 * d * kv_dim + q_dim * d
        if self.qkv_bias:
            attn += q_dim + 2 * kv_dim
        if self.out_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd  # q_norm and k_norm gains, shared by all heads
        ffn = 3 * d * self.ffn_dim
        block = attn + ffn + 2 * d  # + attention_norm and ffn_norm weights
        body = self.num_layers * block + d  # + final norm
        table = self.vocab_size * d
        if exclude_embedding:
            return body + table  # the output projection
        return table + body + (0 if self.tie_embeddings else table)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

        The project's one convention: ``6 * N + 12 * L * d * s`` where ``N`` is
        ``num_params(exclude_embedding=True)`` (all parameters but the input embedding
        table, which is a lookup, not a matmul; the output projection is included, tied or
        not), ``L`` the number of layers, ``d`` the attention's width (``num_heads * head_dim``:
        the model width, except where the head width is set otherwise, as in Qwen3-32B) and ``s``
        the sequence length. ``6 * N``: 2 FLOPs per multiply-add, forward once and backward twice.
        ``12 * L * d * s``: the two attention matmuls (``QK^T`` and ``PV``), 2 * 2 * d * s
        per layer forward, times 3 for forward + backward, counted over the full ``s x s``
        score matrix, i.e. WITHOUT halving for the causal mask (as in the PaLM paper's MFU). With a
        sliding window ``w`` a query's row holds ``min(s, w)`` keys, and ``s`` becomes that
        (the window's triangle is not halved either: a row of ``w`` keys, as a causal row of ``s``).
        """
        keys = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        return 6 * self.num_params(exclude_embedding=True) + 12 * self.num_layers * self.q_dim * keys


# ---------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------

def _rope_inv_freq(args: ModelArgs, device: Optional[torch.device]) -> Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in fp32, with Llama-3.1 scaling if configured."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3.1: wavelengths shorter than original/high_freq_factor are kept, longer than
    # original/low_freq_factor are divided by `factor`, and in between the two are blended
    # with weight `smooth` growing linearly in original/wavelength.
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_tables(args: ModelArgs, device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` tables ``[max_seq_len, head_dim]`` in fp32.

    Each row holds the angles of one position, repeated for the two halves of a head
    (Hugging Face's layout), so applying RoPE is two elementwise products and a sum.
    """
    inv_freq = _rope_inv_freq(args, device)
    positions = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, S, D]`` by the angles in ``cos``/``sin`` (``[S, D]`` or ``[B, 1, S, D]``).

    Rotate-half convention: the pair ``(x[i], x[i + D/2])`` is rotated by angle ``i``.
    The tables are cast to ``x``'s dtype (a no-op in fp32): under bf16 autocast or FSDP
    mixed precision, fp32 tables would otherwise promote q and k to fp32.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain.

    ``F.rms_norm`` normalises low-precision inputs in fp32 internally and is one fused
    kernel on CPU and CUDA; activations stay in their dtype outside it.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: the gain in the input's dtype: under autocast the parameter is fp32 and the input bf16,
        # a mix the fused kernel refuses (torch falls back to op-by-op autograd, which saves fp32 copies).
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE: ``num_heads`` query heads share ``num_kv_heads`` K/V heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.backend = args.attention
        self.window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.num_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.num_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.num_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.num_heads * self.head_dim, args.dim, bias=args.out_bias)
        # Qwen3: each head's q and k RMS-normalised over head_dim (one gain vector shared by the heads)
        # before RoPE. Per head, so they need no change when tensor parallelism shards the heads.
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        # NOTE: parallel code may replace this (same signature): context parallelism attends the local
        # queries to the keys and values of the whole sequence (parallel/cp.py).
        self.attention_fn = attention

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                document_ids: Optional[Tensor] = None, kv_cache: Optional[LayerKVCache] = None) -> Tensor:
        bsz, seq_len, dim = x.shape
        # NOTE: the projections read the tokens as one [B * S, dim] matrix: the same GEMMs, in the
        # form torch.compile's projection fusion matches (see parallel/compile.py). The head count
        # is inferred (-1) so tensor parallelism, which shards the projections by heads, works
        # without telling the model how many heads it holds.
        tokens = x.reshape(bsz * seq_len, dim)
        q = self.wq(tokens).view(bsz, seq_len, -1, self.head_dim)  # [B, S, Hq, D]
        k = self.wk(tokens).view(bsz, seq_len, -1, self.head_dim)  # [B, S, Hkv, D]
        v = self.wv(tokens).view(bsz, seq_len, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        if self.q_norm is not None:
            # NOTE: applied in the [B, S, H, D] layout (heads on dim 2): tensor parallelism marks that dim
            # as the sharded one for these norms (parallel/tp.py).
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, D]
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)
        if kv_cache is not None:
            # Decoding: these tokens attend to every key cached so far and to each other causally (with
            # fewer queries than keys, the causal mask is aligned to the last query: see models/attention.py).
            k, v = kv_cache.update(k, v)
        out = self.attention_fn(q, k, v, backend=self.backend, causal=True, document_ids=document_ids,
                                window=self.window)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq_len, -1))

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator]) -> None:
        for linear in (self.wq, self.wk, self.wv):
            _init_linear(linear, std, generator)
        _init_linear(self.wo, out_std, generator)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``; ``w1`` is the gate, ``w3`` the up projection, ``w2`` the down one."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: gate and up read the tokens as one [B * S, dim] matrix, like the attention's
        # projections; w2 gets the [B, S, hidden] shape back (tensor parallelism shards its
        # output along the sequence, dim 1).
        tokens = x.reshape(-1, x.shape[-1])
        hidden = F.silu(self.w1(tokens)) * self.w3(tokens)
        return self.w2(hidden.view(*x.shape[:-1], -1))

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator]) -> None:
        _init_linear(self.w1, std, generator)
        _init_linear(self.w3, std, generator)
        _init_linear(self.w2, out_std, generator)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(norm(x))``; ``out = h + feed_forward(norm(h))``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                document_ids: Optional[Tensor] = None, kv_cache: Optional[LayerKVCache] = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope_cos, rope_sin, document_ids, kv_cache=kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, std: float, out_std: float, generator: Optional[torch.Generator]) -> None:
        self.attention_norm.reset_parameters()
        self.attention.init_weights(std, out_std, generator)
        self.ffn_norm.reset_parameters()
        self.feed_forward.init_weights(std, out_std, generator)


def _init_linear(linear: nn.Linear, std: float, generator: Optional[torch.Generator]) -> None:
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

class Transformer(nn.Module):
    """Token ids in, next-token logits out.

    ``forward(tokens, positions=None, document_ids=None)``:

    * ``tokens``: ``[B, S]`` int64 ids, or ``[B, S, dim]`` hidden states when
      ``tok_embeddings`` is ``None`` (a later pipeline stage).
    * ``positions``: optional RoPE position ids, ``[S]`` or ``[B, S]`` int64 (packed documents
      restart at 0; context parallelism passes each shard's global positions). Default
      ``0 .. S-1``.
    * ``document_ids``: optional ``[B, S]`` int ids; a token only attends to earlier tokens
      of the same document.
    * ``kv_cache``: optional :class:`~torchtrain.models.kv_cache.KVCache` for incremental
      decoding (generation, not training): the tokens' keys and values are appended to it and
      they attend to everything cached before them; ``positions`` default to the cache's fill
      position onward.

    * ``labels``: optional ``[B, S]`` int64 next-token targets (``-100`` = ignored). When
      given, the model returns the summed token cross-entropy (an fp32 scalar, equal to
      ``loss.cross_entropy_sum(model(tokens), labels)``) computed chunk by chunk by
      :func:`~torchtrain.loss.linear_cross_entropy_sum`, so the ``[B, S, vocab_size]`` logits
      and their gradient are never held at once: training should call it this way. A model
      without an output projection (an earlier pipeline stage) ignores them.

    Returns logits ``[B, S, vocab_size]`` in the parameter dtype (the loss upcasts), the loss
    when ``labels`` are given, or the hidden states when ``output`` is ``None``.

    Call :meth:`init_weights` after construction (after ``to_empty`` when built on the
    meta device); the constructor only allocates.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.num_layers)})
        self.norm: Optional[RMSNorm] = RMSNorm(args.dim, args.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables: derived from args, so non-persistent (never in a checkpoint). Real
        # cos/sin tensors rather than complex numbers: torch.compile and DTensor handle them.
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: Tensor, positions: Optional[Tensor] = None,
                document_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                kv_cache: Optional[KVCache] = None) -> Tensor:
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)
        if torch.is_autocast_enabled(h.device.type):
            # NOTE: mixed precision without FSDP is autocast, which leaves the embedding in fp32. Carrying
            # the residual stream in the compute dtype, as FSDP's cast parameters do, keeps one bf16 copy
            # of each norm's output for all the matmuls that read it (autocast would cast it once per
            # matmul and save every copy) and halves tensor parallel's all-gathers and pipeline sends.
            h = h.to(torch.get_autocast_dtype(h.device.type))
        if kv_cache is not None:
            if document_ids is not None:
                raise ValueError("document_ids cannot be combined with a kv_cache (decoding is one document)")
            if positions is None:
                positions = kv_cache.positions(h.shape[1], h.device)
        rope_cos, rope_sin = self._rope(h.shape[1], positions)
        for name, layer in self.layers.items():
            # NOTE: the cache goes by keyword, so the positional inputs that parallel hooks see (tensor
            # parallel's PrepareModuleInput counts them) are the training call's.
            h = layer(h, rope_cos, rope_sin, document_ids,
                      kv_cache=None if kv_cache is None else kv_cache.layers[name])
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            # An earlier pipeline stage: it hands its hidden states on; the last stage uses the labels.
            return h
        if labels is None:
            return self.output(h)
        # NOTE: the loss goes through the projection's weight directly (it has no bias), inside this
        # forward, so wrappers that manage parameters around the model's forward (FSDP) see it used here.
        return linear_cross_entropy_sum(h, self.output.weight, labels)

    def _rope(self, seq_len: int, positions: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The fp32 cos/sin rows for this batch, broadcastable against ``[B, H, S, head_dim]``."""
        if positions is None:
            if seq_len > self.rope_cos.shape[0]:
                raise ValueError(f"sequence length {seq_len} exceeds ModelArgs.max_seq_len={self.rope_cos.shape[0]}")
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if positions.dim() == 2:  # [B, S, D] -> [B, 1, S, D], broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    @torch.no_grad()
    def init_weights(self, seed: int = 0, buffer_device: Optional[torch.device] = None,
                     unit_scope: Callable[[nn.Module], ContextManager] = lambda unit: nullcontext()) -> None:
        """(Re)initialise every parameter and buffer, deterministically from ``seed``.

        Each unit (the embedding, every block, the final norm, the output projection) draws from
        its own generator, seeded by ``seed`` and the unit's name, so its values do not depend on
        which other units a module holds (a pipeline stage) or on the order they are visited.
        ``unit_scope(unit)`` is entered around each unit's initialisation: parallel code uses it
        to present a sharded unit's parameters as full tensors (see
        ``torchtrain.parallel.init.full_parameters``), so every layout gets the values one process
        would, while only one unit is ever held whole.

        * embeddings: normal, std 0.02;
        * linears: truncated normal (at 3 std), std 0.02, except the projections that write
          into the residual stream (``wo`` and ``w2``), whose std is divided by
          ``sqrt(2 * num_layers)``: each block adds two such outputs to the residual, so this
          keeps its variance roughly independent of depth (GPT-2's scheme);
        * biases: zeros; RMSNorm gains (q_norm and k_norm included): ones;
        * RoPE tables: recomputed on ``buffer_device`` (default: where they are now).

        Works on a model built normally and on one materialised from the meta device with
        ``to_empty``. Parts set to ``None`` (pipeline stages) are skipped.
        """
        device = self.rope_cos.device if buffer_device is None else torch.device(buffer_device)
        self.rope_cos, self.rope_sin = rope_tables(self.args, device)

        # NOTE: ``Module.to_empty`` gives each module a fresh tensor, which unties a shared
        # weight (unless torch.__future__.set_swap_module_params_on_conversion(True)); tie again.
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            if self.output.weight is not self.tok_embeddings.weight:
                self.output.weight = self.tok_embeddings.weight

        std = 0.02
        out_std = std / math.sqrt(2 * self.args.num_layers)

        def generator(unit: str, module: nn.Module) -> Optional[torch.Generator]:
            device = next(module.parameters()).device
            if device.type == "meta":  # nothing to draw (a shape-only model); buffers are still set
                return None
            return torch.Generator(device).manual_seed(zlib.crc32(f"{seed}/{unit}".encode()))

        if self.tok_embeddings is not None:
            with unit_scope(self.tok_embeddings):
                nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std,
                                generator=generator("tok_embeddings", self.tok_embeddings))
        for name, layer in self.layers.items():
            with unit_scope(layer):
                layer.init_weights(std, out_std, generator(f"layers.{name}", layer))
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not (self.args.tie_embeddings and self.tok_embeddings is not None):
            # Tied and on the same module: the embedding's values are the output's. Tied but on
            # another pipeline stage: drawn like the embedding, from the embedding's seed.
            with unit_scope(self.output):
                if self.args.tie_embeddings:
                    nn.init.normal_(self.output.weight, mean=0.0, std=std,
                                    generator=generator("tok_embeddings", self.output))
                else:
                    _init_linear(self.output, std, generator("output", self.output))
