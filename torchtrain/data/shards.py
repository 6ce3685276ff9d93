"""Token shards: the corpus tokenised once into memory-mapped arrays on disk, split train / validation.

Every document becomes its tokens followed by EOS (preceded by BOS where the tokenizer's configuration
adds one: ``Tokenizer.document``). Documents are assigned to the validation split by
a stable hash of their corpus index (``val_fraction`` of them; at least one when ``val_fraction > 0``),
never by the run's seed, so the split is the same for every run over the same corpus. Each split is
stored as one token stream plus document offsets::

    <cache>/shards/<corpus fp>-<tokenizer hash>-val<fraction>-f<format>/
        meta.json                    # dtype, counts, timings: written last, marks the entry complete
        train.bin   val.bin          # raw uint16 (vocab <= 65536) or uint32 tokens
        train.offsets.npy ...        # int64 [num_docs + 1], offsets[j] = first token of document j
        train.doc_index.npy ...      # int64 [num_docs], each document's index in the corpus

An entry is built in a temporary sibling folder and renamed into place under a file lock, so ranks
that start together build it once and a killed build leaves nothing a later run would trust.
Empty (whitespace-only) documents are skipped: they would only add stray EOS tokens.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from torchtrain.data.corpus import Corpus, file_lock, resolve_cache_dir, stable_unit_hash
from torchtrain.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SHARD_FORMAT_VERSION = 1
SPLITS = ("train", "val")
_CHUNK_CHARS = 4_000_000  # text handed to one encode_batch call: big enough to keep every core busy
_COPY_TOKENS = 1 << 24  # tokens moved per step when splitting the combined stream


class TokenStream:
    """One split: a flat token array (usually a read-only memmap) and its document boundaries.

    ``doc_offsets`` has ``num_documents + 1`` entries, starting at 0 and ending at ``num_tokens``;
    document ``j`` is ``tokens[doc_offsets[j]:doc_offsets[j + 1]]`` and ends with EOS.
    ``doc_indices[j]`` is that document's index in the corpus.
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, doc_indices: np.ndarray | None = None,
                 name: str = "stream", path: Path | None = None):
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        if doc_offsets.ndim != 1 or doc_offsets.size == 0 or doc_offsets[0] != 0 or doc_offsets[-1] != len(tokens):
            raise ValueError(f"{name}: doc_offsets must run from 0 to the number of tokens ({len(tokens)})")
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.doc_indices = (np.arange(len(doc_offsets) - 1, dtype=np.int64) if doc_indices is None
                            else np.asarray(doc_indices, dtype=np.int64))
        self.name = name
        self.path = path

    @classmethod
    def from_documents(cls, documents: Sequence[Sequence[int]], eos_id: int, name: str = "stream",
                       dtype=np.int64) -> TokenStream:
        """An in-memory stream from already tokenised documents (EOS appended to each)."""
        lengths = np.array([len(d) + 1 for d in documents], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.empty(int(offsets[-1]), dtype=dtype)
        for j, doc in enumerate(documents):
            tokens[offsets[j]:offsets[j + 1] - 1] = doc
            tokens[offsets[j + 1] - 1] = eos_id
        return cls(tokens, offsets, name=name)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def num_samples(self, seq_len: int) -> int:
        """Non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted labels) that fit."""
        return max(self.num_tokens - 1, 0) // seq_len

    def document(self, j: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[j]:self.doc_offsets[j + 1]]

    def __repr__(self) -> str:
        return (f"TokenStream({self.name!r}, {self.num_tokens:,} tokens, {self.num_documents:,} documents, "
                f"path={str(self.path)!r})")


def validation_mask(doc_indices: np.ndarray, val_fraction: float) -> np.ndarray:
    """Which of these corpus documents are held out: ``stable_unit_hash(index) < val_fraction``.

    When ``val_fraction > 0`` at least one document is held out (the one with the smallest hash), and
    when there are at least two documents and ``val_fraction < 1`` at least one stays in train (the one
    with the largest hash). ``val_fraction = 1`` holds out everything (a validation-only source).
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    doc_indices = np.asarray(doc_indices, dtype=np.int64)
    if doc_indices.size == 0 or val_fraction == 0.0:
        return np.zeros(doc_indices.shape, dtype=bool)
    unit = stable_unit_hash(doc_indices)
    mask = unit < val_fraction
    if not mask.any():
        mask[np.argmin(unit)] = True
    if mask.all() and mask.size > 1 and val_fraction < 1.0:
        mask[np.argmax(unit)] = False
    return mask


def build_shards(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike = "",
                 val_fraction: float = 0.02) -> dict[str, TokenStream]:
    """Tokenise ``corpus`` into cached shards (or find them cached) and return ``{"train", "val"}`` streams.

    The cache key is the corpus fingerprint, the tokenizer's content hash and ``val_fraction``. Safe
    to call from every rank at once: one process builds under a file lock while the others wait.
    """
    validation_mask(np.zeros(0, dtype=np.int64), val_fraction)  # validates val_fraction up front
    root = resolve_cache_dir(cache_dir) / "shards"
    key = (f"{corpus.fingerprint[:20]}-{tokenizer.content_hash[:20]}-val{val_fraction:.6f}"
           f"-f{SHARD_FORMAT_VERSION}")
    folder = root / key
    if not (folder / "meta.json").is_file():
        with file_lock(root / f"{key}.lock"):
            if not (folder / "meta.json").is_file():
                _build(corpus, tokenizer, val_fraction, folder)
    return load_shards(folder)


def load_shards(folder: str | os.PathLike) -> dict[str, TokenStream]:
    """Open a shard folder written by :func:`build_shards`; tokens are memory-mapped read-only."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != SHARD_FORMAT_VERSION:
        raise ValueError(f"{folder}: shard format {meta.get('format')}, expected {SHARD_FORMAT_VERSION}")
    dtype = np.dtype(meta["dtype"])
    streams = {}
    for split in SPLITS:
        num_tokens = meta["splits"][split]["num_tokens"]
        if num_tokens:
            tokens = np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(num_tokens,))
        else:  # np.memmap refuses empty files
            tokens = np.zeros(0, dtype=dtype)
        offsets = np.load(folder / f"{split}.offsets.npy")
        indices = np.load(folder / f"{split}.doc_index.npy")
        streams[split] = TokenStream(tokens, offsets, indices, name=split, path=folder)
    return streams


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _chunks(documents: Iterable[str]) -> Iterator[list[tuple[int, str]]]:
    """Group ``(corpus index, text)`` of non-empty documents into batches of about ``_CHUNK_CHARS``."""
    chunk, size = [], 0
    for index, text in enumerate(documents):
        if not text or text.isspace():
            continue
        chunk.append((index, text))
        size += len(text)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _build(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, folder: Path) -> None:
    started = time.perf_counter()
    logger.info("tokenising corpus %r (%d files, %.1f MB) into %s", corpus.spec, len(corpus),
                corpus.total_bytes / 1e6, folder)
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by killed builds; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        indices, lengths = [], []
        with open(tmp / "all.bin", "wb") as out:
            for chunk in _chunks(corpus.documents()):
                for (index, _), ids in zip(chunk, tokenizer.encode_batch([text for _, text in chunk])):
                    document = tokenizer.document(ids)
                    out.write(np.asarray(document, dtype=dtype).tobytes())
                    indices.append(index)
                    lengths.append(len(document))
        tokenised = time.perf_counter() - started
        indices_np = np.asarray(indices, dtype=np.int64)
        lengths_np = np.asarray(lengths, dtype=np.int64)
        is_val = validation_mask(indices_np, val_fraction)
        meta = {"format": SHARD_FORMAT_VERSION, "dtype": dtype.name, "corpus": corpus.spec,
                "corpus_fingerprint": corpus.fingerprint, "tokenizer": str(tokenizer.path),
                "tokenizer_hash": tokenizer.content_hash, "eos_id": tokenizer.eos_id,
                "bos_id": tokenizer.bos_id if tokenizer.add_bos else None,
                "val_fraction": val_fraction,
                "tokenize_seconds": round(tokenised, 2), "splits": {}}
        _split(tmp, indices_np, lengths_np, is_val, dtype, meta)
        (tmp / "all.bin").unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # last: the entry is now complete
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tokenised in %.1fs: train %d tokens / %d documents, val %d tokens / %d documents",
                time.perf_counter() - started, meta["splits"]["train"]["num_tokens"],
                meta["splits"]["train"]["num_documents"], meta["splits"]["val"]["num_tokens"],
                meta["splits"]["val"]["num_documents"])


def _split(folder: Path, indices: np.ndarray, lengths: np.ndarray, is_val: np.ndarray, dtype: np.dtype,
           meta: dict) -> None:
    """Copy each document of ``all.bin`` into its split's stream, ``_COPY_TOKENS`` at a time."""
    total = int(lengths.sum())
    source = np.memmap(folder / "all.bin", dtype=dtype, mode="r", shape=(total,)) if total else None
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    outputs = {split: open(folder / f"{split}.bin", "wb") for split in SPLITS}
    try:
        doc = 0
        while doc < len(lengths):  # documents [doc, end) in one step (at least one document)
            end = max(int(np.searchsorted(starts, starts[doc] + _COPY_TOKENS, side="right")) - 1, doc + 1)
            end = min(end, len(lengths))
            block = np.asarray(source[starts[doc]:starts[end]])
            token_is_val = np.repeat(is_val[doc:end], lengths[doc:end])
            outputs["val"].write(block[token_is_val].tobytes())
            outputs["train"].write(block[~token_is_val].tobytes())
            doc = end
    finally:
        for f in outputs.values():
            f.close()
        del source
    for split, mask in (("train", ~is_val), ("val", is_val)):
        split_lengths = lengths[mask]
        offsets = np.concatenate([[0], np.cumsum(split_lengths)]).astype(np.int64)
        np.save(folder / f"{split}.offsets.npy", offsets)
        np.save(folder / f"{split}.doc_index.npy", indices[mask])
        meta["splits"][split] = {"num_tokens": int(offsets[-1]), "num_documents": int(mask.sum())}
