"""A key/value cache for incremental decoding: each new token attends to the keys already computed.

``KVCache.for_model(model, batch_size, max_len)`` preallocates, for every block of ``model``, a
key and a value buffer ``[B, Hkv, max_len, head_dim]`` and keeps how many positions are filled.
It is threaded through ``Transformer.forward(tokens, kv_cache=cache)`` down to
``Attention.forward``, which writes the new tokens' (rotated) keys and values at the fill position
and attends to everything cached so far; the Transformer gives the new tokens the RoPE positions
``length .. length + n - 1``. Without a cache (training), none of this runs.

Any number of tokens may be appended per call (a whole prompt, a prompt in chunks, one token at a
time): with fewer queries than keys, ``attention`` aligns the causal mask to the last key, so query
``i`` of ``n`` new tokens sees the cached keys and the new ones up to ``length + i``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["KVCache", "LayerKVCache"]


class LayerKVCache:
    """The keys and values of one block: buffers ``[B, Hkv, max_len, D]`` and how many positions are filled."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v
        self.length = 0

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k``/``v`` ``[B, Hkv, n, D]``; return every cached key and value, ``[B, Hkv, length, D]``."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache is full: {start} positions cached + {k.shape[2]} new > max_len "
                             f"{self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One :class:`LayerKVCache` per block, keyed like ``Transformer.layers``; ``length`` is the fill position."""

    def __init__(self, layer_names: list[str], batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.layers = {name: LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                                          torch.zeros(shape, dtype=dtype, device=device)) for name in layer_names}

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: Optional[int] = None) -> "KVCache":
        """A cache for ``model`` (a ``Transformer``), in the dtype and on the device of its parameters.

        ``max_len`` defaults to ``model.args.max_seq_len`` and may not exceed it (RoPE covers no more).
        """
        args = model.args
        max_len = args.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= args.max_seq_len:
            raise ValueError(f"KV cache max_len must be in 1..{args.max_seq_len} (ModelArgs.max_seq_len), "
                             f"got {max_len}")
        param = next(model.parameters())
        return cls(list(model.layers.keys()), batch_size, args.num_kv_heads, max_len, args.head_dim,
                   param.dtype, param.device)

    @property
    def length(self) -> int:
        """Positions filled so far (the RoPE position of the next token)."""
        return next(iter(self.layers.values())).length if self.layers else 0

    def positions(self, num_tokens: int, device: torch.device | str) -> Tensor:
        """RoPE positions ``length .. length + num_tokens - 1`` of the next ``num_tokens`` tokens."""
        start = self.length
        if start + num_tokens > self.max_len:
            raise ValueError(f"KV cache is full: {start} positions cached + {num_tokens} new > max_len {self.max_len}")
        return torch.arange(start, start + num_tokens, device=device)

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        for layer in self.layers.values():
            layer.length = 0
