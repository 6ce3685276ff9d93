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

from torchtrain.data.corpus import DEFAULT_CORPUS, Corpus, open_corpus
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
    """Yields :class:`Batch` es for one data-parallel rank from one split, or from a weighted blend of
    several; resumable at any step.

    Args:
        streams: the split (see :func:`build_datasets`), or the splits of a blend's sources.
        seq_len: tokens per sample.
        local_batch_size: samples per batch on this rank.
        dp_rank, dp_size: this rank's place in the data-parallel group; every rank must use the
            same streams, weights, seed and sizes.
        seed: epoch ``e`` of source ``k`` visits its samples in the order ``torch.randperm`` gives with
            seed ``seed + e + 1_000_003 * k``.
        shuffle: ``False`` visits samples in stream order (validation; one source only).
        infinite: ``True`` starts the next epoch when one ends (training); ``False`` ends the
            iteration at the end of the epoch (one pass, e.g. validation; one source only).
        weights: a blend's weights, one per stream (relative; any positive numbers).

    The global sample sequence is the same for any ``dp_size``: global sample ``g`` is drawn from the
    source whose share so far lags its weight the most (``weight * (g + 1) - drawn``, ties to the first),
    so after ``g`` samples every source has had its share to within one sample, and which samples come
    from where depends only on the weights. A source's ``j``-th draw is sample ``j mod n`` of its epoch
    ``j // n``, a fresh permutation each epoch, where ``n`` is its sample count less the remainder of
    a division by the global batch size (when it holds at least one global batch): a single source's
    epochs end on step boundaries, the few samples left over from each permutation are skipped.
    Iterating advances the loader's own state, so use one iterator at a time; :meth:`state_dict` /
    :meth:`load_state_dict` save and restore it exactly, also under another ``dp_size`` with the same
    global batch size.
    """

    def __init__(self, streams: TokenStream | Sequence[TokenStream], seq_len: int, local_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True, infinite: bool = True,
                 weights: Sequence[float] | None = None):
        self.streams = [streams] if isinstance(streams, TokenStream) else list(streams)
        weights = [1.0] * len(self.streams) if weights is None else [float(w) for w in weights]
        if seq_len < 1 or local_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and local_batch_size ({local_batch_size}) must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if len(weights) != len(self.streams) or not self.streams or min(weights) <= 0:
            raise ValueError(f"one positive weight per stream, got {weights} for {len(self.streams)} streams")
        if len(self.streams) > 1 and not (shuffle and infinite):
            raise ValueError("a blend of several streams is shuffled and endless; validate each stream on its own")
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.shuffle, self.infinite = shuffle, infinite
        self.shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.num_samples = [stream.num_samples(seq_len) for stream in self.streams]
        for stream, num in zip(self.streams, self.num_samples):
            if num < (self.global_batch_size if len(self.streams) == 1 else 1):
                raise ValueError(
                    f"the {stream.name!r} split is too short{' for one global batch' * (len(self.streams) == 1)}: "
                    f"{stream.num_tokens:,} tokens make {num:,} samples of seq_len {seq_len} (each needs seq_len + 1 "
                    f"tokens for the shifted labels), but one step needs {self.global_batch_size} (local_batch_size "
                    f"{local_batch_size} x {dp_size} data-parallel ranks). Use more data (or a larger "
                    f"data.val_fraction for validation), a shorter training.seq_len, or a smaller "
                    f"training.local_batch_size.")
        g = self.global_batch_size
        self.epoch_samples = [num - num % g if num >= g else num for num in self.num_samples]
        self.samples = 0  # global samples drawn so far, over all ranks
        self.drawn = np.zeros(len(self.streams), dtype=np.int64)  # of them, from each source
        self._order_cache: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def global_batch_size(self) -> int:
        return self.local_batch_size * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one pass over a single source."""
        return self.epoch_samples[0] // self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch of the first source (of the only one, unless blended)."""
        return int(self.drawn[0]) // self.epoch_samples[0]

    def _order(self, source: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples[source], dtype=np.int64)
        cached = self._order_cache.get(source)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003 * source)
            cached = self._order_cache[source] = (epoch, torch.randperm(self.num_samples[source],
                                                                       generator=generator).numpy())
        return cached[1]

    def _sources(self, count: int) -> np.ndarray:
        """The source of each of the next ``count`` global samples (advancing ``drawn`` and ``samples``)."""
        if len(self.streams) == 1:
            self.drawn[0] += count
            self.samples += count
            return np.zeros(count, dtype=np.int64)
        sources = np.empty(count, dtype=np.int64)
        for i in range(count):
            self.samples += 1
            k = int(np.argmax(self.shares * self.samples - self.drawn))
            self.drawn[k] += 1
            sources[i] = k
        return sources

    def __iter__(self) -> Iterator[Batch]:
        while True:
            drawn_before = self.drawn.copy()
            sources = self._sources(self.global_batch_size)
            mine = slice(self.dp_rank * self.local_batch_size, (self.dp_rank + 1) * self.local_batch_size)
            # The j-th draw of each source within this global batch: its count before plus its rank in the batch.
            draws = drawn_before[sources] + _rank_within_group(sources)
            parts, rows = [], []
            for k in np.unique(sources[mine]):
                picked = np.flatnonzero(sources[mine] == k)
                j = draws[mine][picked]
                epochs, positions = j // self.epoch_samples[k], j % self.epoch_samples[k]
                indices = [int(self._order(int(k), int(e))[p]) for e, p in zip(epochs, positions)]
                parts.append(pack_samples(self.streams[k], indices, self.seq_len))
                rows.append(picked)
            if len(parts) == 1:
                yield parts[0]
            else:  # back into the order of the global sequence
                order = torch.from_numpy(np.argsort(np.concatenate(rows)))
                yield Batch(*(torch.cat(ts)[order] for ts in zip(*(p._tensors() for p in parts))))
            if not self.infinite and self.drawn[0] % self.epoch_samples[0] == 0:
                return

    def tokens_drawn(self) -> list[int]:
        """Tokens drawn from each source so far, over all ranks (samples x seq_len)."""
        return [int(d) * self.seq_len for d in self.drawn]

    def state_dict(self) -> dict[str, int]:
        if len(self.streams) == 1:  # (the layout of every single-source checkpoint)
            return {"epoch": self.epoch, "samples_consumed": int(self.drawn[0]) % self.epoch_samples[0],
                    "num_samples": self.num_samples[0]}
        state = {"samples": self.samples}
        for k, (drawn, num) in enumerate(zip(self.drawn, self.num_samples)):
            state.update({f"drawn_{k}": int(drawn), f"num_samples_{k}": num})
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = [int(state["num_samples"])] if "num_samples" in state else [
            int(state[f"num_samples_{k}"]) for k in range(len(self.streams)) if f"num_samples_{k}" in state]
        if saved != self.num_samples:
            names = ", ".join(repr(s.name) for s in self.streams)
            raise ValueError(
                f"the data loader state was saved over {saved} samples but {names} now have {self.num_samples} "
                f"(seq_len {self.seq_len}): the dataset, blend, tokenizer, val_fraction or seq_len changed, so "
                f"the saved position does not apply")
        if len(self.streams) == 1:
            consumed = int(state["samples_consumed"])
            if not 0 <= consumed <= self.epoch_samples[0]:
                raise ValueError(f"samples_consumed {consumed} is outside [0, {self.epoch_samples[0]}]")
            self.drawn[0] = self.samples = int(state["epoch"]) * self.epoch_samples[0] + consumed
        else:
            self.samples = int(state["samples"])
            self.drawn[:] = [int(state[f"drawn_{k}"]) for k in range(len(self.streams))]


def _rank_within_group(values: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements have the same value: [1, 0, 1, 1] -> [0, 0, 1, 2]."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    group_start = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    counts = np.diff(np.r_[group_start, len(values)])
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(len(values)) - np.repeat(group_start, counts)
    return ranks


def build_datasets(dataset: str | Sequence[str] = DEFAULT_CORPUS, text_field: str = "text",
                   tokenizer_spec: str = DEFAULT_TOKENIZER, vocab_size: int = 8192, cache_dir: str | os.PathLike = "",
                   val_fraction: float = 0.02, *, validation: Sequence[str] = (), tokenizer_corpus: str | None = None,
                   ) -> tuple[Tokenizer, list[TokenStream], list[TokenStream]]:
    """``[data]`` config values → ``(tokenizer, train streams, validation streams)``, building caches as needed.

    ``dataset`` is one source or a blend's sources (files, folders or globs tokenised into the cache, or
    folders prepared by ``torchtrain.data.prepare``); there is one train stream per source, and one
    validation stream per source: its held-out split, or, when ``validation`` names held-out sources,
    one per such source (all of a file source; a prepared folder's validation split).

    The ``"default"`` tokenizer is the first prepared folder's own copy, or else the byte-level BPE
    trained on ``tokenizer_corpus`` (default: the default stdlib corpus, so the default tokenizer is
    the same whichever dataset a run uses). Every rank may call this at once: file locks make one
    process build each cache entry while the others wait for it.
    """
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    corpora: dict[str, Corpus] = {}  # each opened (listed and fingerprinted) once

    def corpus(source: str) -> Corpus:
        if source not in corpora:
            corpora[source] = open_corpus(source, text_field)
        return corpora[source]

    tokenizer = _resolve_tokenizer([*datasets, *validation], tokenizer_spec, vocab_size, cache_dir,
                                   corpus(tokenizer_corpus or DEFAULT_CORPUS) if tokenizer_spec == DEFAULT_TOKENIZER
                                   and not any(map(is_prepared, [*datasets, *validation])) else None)

    def split(source: str, fraction: float, name: str) -> TokenStream:
        if is_prepared(source):  # tokenised ahead: nothing to read or build here
            return open_prepared(source, tokenizer)[name]
        return build_shards(corpus(source), tokenizer, cache_dir, fraction)[name]

    train = [split(source, val_fraction, "train") for source in datasets]
    val = ([split(source, 1.0, "val") for source in validation] if validation
           else [split(source, val_fraction, "val") for source in datasets])
    for source, stream in zip(datasets, train):
        logger.info("data: %r: train %s tokens in %s documents", source, f"{stream.num_tokens:,}",
                    f"{stream.num_documents:,}")
    for source, stream in zip(validation or datasets, val):
        logger.info("data: %r: validation %s tokens in %s documents", source, f"{stream.num_tokens:,}",
                    f"{stream.num_documents:,}")
    logger.info("data: %s", tokenizer)
    return tokenizer, train, val


def _resolve_tokenizer(sources: list[str], spec: str, vocab_size: int, cache_dir: str | os.PathLike,
                       bpe_corpus: Corpus | None) -> Tokenizer:
    """``spec``, or for ``"default"`` the first prepared source's tokenizer, else the BPE trained on ``bpe_corpus``."""
    if spec != DEFAULT_TOKENIZER:
        return load_tokenizer(spec)
    prepared = [source for source in sources if is_prepared(source)]
    if prepared:  # the tokenizer the tokens were made with
        return load_tokenizer(Path(prepared[0]) / TOKENIZER_FILE)
    return load_tokenizer(DEFAULT_TOKENIZER, vocab_size=vocab_size, cache_dir=cache_dir, corpus=bpe_corpus)
