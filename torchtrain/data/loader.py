"""Packing and the stateful, data-parallel-aware loader.

A split is one token stream with documents laid end to end (each ending with EOS). Sample ``i`` of
sequence length ``S`` is the window ``stream[i*S : i*S + S + 1]``: inputs ``w[:-1]``, labels
``w[1:]``. Windows do not overlap and ignore document boundaries (packing), so nothing is padded;
what keeps packed documents apart is carried alongside the tokens:

- ``labels`` is ``-100`` (ignored by the loss) where the next token starts another document, i.e.
  at every EOS: predicting the *next* document's first token from this one is not learnable;
- ``document_ids`` numbers the documents inside each sample from 0 (0,0,0,1,1,2,...), for a
  block-diagonal attention mask;
- ``positions`` restart at 0 at the start of the window and at each document start, for RoPE.
  A token only ever sees the part of its document inside its window, and RoPE depends only on
  relative positions, so the window-local numbering loses nothing and stays below ``seq_len``
  (within the model's RoPE table, however long the document).

:class:`TokenLoader` walks a per-epoch permutation of the samples. Each step consumes one *global*
batch of ``local_batch_size * dp_size`` samples; data-parallel rank ``r`` takes the contiguous block
``[r * local_batch_size, (r + 1) * local_batch_size)`` of it. Its state counts samples globally, so
a run resumed with a different ``dp_size`` but the same global batch size sees exactly the samples
the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from torchtrain.data.corpus import DEFAULT_CORPUS, open_corpus
from torchtrain.data.prepared import TOKENIZER_FILE, is_prepared, open_prepared
from torchtrain.data.shards import TokenStream, build_shards
from torchtrain.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer, load_tokenizer
from torchtrain.loss import IGNORE_INDEX  # noqa: F401 - also re-exported for the data tests

logger = logging.getLogger(__name__)



@dataclass
class Batch:
    """One microbatch on one data-parallel rank; every tensor is ``[batch, seq_len]``."""

    tokens: torch.Tensor  # int64 input ids
    labels: torch.Tensor  # int64 next-token targets, IGNORE_INDEX (-100) where they cross a document boundary
    document_ids: torch.Tensor  # int32 document number within the sample: 0, 0, 1, 1, 1, 2, ...
    positions: torch.Tensor  # int64 RoPE position: from 0 at the window start and at each document start

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that a following ``.to("cuda", non_blocking=True)`` is asynchronous."""
        return Batch(*(t.pin_memory() for t in self._tensors()))

    def num_valid_tokens(self) -> int:
        """Tokens that count in the loss (labels != -100)."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.labels, self.document_ids, self.positions


def pack_samples(stream: TokenStream, sample_indices: Sequence[int], seq_len: int) -> Batch:
    """Cut samples ``sample_indices`` (windows of ``seq_len + 1`` tokens) out of ``stream`` into a Batch.

    Each window is read from the (memory-mapped) stream with one slice and converted to int64 as it
    is copied into the output; the document arithmetic is a binary search of the window positions in
    the document offsets.
    """
    indices = np.asarray(sample_indices, dtype=np.int64)
    starts = indices * seq_len
    if indices.size and (indices.min() < 0 or starts.max() + seq_len + 1 > stream.num_tokens):
        raise IndexError(f"{stream.name}: samples {indices.tolist()} are outside the "
                         f"{stream.num_samples(seq_len)} samples of length {seq_len}")
    window = np.empty((len(indices), seq_len + 1), dtype=np.int64)
    for row, start in enumerate(starts):
        window[row] = stream.tokens[start:start + seq_len + 1]
    where = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)  # stream position of each token
    doc = np.searchsorted(stream.doc_offsets, where, side="right") - 1  # stream document of each token
    doc_in, doc_next = doc[:, :-1], doc[:, 1:]
    labels = window[:, 1:].copy()
    labels[doc_next != doc_in] = IGNORE_INDEX
    segment_start = np.maximum(stream.doc_offsets[doc_in], starts[:, None])
    positions = where[:, :-1] - segment_start
    document_ids = (doc_in - doc_in[:, :1]).astype(np.int32)
    return Batch(
        tokens=torch.from_numpy(np.ascontiguousarray(window[:, :-1])),
        labels=torch.from_numpy(labels),
        document_ids=torch.from_numpy(document_ids),
        positions=torch.from_numpy(np.ascontiguousarray(positions)),
    )


class TokenLoader:
    """Yields :class:`Batch` es of one split for one data-parallel rank; resumable at any step.

    Args:
        stream: the split (see :func:`build_datasets`).
        seq_len: tokens per sample.
        local_batch_size: samples per batch on this rank.
        dp_rank, dp_size: this rank's place in the data-parallel group; every rank must use the
            same stream, seed and sizes.
        seed: epoch ``e`` visits the samples in the order ``torch.randperm`` gives with seed ``seed + e``.
        shuffle: ``False`` visits samples in stream order (validation).
        infinite: ``True`` starts the next epoch when one ends (training); ``False`` ends the
            iteration at the end of the epoch (one pass, e.g. validation: stop earlier by breaking).

    An epoch ends when fewer samples than one global batch remain; those few are skipped (every rank
    must take the same number of steps). Iterating advances the loader's own state, so use one
    iterator at a time; :meth:`state_dict` / :meth:`load_state_dict` save and restore it exactly.
    """

    def __init__(self, stream: TokenStream, seq_len: int, local_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True, infinite: bool = True):
        if seq_len < 1 or local_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and local_batch_size ({local_batch_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.stream, self.seq_len, self.local_batch_size = stream, seq_len, local_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle, self.infinite = shuffle, infinite
        self.num_samples = stream.num_samples(seq_len)
        if self.num_samples < self.global_batch_size:
            raise ValueError(
                f"the {stream.name!r} split is too short for one global batch: {stream.num_tokens:,} tokens make "
                f"{self.num_samples:,} samples of seq_len {seq_len} (each needs seq_len + 1 tokens for the shifted "
                f"labels), but one step needs {self.global_batch_size} (local_batch_size {local_batch_size} x "
                f"{dp_size} data-parallel ranks). Use more data (or a larger data.val_fraction for validation), a "
                f"shorter training.seq_len, or a smaller training.local_batch_size.")
        self.epoch = 0
        self.samples_consumed = 0  # in the current epoch, over all ranks
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.local_batch_size * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        if self._order_cache is None or self._order_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order_cache = (epoch, torch.randperm(self.num_samples, generator=generator).numpy())
        return self._order_cache[1]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self.samples_consumed + self.global_batch_size > self.num_samples:
                self.epoch, self.samples_consumed = self.epoch + 1, 0
            first = self.samples_consumed + self.dp_rank * self.local_batch_size
            batch = pack_samples(self.stream, self._order(self.epoch)[first:first + self.local_batch_size],
                                 self.seq_len)
            self.samples_consumed += self.global_batch_size
            yield batch
            if not self.infinite and self.samples_consumed + self.global_batch_size > self.num_samples:
                self.epoch, self.samples_consumed = self.epoch + 1, 0
                return

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        num_samples = int(state.get("num_samples", self.num_samples))
        if num_samples != self.num_samples:
            raise ValueError(
                f"the data loader state was saved over {num_samples:,} samples but the {self.stream.name!r} split "
                f"now has {self.num_samples:,} (seq_len {self.seq_len}): the dataset, tokenizer, val_fraction "
                f"or seq_len changed, so the saved position does not apply")
        consumed = int(state["samples_consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"samples_consumed {consumed} is outside [0, {self.num_samples}]")
        self.epoch, self.samples_consumed = int(state["epoch"]), consumed


def build_datasets(dataset: str = DEFAULT_CORPUS, text_field: str = "text", tokenizer_spec: str = DEFAULT_TOKENIZER,
                   vocab_size: int = 8192, cache_dir: str | os.PathLike = "", val_fraction: float = 0.02, *,
                   tokenizer_corpus: str | None = None) -> tuple[Tokenizer, TokenStream, TokenStream]:
    """``[data]`` config values → ``(tokenizer, train stream, validation stream)``, building caches as needed.

    The ``"default"`` tokenizer is trained on ``tokenizer_corpus`` (default: the default stdlib corpus,
    so the default tokenizer is the same whichever dataset a run uses). Every rank may call this at
    once; file locks make one process build each cache entry while the others wait for it.
    """
    if is_prepared(dataset):  # tokenised ahead by torchtrain.data.prepare: nothing to read or build here
        tokenizer = load_tokenizer(Path(dataset) / TOKENIZER_FILE if tokenizer_spec == DEFAULT_TOKENIZER
                                   else tokenizer_spec)
        streams = open_prepared(dataset, tokenizer)
    else:
        corpus = open_corpus(dataset, text_field)
        if tokenizer_spec == DEFAULT_TOKENIZER:
            source = corpus if (tokenizer_corpus or DEFAULT_CORPUS) == dataset else open_corpus(
                tokenizer_corpus or DEFAULT_CORPUS, text_field)
            tokenizer = load_tokenizer(DEFAULT_TOKENIZER, vocab_size=vocab_size, cache_dir=cache_dir, corpus=source)
        else:
            tokenizer = load_tokenizer(tokenizer_spec)
        streams = build_shards(corpus, tokenizer, cache_dir, val_fraction)
    logger.info("data: %s; %r; train %s tokens in %s documents, val %s tokens in %s documents",
                tokenizer, dataset, f"{streams['train'].num_tokens:,}", f"{streams['train'].num_documents:,}",
                f"{streams['val'].num_tokens:,}", f"{streams['val'].num_documents:,}")
    return tokenizer, streams["train"], streams["val"]
