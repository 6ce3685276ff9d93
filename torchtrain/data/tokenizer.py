"""Tokenizers: any ``tokenizer.json``, or the default byte-level BPE trained once on the default corpus.

:class:`Tokenizer` is a thin wrapper over ``tokenizers.Tokenizer`` with the few things the trainer
needs: ``encode`` / ``encode_batch`` (never adding special tokens, and never turning a literal
``"<|eos|>"`` inside a document into the special token), ``decode``, ``vocab_size``, ``eos_id``,
``bos_id`` and a ``content_hash`` that keys the token shards built with it.

``load_tokenizer("default")`` trains a byte-level BPE (GPT-2 style pre-tokenisation, 256 byte symbols,
special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` at ids 0, 1, 2) on the default corpus and caches it
under ``<cache>/tokenizers/bpe<vocab>-<corpus fingerprint>-s<subset>-t<trainer version>/tokenizer.json``;
later runs load the cached file. Byte-level BPE never needs an unknown token, so
``decode(encode(text)) == text`` for any text.

NOTE: the BPE is trained on a deterministic ~10 MB subset of the corpus (documents picked by a
stable hash of their index), not all of it: on the 31 MB stdlib corpus with 2 cores that takes about
3 s instead of about 9 s, and costs about 1.3% more tokens over the whole corpus.
``max_train_bytes=None`` trains on everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from torchtrain.data.corpus import Corpus, file_lock, open_corpus, resolve_cache_dir, stable_unit_hash

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "default"
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
DEFAULT_MAX_TRAIN_BYTES = 10_000_000
# Names other tokenizer.json files use for their end / beginning of document tokens, in order of preference.
_EOS_CANDIDATES = (EOS_TOKEN, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
_BOS_CANDIDATES = (BOS_TOKEN, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
_TRAINER_VERSION = 1  # bump when train_bpe changes, so old cache entries are not reused
_SUBSET_SALT = 0x5EED_70C0  # makes the training subset independent of the validation split


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids and the identity the data pipeline needs.

    Args:
        backend: the ``tokenizers.Tokenizer``.
        path: the ``tokenizer.json`` it came from (``None`` for one built in memory).
        content_hash: hex digest identifying the tokenizer's exact JSON; computed if not given.
        eos_token: the end-of-document token; found among common names if not given.
        bos_token: the beginning-of-document token; found among common names if not given.
        add_bos: whether a document starts with BOS; if not given, whether the tokenizer's own
            post-processor puts one in front of a text (Llama's do, GPT-2's and Qwen's do not).

    A document's tokens are :meth:`document`: BOS (when ``add_bos``), its text's tokens, EOS.
    """

    def __init__(self, backend: tokenizers.Tokenizer, path: Path | None = None, content_hash: str | None = None,
                 eos_token: str | None = None, bos_token: str | None = None, add_bos: bool | None = None):
        self.backend = backend
        # Documents are data: a literal "<|eos|>" in a source file must stay text, not end the document.
        backend.encode_special_tokens = True
        self.path = path
        self.content_hash = content_hash or hashlib.sha256(backend.to_str().encode()).hexdigest()
        eos_names = (eos_token,) if eos_token else _EOS_CANDIDATES
        self.eos_id = _first_id(backend, eos_names)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer {path or '(in memory)'} has none of the end-of-document tokens {list(eos_names)}; "
                f"documents are separated by one, so use a tokenizer that has one (or pass eos_token)")
        self.bos_id = _first_id(backend, (bos_token,) if bos_token else _BOS_CANDIDATES)
        if add_bos is None:
            with_specials = backend.encode("a", add_special_tokens=True).ids
            add_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id]
        if add_bos and self.bos_id is None:
            raise ValueError(f"tokenizer {path or '(in memory)'} is configured to add a BOS token but has none of "
                             f"{[bos_token] if bos_token else list(_BOS_CANDIDATES)}")
        self.add_bos = add_bos
        self.pad_id = _first_id(backend, (PAD_TOKEN, "<pad>", "[PAD]"))
        # The largest id + 1, which is what an embedding table must cover (added tokens included).
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True),
                              max(backend.get_vocab(with_added_tokens=True).values()) + 1)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def document(self, ids: list[int]) -> list[int]:
        """A document's tokens as the shards hold them: [BOS] + ``ids`` + [EOS]."""
        return [self.bos_id, *ids, self.eos_id] if self.add_bos else [*ids, self.eos_id]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel across the CPU cores (the fast path for sharding)."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # no offsets
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write(Path(path), self.backend.to_str())

    def __repr__(self) -> str:
        return (f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"bos_id={self.bos_id}, add_bos={self.add_bos})")


def _first_id(backend: tokenizers.Tokenizer, names: Iterable[str]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


CONFIG_FILE = "tokenizer_config.json"  # beside a Hugging Face tokenizer.json: its BOS/EOS settings


def tokenizer_from_file(path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
    """Load a ``tokenizer.json`` (or a folder holding one). Its hash is that of the file's bytes.

    A ``tokenizer_config.json`` beside it (a Hugging Face model folder's) sets the BOS and EOS tokens
    and whether documents start with BOS (``bos_token``, ``eos_token``, ``add_bos_token``), as
    ``transformers`` applies them; those settings then enter the hash too.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer {str(path)!r} not found. [data].tokenizer accepts \"{DEFAULT_TOKENIZER}\" (a byte-level "
            f"BPE trained once on the default corpus and cached), a tokenizer.json file, or a folder holding "
            f"a tokenizer.json (e.g. a Hugging Face model folder).")
    data = path.read_bytes()
    try:
        backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
    settings = _special_token_settings(path.parent / CONFIG_FILE)
    if settings:
        data += json.dumps(settings, sort_keys=True).encode()
    return Tokenizer(backend, path.resolve(), hashlib.sha256(data).hexdigest(), eos_token or settings.get("eos_token"),
                     settings.get("bos_token"), settings.get("add_bos_token"))


def _special_token_settings(config_path: Path) -> dict:
    """``bos_token``, ``eos_token`` (as strings) and ``add_bos_token`` of a tokenizer_config.json, where set."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    settings = {}
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token  # {"content": "<s>", ...} in older files
        if isinstance(token, str):
            settings[key] = token
    if isinstance(config.get("add_bos_token"), bool):
        settings["add_bos_token"] = config["add_bos_token"]
    return settings


def train_bpe(documents: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens and the 256 bytes included)."""
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"[data].vocab_size is {vocab_size}; a byte-level BPE needs at least {minimum} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    return backend


def training_subset(corpus: Corpus, max_bytes: int | None) -> Iterator[str]:
    """A deterministic subset of about ``max_bytes`` of the corpus, spread evenly over it.

    Document ``i`` is kept when a stable hash of ``i`` falls below ``max_bytes / corpus bytes``, so the
    subset depends only on the corpus, never on a seed or on the machine.
    """
    keep = 1.0 if not max_bytes else min(1.0, max_bytes / max(corpus.total_bytes, 1))
    taken = 0
    for index, text in enumerate(corpus.documents()):
        if keep < 1.0 and stable_unit_hash(index, salt=_SUBSET_SALT) >= keep:
            continue
        if max_bytes and taken >= max_bytes:
            break
        taken += len(text)
        yield text


def load_tokenizer(spec: str | os.PathLike = DEFAULT_TOKENIZER, *, vocab_size: int = 8192,
                   cache_dir: str | os.PathLike = "", corpus: Corpus | None = None,
                   max_train_bytes: int | None = DEFAULT_MAX_TRAIN_BYTES) -> Tokenizer:
    """``[data].tokenizer`` → :class:`Tokenizer`.

    ``spec`` is ``"default"`` or a path to a ``tokenizer.json`` (file or folder). For ``"default"``,
    the BPE is trained on ``corpus`` (the default stdlib corpus when ``None``) with ``vocab_size``
    entries, once: the result is cached under the cache dir keyed by the corpus fingerprint and the
    vocabulary size. Safe to call from every rank at once: one process trains while the others wait
    on a file lock, then load its result.
    """
    if os.fspath(spec) != DEFAULT_TOKENIZER:
        return tokenizer_from_file(spec)
    corpus = corpus if corpus is not None else open_corpus()
    root = resolve_cache_dir(cache_dir) / "tokenizers"
    subset = "all" if not max_train_bytes else f"{max_train_bytes}"
    key = f"bpe{vocab_size}-{corpus.fingerprint[:20]}-s{subset}-t{_TRAINER_VERSION}"
    path = root / key / "tokenizer.json"
    if not path.is_file():
        with file_lock(root / f"{key}.lock"):
            if not path.is_file():  # another process may have built it while we waited
                _build_default(corpus, vocab_size, max_train_bytes, path)
    return tokenizer_from_file(path)


def _build_default(corpus: Corpus, vocab_size: int, max_train_bytes: int | None, path: Path) -> None:
    started = time.perf_counter()
    logger.info("training a byte-level BPE tokenizer (vocab %d) on corpus %r (%d files); cached at %s",
                vocab_size, corpus.spec, len(corpus), path)
    backend = train_bpe(training_subset(corpus, max_train_bytes), vocab_size)
    _atomic_write(path, backend.to_str())
    logger.info("tokenizer trained in %.1fs (vocab %d)", time.perf_counter() - started,
                backend.get_vocab_size(with_added_tokens=True))


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
