"""``python -m torchtrain.data.prepare``: tokenise a corpus once, in parallel, into token shards and a manifest.

    python -m torchtrain.data.prepare --dataset 'data/**/*.jsonl.gz' --tokenizer /models/Llama-3-8B \\
        --out /shared/tokens/my-corpus --workers 16
    torchrun ... -m torchtrain.train --config recipes/llama3_8b_2k.toml --data.dataset /shared/tokens/my-corpus

Training from a prepared folder opens its shards in seconds on every node; nothing is tokenised or hashed
at the start of a run. The folder may live on shared storage. It holds::

    manifest.json          written last (its presence marks the folder complete): the tokenizer (path, content
                           hash, vocabulary, EOS/BOS ids), the corpus, per-source document and token counts, and
                           every shard with its tokens, documents, bytes and CRC-32
    tokenizer.json         the tokenizer the tokens were made with (and its tokenizer_config.json, if it had one)
    train-00000.bin ...    uint16 tokens (uint32 above 65,536 ids), each document followed by EOS (and preceded
                           by BOS where the tokenizer's configuration adds one)
    train-00000.idx.npy    int64 [documents + 1]: where each document starts in the shard
    val-00000.bin ...      the held-out documents, chosen by a stable hash of the document's corpus index
                           (the same rule as the trainer's own cache, ``shards.validation_mask``)
    progress.json          while it runs: the shards finished and the documents they hold

How: the main process reads the documents in corpus order and hands chunks of about 4 MB of text to
``--workers`` processes that tokenise them (each loads the tokenizer once); at most two chunks per worker
are in flight, and results are written in corpus order as they come back, straight into the open shard
files. Memory stays bounded by the chunks in flight and one shard's document offsets, whatever the corpus
size, and no intermediate copy of the corpus is written. Every ``--shard-tokens`` training tokens the open
train and validation shards are closed together, made durable and recorded in ``progress.json``: a run
that is interrupted and started again with the same arguments continues after the last recorded shards
(it reads past the documents they hold without tokenising them again).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from torchtrain.data.corpus import DEFAULT_CORPUS, Corpus, open_corpus, stable_unit_hash
from torchtrain.data.prepared import MANIFEST, MANIFEST_FORMAT, TOKENIZER_FILE, is_prepared
from torchtrain.data.shards import SPLITS, token_dtype, validation_mask
from torchtrain.data.tokenizer import (CONFIG_FILE, DEFAULT_TOKENIZER, Tokenizer, load_tokenizer, tokenizer_from_file,
                                       train_bpe, training_subset)

logger = logging.getLogger(__name__)

_PROGRESS = "progress.json"
_CHUNK_CHARS = 4_000_000


class _Shard:
    """One open split shard: tokens appended to ``<split>-<n>.bin``, document offsets kept for its index."""

    def __init__(self, folder: Path, split: str, number: int, dtype: np.dtype):
        self.name = f"{split}-{number:05d}"
        self.path = folder / f"{self.name}.bin"
        self.file = open(self.path, "wb")
        self.dtype, self.offsets, self.doc_indices, self.tokens = dtype, [0], [], 0
        self.crc = 0

    def add(self, doc_index: int, ids: np.ndarray) -> None:
        data = ids.tobytes()
        self.file.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.tokens += len(ids)
        self.offsets.append(self.tokens)
        self.doc_indices.append(doc_index)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        np.save(self.path.with_suffix(".idx.npy"), np.asarray(self.offsets, dtype=np.int64))
        np.save(self.path.with_suffix(".doc_index.npy"), np.asarray(self.doc_indices, dtype=np.int64))
        return {"name": self.name, "tokens": self.tokens, "documents": len(self.doc_indices),
                "bytes": self.path.stat().st_size, "crc32": self.crc}


# -- the workers -------------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    from torchtrain.data.tokenizer import tokenizer_from_file

    _worker_tokenizer = tokenizer_from_file(tokenizer_path)


def _encode(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer.encode_batch(texts)


# -- the writer --------------------------------------------------------------------------------------

def _documents(corpus: Corpus) -> Iterator[tuple[int, str, str]]:
    """(corpus index, source name, text) of every document, in corpus order."""
    index = 0
    for path, texts in corpus.documents_by_file():
        name = os.path.relpath(path, corpus.root) if path != corpus.root else corpus.root.name  # (a HF dataset)
        for text in texts:
            yield index, name, text
            index += 1


def _chunks(documents: Iterator[tuple[int, str, str]], skip: int) -> Iterator[list[tuple[int, str, str]]]:
    chunk, size = [], 0
    for doc in documents:
        if doc[0] < skip or not doc[2] or doc[2].isspace():
            continue  # already in a finished shard, or empty (it would add a stray EOS)
        chunk.append(doc)
        size += len(doc[2])
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def prepare(dataset: str, tokenizer_spec: str, out: str | os.PathLike, workers: int = 1, text_field: str = "text",
            val_fraction: float = 0.02, shard_tokens: int = 1 << 28, train_tokenizer: int = 0,
            tokenizer_sample_bytes: int = 1 << 30) -> dict:
    """Tokenise ``dataset`` into ``out`` (see the module docstring); return the manifest.

    ``train_tokenizer``: instead of ``tokenizer_spec``, train a byte-level BPE of that many entries on about
    ``tokenizer_sample_bytes`` of the corpus, spread evenly over it (``tokenizer.training_subset``).
    """
    out = Path(out)
    if is_prepared(out):
        logger.info("%s is already prepared (its %s is there)", out, MANIFEST)
        return json.loads((out / MANIFEST).read_text())
    validation_mask(np.zeros(0, dtype=np.int64), val_fraction)  # checks the fraction
    corpus = open_corpus(dataset, text_field)
    out.mkdir(parents=True, exist_ok=True)
    own = out / TOKENIZER_FILE
    if train_tokenizer and not own.is_file():  # (an interrupted run keeps the one it trained)
        logger.info("training a byte-level BPE (vocab %d) on about %.0f MB of %s", train_tokenizer,
                    tokenizer_sample_bytes / 1e6, dataset)
        _write_text(own, train_bpe(training_subset(corpus, tokenizer_sample_bytes), train_tokenizer).to_str())
    if train_tokenizer:
        tokenizer = tokenizer_from_file(own)
    else:
        tokenizer = load_tokenizer(tokenizer_spec, corpus=open_corpus(DEFAULT_CORPUS)
                                   if tokenizer_spec == DEFAULT_TOKENIZER else None)
        if not own.is_file():  # the folder carries the tokenizer it was made with, and its BOS/EOS settings
            config = Path(tokenizer.path).parent / CONFIG_FILE
            if config.is_file():
                _write_text(out / CONFIG_FILE, config.read_text())
            _write_text(own, Path(tokenizer.path).read_text())
    settings = {"dataset": dataset, "text_field": text_field, "tokenizer_hash": tokenizer.content_hash,
                "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    progress = _read_progress(out, settings)
    keep = {f"{shard['name']}{suffix}" for split in SPLITS for shard in progress["shards"][split]
            for suffix in (".bin", ".idx.npy", ".doc_index.npy")} | {_PROGRESS, TOKENIZER_FILE, CONFIG_FILE}
    for leftover in out.iterdir():  # an interrupted shard: written again from its first document
        if leftover.name not in keep:
            leftover.unlink()
    if progress["documents_done"]:
        logger.info("continuing %s after document %d (%d shards done)", out, progress["documents_done"],
                    sum(len(s) for s in progress["shards"].values()))

    started = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    sources = progress["sources"]
    open_shards = {split: _Shard(out, split, len(progress["shards"][split]), dtype) for split in SPLITS}
    last_index = progress["documents_done"] - 1

    def close_shards(next_document: int, reopen: bool = True) -> None:
        """Close both open shards (an empty one leaves no file), record them and where to continue."""
        for split in SPLITS:
            shard = open_shards[split]
            record = shard.close()
            if shard.tokens:
                progress["shards"][split].append(record)
            else:
                for suffix in (".bin", ".idx.npy", ".doc_index.npy"):
                    shard.path.with_suffix(suffix).unlink(missing_ok=True)
            if reopen:
                open_shards[split] = _Shard(out, split, len(progress["shards"][split]), dtype)
        progress["documents_done"] = next_document
        _write_json(out / _PROGRESS, progress)

    context = multiprocessing.get_context("spawn")  # the tokenizer's threads and fork do not mix
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        in_flight: deque = deque()
        chunks = _chunks(_documents(corpus), progress["documents_done"])

        def write(chunk, encoded) -> None:
            nonlocal last_index
            # The held-out rule of the trainer's cache (shards.validation_mask) without its whole-corpus
            # guarantees (at least one document in each split), which a stream cannot know in advance.
            held = stable_unit_hash(np.array([index for index, _, _ in chunk], dtype=np.int64)) < val_fraction
            for (index, source, _), ids, held_out in zip(chunk, encoded, held):
                tokens = np.asarray(tokenizer.document(ids), dtype=dtype)
                open_shards["val" if held_out else "train"].add(index, tokens)
                counts = sources.setdefault(source, {"documents": 0, "tokens": 0})
                counts["documents"] += 1
                counts["tokens"] += len(tokens)
                last_index = index
                if open_shards["train"].tokens >= shard_tokens:
                    close_shards(index + 1)

        for chunk in chunks:
            in_flight.append((chunk, pool.apply_async(_encode, ([text for _, _, text in chunk],))))
            while len(in_flight) >= 2 * workers:
                done_chunk, result = in_flight.popleft()
                write(done_chunk, result.get())
        while in_flight:
            done_chunk, result = in_flight.popleft()
            write(done_chunk, result.get())
    close_shards(last_index + 1, reopen=False)
    if not progress["shards"]["train"]:
        raise ValueError(f"{dataset}: no document with any text to tokenise")

    manifest = {
        "format": MANIFEST_FORMAT, "dtype": dtype.name, "val_fraction": val_fraction,
        "tokenizer": {"path": TOKENIZER_FILE, "source": str(tokenizer_spec if not train_tokenizer else
                      f"BPE of {train_tokenizer} trained here"), "content_hash": tokenizer.content_hash,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
                      "add_bos": tokenizer.add_bos},
        "corpus": {"spec": dataset, "text_field": text_field, "files": len(corpus), "bytes": corpus.total_bytes},
        "sources": dict(sorted(sources.items())),
        "splits": {split: {"tokens": sum(s["tokens"] for s in progress["shards"][split]),
                           "documents": sum(s["documents"] for s in progress["shards"][split]),
                           "shards": progress["shards"][split]} for split in SPLITS},
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(out / MANIFEST, manifest)  # last: the folder is complete
    (out / _PROGRESS).unlink()
    logger.info("prepared %s in %.1fs: train %d tokens / %d documents in %d shards, val %d tokens / %d documents",
                out, manifest["seconds"], manifest["splits"]["train"]["tokens"],
                manifest["splits"]["train"]["documents"], len(manifest["splits"]["train"]["shards"]),
                manifest["splits"]["val"]["tokens"], manifest["splits"]["val"]["documents"])
    return manifest


def _read_progress(out: Path, settings: dict) -> dict:
    path = out / _PROGRESS
    if path.is_file():
        progress = json.loads(path.read_text())
        if progress.get("settings") != settings:
            raise ValueError(f"{out} holds an interrupted preparation with other settings ({progress.get('settings')}); "
                             f"use another --out or delete it")
        return progress
    if any(p.name not in (TOKENIZER_FILE, CONFIG_FILE) for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no preparation to continue; use an empty or new folder")
    return {"settings": settings, "documents_done": 0, "shards": {split: [] for split in SPLITS}, "sources": {}}


def _write_json(path: Path, value: dict) -> None:
    _write_text(path, json.dumps(value, indent=1))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchtrain.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="what data.dataset accepts: files, folders, globs")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="a tokenizer.json or a Hugging Face model folder holding one (default: the embedded BPE)")
    parser.add_argument("--out", required=True, help="the folder to write (empty, or an interrupted preparation)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--text-field", default="text", help="the .jsonl field holding the text")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--shard-tokens", type=int, default=1 << 28, help="training tokens per shard")
    parser.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                        help="train a byte-level BPE of VOCAB entries on a sample of the corpus instead of --tokenizer")
    parser.add_argument("--tokenizer-sample-bytes", type=int, default=1 << 30,
                        help="how much of the corpus --train-tokenizer reads (spread evenly over it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.workers < 1 or args.shard_tokens < 1:
        print("error: --workers and --shard-tokens must be positive", file=sys.stderr)
        sys.exit(2)
    try:
        prepare(args.dataset, args.tokenizer, args.out, args.workers, args.text_field, args.val_fraction,
                args.shard_tokens, args.train_tokenizer, args.tokenizer_sample_bytes)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
