"""The data pipeline: corpus → tokenizer → memory-mapped token shards → packed, resumable batches.

Follow a batch from disk to the model in four small modules:

- :mod:`~torchtrain.data.corpus`: documents from ``"stdlib"`` (the default corpus), .txt / .jsonl
  files, folders or globs, and the fingerprint that keys every cache entry built from them;
- :mod:`~torchtrain.data.tokenizer`: any ``tokenizer.json``, or the default byte-level BPE trained once;
- :mod:`~torchtrain.data.shards`: the corpus tokenised once into train / validation token streams;
- :mod:`~torchtrain.data.prepare` (a command) and :mod:`~torchtrain.data.prepared`: a corpus tokenised ahead
  by N processes into shards and a manifest, and those shards opened as the same token streams;
- :mod:`~torchtrain.data.loader`: packing into ``Batch`` es (labels, document ids, positions) and the
  stateful data-parallel ``TokenLoader``; ``build_datasets`` strings the steps together for the trainer.
"""

from torchtrain.data.corpus import DEFAULT_CORPUS, Corpus, fingerprint, open_corpus, resolve_cache_dir
from torchtrain.data.shards import TokenStream, build_shards, load_shards, validation_mask
from torchtrain.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer, load_tokenizer, tokenizer_from_file, train_bpe

__all__ = [
    "DEFAULT_CORPUS", "DEFAULT_TOKENIZER", "IGNORE_INDEX",
    "Batch", "Corpus", "TokenLoader", "TokenStream", "Tokenizer",
    "build_datasets", "build_shards", "fingerprint", "load_shards", "load_tokenizer", "open_corpus",
    "pack_samples", "resolve_cache_dir", "tokenizer_from_file", "train_bpe", "validation_mask",
]

# The loader needs torch; it is imported on first use, so that `prepare` and its worker processes never
# import torch (about 300 MB of memory a process).
_LOADER_NAMES = ("IGNORE_INDEX", "Batch", "TokenLoader", "build_datasets", "pack_samples")


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from torchtrain.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
