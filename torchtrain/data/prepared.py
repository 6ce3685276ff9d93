"""Token folders written by ``python -m torchtrain.data.prepare`` (see there), opened for training.

``data.dataset`` may name such a folder: its shards are memory-mapped and read as one stream per split,
nothing is tokenised or hashed at the start of a run. The folder holds a copy of the tokenizer it was made
with (``tokenizer.json``), which ``data.tokenizer = "default"`` uses; a tokenizer the recipe names
explicitly must be the same one (compared by content hash).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from torchtrain.data.shards import SPLITS, TokenStream
from torchtrain.data.tokenizer import Tokenizer

MANIFEST = "manifest.json"  # written last by prepare: its presence marks a folder complete
MANIFEST_FORMAT = 1
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer the folder was made with, a copy


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete prepared folder (its manifest is there)."""
    return (Path(path) / MANIFEST).is_file()


class ConcatTokens:
    """Several shards' token memmaps read as one array: ``len`` and slices (what packing reads)."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype):
        self.parts, self.dtype = parts, dtype
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("prepared tokens are read by contiguous slices")
        start, stop, _ = index.indices(len(self))
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            part_stop = min(stop, int(self.starts[first + 1]))
            pieces.append(self.parts[first][start - self.starts[first]:part_stop - self.starts[first]])
            start, first = part_stop, first + 1
        if len(pieces) == 1:
            return np.asarray(pieces[0])
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)


def open_prepared(folder: str | os.PathLike, tokenizer: Tokenizer) -> dict[str, TokenStream]:
    """The ``{"train", "val"}`` streams of a prepared folder, memory-mapped, after checking the tokenizer."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{folder / MANIFEST}: format {manifest.get('format')}, this version reads {MANIFEST_FORMAT}")
    made_with = manifest["tokenizer"]
    if made_with["content_hash"] != tokenizer.content_hash:
        raise ValueError(f"data.dataset {folder} was prepared with the tokenizer {made_with['source']}, not with "
                         f"data.tokenizer's {tokenizer.path} (their files differ); set data.tokenizer to the one "
                         "it was prepared with, or to \"default\" (the folder's own copy)")
    dtype = np.dtype(manifest["dtype"])
    streams = {}
    for split in SPLITS:
        parts, offsets, indices = [], [np.zeros(1, dtype=np.int64)], []
        for shard in manifest["splits"][split]["shards"]:
            path = folder / f"{shard['name']}.bin"
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise ValueError(f"{path}: missing or not the {shard['bytes']} bytes {MANIFEST} lists")
            parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
            offsets.append(np.load(folder / f"{shard['name']}.idx.npy")[1:] + offsets[-1][-1])
            indices.append(np.load(folder / f"{shard['name']}.doc_index.npy"))
        tokens = ConcatTokens(parts, dtype) if len(parts) != 1 else parts[0]
        streams[split] = TokenStream(tokens if parts else np.zeros(0, dtype=dtype), np.concatenate(offsets),
                                     np.concatenate(indices) if indices else None, name=split, path=folder)
    return streams
