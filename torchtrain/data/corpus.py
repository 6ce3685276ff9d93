"""Where documents come from: corpus readers, the corpus fingerprint, and the on-disk cache.

A *corpus* is an ordered list of documents. ``open_corpus(spec)`` turns the ``[data].dataset`` string
into a :class:`Corpus`:

- ``"stdlib"``: the embedded default corpus, the ``.py`` sources of the Python standard library this
  interpreter runs on (``sysconfig.get_paths()["stdlib"]``, without ``site-packages``), one file per
  document, in sorted path order. About 1,800 files / 31 MB of real text on CPython 3.11; nothing is
  downloaded and nothing is copied into the repository.
- a ``.jsonl`` file: one document per non-blank line, the text in field ``text_field``; a ``.json`` file
  likewise, or one top-level array of such records;
- a ``.parquet`` file: one document per row, the text in column ``text_field`` (read with ``pyarrow``, a
  batch of rows at a time);
- any other file (``.txt``, ``.md``, ...): the whole file is one document;
- a directory: every ``.txt``, ``.jsonl``, ``.json`` and ``.parquet`` file below it, recursively, in sorted
  path order;
- a glob pattern (``data/**/*.jsonl``): the matching files, sorted;
- a Hugging Face ``datasets`` folder: one written by ``save_to_disk`` (its ``train`` split, if it holds
  several), or a dataset repository's folder whose ``README.md`` declares its ``configs`` (its ``train``
  split, streamed): one document per row, the text in column ``text_field``, read by ``datasets``.

Each text file may be compressed with gzip, bzip2, xz (the standard library's decompressors) or zstd
(``zstandard``): ``.jsonl.gz``, ``.txt.zst``, ...; other archives and binary files (``.zip``, ``.tar``,
``.arrow``, ``.bin``, or a NUL byte in the first 8 KiB) are refused by name rather than trained on as bytes.
Text that is not valid UTF-8 is decoded with U+FFFD in place of the bad bytes and one warning per file
saying how many (quietly for the embedded corpus, a few of whose test files are deliberately not UTF-8).
A folder written by ``python -m torchtrain.data.prepare`` is opened by :mod:`~torchtrain.data.prepared`.

Everything derived from a corpus (tokenizer, token shards) is cached under :func:`resolve_cache_dir`
and keyed by :meth:`Corpus.fingerprint`, a hash of the relative paths, sizes and contents of its files.
Cache entries are built under :func:`file_lock` and published with an atomic rename, so concurrent
ranks build an entry once and a killed build never leaves a half-written one behind.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import fcntl
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import sys
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_CORPUS = "stdlib"
FILES, HF_SAVED, HF_REPOSITORY = "files", "hf_saved", "hf_repository"  # how a Corpus reads its documents
DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # one document per record, its text in [data].text_field


def _zstd_open(path: Path, mode: str = "rb"):
    import zstandard  # on first use: only .zst sources need it (a trainer that reads none runs without it)

    # NOTE: buffered, so that a reader can peek at the first bytes (the binary check) and read lines.
    return io.BufferedReader(zstandard.open(path, mode))


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or mislabelled compressed file raises (zstandard's error once it is in use)."""
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError, lzma.LZMAError, *((zstd.ZstdError,) if zstd is not None else ()))


DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open, ".zstd": _zstd_open}
# Formats that look like data but are not text this reader can decode: refused by name.
REFUSED_SUFFIXES = {".zip": "a zip archive", ".tar": "a tar archive", ".7z": "a 7z archive",
                    ".arrow": "Arrow (give the folder a Hugging Face dataset was saved to, not its files)",
                    ".npy": "a NumPy array", ".bin": "binary", ".pt": "a torch file"}
# Bump when the meaning of a fingerprint changes (e.g. how files are turned into documents).
_FINGERPRINT_VERSION = 1
_GLOB_CHARS = set("*?[")
_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _accepted(spec: str) -> str:
    return (
        f'[data].dataset accepts "{DEFAULT_CORPUS}" (the Python standard library\'s own .py sources on this '
        f"machine, the default), a .txt file (one document), a .jsonl or .json file (one document per line, or a "
        f".json array of records; the text in the field named by [data].text_field), a .parquet file (one "
        f"document per row, the text in the column [data].text_field), a directory (all "
        f"{', '.join(DIRECTORY_SUFFIXES)} files below it, recursively), a glob pattern such as "
        f"'data/**/*.jsonl', a Hugging Face datasets folder (written by save_to_disk, or a dataset repository "
        f"whose README.md declares its configs), or a folder written by python -m torchtrain.data.prepare; "
        f"text files may be "
        f"compressed with gzip, bzip2, xz or zstd (.jsonl.gz, .txt.zst, ...). Relative paths are resolved "
        f"from the current directory ({os.getcwd()})."
    )


@dataclass(frozen=True)
class Corpus:
    """An ordered, read-only list of documents backed by files.

    ``files`` are absolute paths in document order; ``root`` is the folder their names in the
    fingerprint are relative to (so moving a corpus does not invalidate its cache). ``reader`` is
    ``FILES`` (each file read by its suffix), or ``HF_SAVED`` / ``HF_REPOSITORY`` (``root`` is a Hugging
    Face dataset, read by ``datasets``; ``files`` are its files, for the fingerprint).
    """

    spec: str
    root: Path
    files: tuple[Path, ...]
    text_field: str = "text"
    reader: str = FILES

    def __len__(self) -> int:
        """The number of files (not documents: a .jsonl file holds many)."""
        return len(self.files)

    @cached_property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def documents(self) -> Iterator[str]:
        """Yield every document's text, in corpus order (document index = position in this stream)."""
        for _, texts in self.documents_by_file():
            yield from texts

    def documents_by_file(self) -> Iterator[tuple[Path, Iterator[str]]]:
        """Each file and the texts of its documents (read lazily), in corpus order."""
        if self.reader != FILES:
            yield self.root, _hf_documents(self.root, self.reader, self.text_field)
            return
        quiet = self.spec == DEFAULT_CORPUS
        for path in self.files:
            opener, inner = _decompressor(path)
            if inner == ".parquet":
                yield path, _parquet_documents(path, self.text_field)
            elif inner in (".jsonl", ".json"):
                yield path, _jsonl_documents(path, self.text_field, opener, quiet)
            else:
                yield path, iter((_read_text(path, opener, quiet),))

    @cached_property
    def fingerprint(self) -> str:
        """A stable hex digest of the corpus: relative paths, sizes and full contents of its files.

        Hashing the contents (BLAKE2b, ~1 GB/s) costs about 0.3 s for the 31 MB stdlib corpus, cheap
        enough to run at every start and safer than modification times, which copies and checkouts reset.
        """
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"torchtrain-corpus-v{_FINGERPRINT_VERSION}\0".encode())
        if self.reader != FILES or any(_decompressor(p)[1] in RECORD_SUFFIXES for p in self.files):
            digest.update(f"text_field={self.text_field}\0".encode())
        for path in self.files:
            data = path.read_bytes()
            name = os.path.relpath(path, self.root)
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(hashlib.blake2b(data, digest_size=16).digest())
        return digest.hexdigest()


def fingerprint(corpus: Corpus) -> str:
    """The corpus' cache key; see :attr:`Corpus.fingerprint`."""
    return corpus.fingerprint


def stable_unit_hash(index, salt: int = 0):
    """Map document indices to pseudo-random floats in [0, 1) that never change (SplitMix64).

    A pure function of ``(index, salt)``: no seed, no process state, the same on every machine. Used
    to pick the validation documents and the tokenizer's training subset. Accepts an int (returns a
    float) or an integer array (returns a float64 array).
    """
    scalar = np.ndim(index) == 0
    x = np.atleast_1d(np.asarray(index, dtype=np.uint64)) + np.uint64(salt & _MASK64)
    with np.errstate(over="ignore"):  # the arithmetic is meant to wrap modulo 2**64
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    unit = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return float(unit[0]) if scalar else unit


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (site-packages excluded), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library folder {root} (sysconfig 'stdlib') does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def open_corpus(spec: str | os.PathLike = DEFAULT_CORPUS, text_field: str = "text") -> Corpus:
    """Resolve ``[data].dataset`` to a :class:`Corpus` (see the module docstring for what is accepted)."""
    spec = os.fspath(spec)
    if not spec:
        raise ValueError(f"[data].dataset is empty. {_accepted(spec)}")
    if spec == DEFAULT_CORPUS:
        files = stdlib_files()
        return Corpus(spec, Path(sysconfig.get_paths()["stdlib"]), tuple(files), text_field)

    path = Path(spec).expanduser()
    if path.is_file():
        path = path.resolve()
        return Corpus(spec, path.parent, (path,), text_field)
    if path.is_dir() and hf_dataset_reader(path):
        root = path.resolve()
        files = sorted((Path(d, f) for d, dirs, names in os.walk(root) for f in names
                        if not any(part.startswith(".") for part in Path(d, f).relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        return Corpus(spec, root, tuple(files), text_field, hf_dataset_reader(path))
    if path.is_dir():
        root = path.resolve()
        suffixes = tuple(s + c for s in DIRECTORY_SUFFIXES for c in ("", *DECOMPRESSORS))
        files = [Path(d, f) for d, _, names in os.walk(root, followlinks=True) for f in names
                 if f.endswith(suffixes)]
        if not files:
            raise FileNotFoundError(
                f"Dataset directory {spec!r} ({root}) holds no {', '.join(DIRECTORY_SUFFIXES)} files. "
                + _accepted(spec))
        return Corpus(spec, root, tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix())), text_field)
    if _GLOB_CHARS & set(spec):
        matches = sorted({Path(m).resolve() for m in glob.glob(os.path.expanduser(spec), recursive=True)
                          if os.path.isfile(m)})
        if not matches:
            raise FileNotFoundError(f"Dataset glob {spec!r} matches no files. " + _accepted(spec))
        root = Path(os.path.commonpath([p.parent for p in matches]))
        return Corpus(spec, root, tuple(matches), text_field)
    raise FileNotFoundError(f"Dataset {spec!r} not found: there is no file or directory at {path.absolute()}. "
                            + _accepted(spec))


def hf_dataset_reader(folder: Path) -> str | None:
    """``HF_SAVED`` for a folder ``save_to_disk`` wrote, ``HF_REPOSITORY`` for a dataset repository whose
    README.md declares its configs (what ``load_dataset`` reads), else None."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file() and (
            folder / "dataset_info.json").is_file():
        return HF_SAVED
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        front = text.split("\n---", 1)[0] if text.startswith("---") else ""
        if "\nconfigs:" in front:
            return HF_REPOSITORY
    return None


def _hf_documents(root: Path, reader: str, text_field: str) -> Iterator[str]:
    """The strings of column ``text_field`` of a Hugging Face dataset's train split, a batch of rows at a time.

    A saved dataset is memory-mapped; a repository's files are streamed: neither is copied into a cache.
    """
    import datasets

    datasets.disable_progress_bars()
    try:
        if reader == HF_SAVED:
            dataset = datasets.load_from_disk(str(root))
            if isinstance(dataset, datasets.DatasetDict):
                if "train" not in dataset:
                    raise ValueError(f"it holds the splits {list(dataset)}, none named 'train'")
                dataset = dataset["train"]
        else:
            dataset = datasets.load_dataset(str(root), split="train", streaming=True)
    except Exception as e:  # datasets raises its own kinds (and ValueError, OSError) for unreadable folders
        raise ValueError(f"{root} could not be read as a Hugging Face dataset ({e})") from None
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"{root}: no column {text_field!r} (it has: {columns}); set [data].text_field to the "
                         "column that holds the document text")
    for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise ValueError(f"{root}: column {text_field!r} holds a {type(text).__name__}, not a string")
            yield text


def _decompressor(path: Path):
    """(how to open ``path`` as bytes, the suffix of what it holds): ``a.jsonl.gz`` -> (gzip.open, ".jsonl")."""
    suffix = path.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise ValueError(f"{path} is {REFUSED_SUFFIXES[suffix]}, which [data].dataset does not read: give "
                         f".txt, .jsonl or .json files (plain or compressed with gzip, bzip2, xz or zstd) or "
                         f".parquet files")
    if suffix in DECOMPRESSORS:
        inner = Path(path.stem).suffix.lower()
        if inner == ".parquet":  # Parquet compresses inside the file; its reader needs to seek
            raise ValueError(f"{path}: a compressed .parquet file; give the .parquet file itself (Parquet "
                             "compresses its columns inside the file)")
        return DECOMPRESSORS[suffix], inner
    return open, suffix


@contextlib.contextmanager
def _opened(path: Path, opener) -> Iterator:
    """``path`` opened for reading bytes, refused by name if it is binary or cannot be decompressed."""
    try:
        with opener(path, "rb") as f:
            if b"\0" in f.peek(8192)[:8192]:  # every opener here buffers; peek reads nothing twice
                raise ValueError(f"{path} holds binary data (a NUL byte in its first 8 KiB), not text")
            yield f
    except _read_errors() as e:  # a damaged or mislabelled compressed file
        kind = "text" if opener is open else "zstd-compressed text" if opener is _zstd_open else \
            f"{opener.__module__}-compressed text"
        raise ValueError(f"{path} could not be read as {kind} ({e})") from None


def _decode(data: bytes) -> tuple[str, int]:
    """The text of ``data`` and how many undecodable byte sequences were replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _warn_replaced(path: Path, replaced: int, quiet: bool) -> None:
    if replaced:
        (logger.debug if quiet else logger.warning)(
            "%s is not valid UTF-8: %d undecodable byte sequences replaced by U+FFFD", path, replaced)


def _read_text(path: Path, opener=open, quiet: bool = False) -> str:
    with _opened(path, opener) as f:
        text, replaced = _decode(f.read())
    _warn_replaced(path, replaced, quiet)
    return text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The strings of column ``text_field``, one document per row, read a batch of rows at a time."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path} could not be read as Parquet ({e})") from None
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (it has: {columns}); set [data].text_field to the "
                         "column that holds the document text")
    for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
        for row, text in enumerate(batch.column(0).to_pylist()):
            if not isinstance(text, str):
                raise ValueError(f"{path}: column {text_field!r} holds a {type(text).__name__}, not a string")
            yield text


def _jsonl_documents(path: Path, text_field: str, opener=open, quiet: bool = False) -> Iterator[str]:
    """One document per JSON line; a ``.json`` file may instead hold one top-level array of records."""
    replaced = 0
    with _opened(path, opener) as f:  # streamed line by line: a file may be larger than memory
        if _decompressor(path)[1] == ".json" and f.peek(64).lstrip()[:1] == b"[":
            yield from _json_array_documents(path, f.read(), text_field)
            return
        for lineno, raw in enumerate(f, start=1):
            line, bad = _decode(raw)
            replaced += bad
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}, line {lineno}: the record has no field {text_field!r} (it has: {keys}); set "
                    f"[data].text_field to the field that holds the document text")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}, line {lineno}: field {text_field!r} is a {type(text).__name__}, "
                                 f"not a string")
            yield text
    _warn_replaced(path, replaced, quiet)


def _json_array_documents(path: Path, data: bytes, text_field: str) -> Iterator[str]:
    text, replaced = _decode(data)
    _warn_replaced(path, replaced, False)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for number, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(f"{path}, record {number}: no string field {text_field!r}; set [data].text_field to "
                             "the field that holds the document text")
        yield record[text_field]


# ----------------------------------------------------------------------------------------------
# The cache: where derived artifacts live, and how concurrent processes build them once.


def resolve_cache_dir(cache_dir: str | os.PathLike = "") -> Path:
    """``[data].cache_dir``, or ``$TORCHTRAIN_CACHE``, or ``~/.cache/torchtrain`` (created if missing)."""
    chosen = os.fspath(cache_dir) or os.environ.get("TORCHTRAIN_CACHE") or "~/.cache/torchtrain"
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the duration of the block.

    The kernel drops the lock when its holder dies, so a killed build never wedges later runs. On a
    filesystem without lock support the block runs unlocked (with a warning): entries are still
    published atomically, so the worst case is duplicated work, not a corrupt cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            logger.warning("cannot lock %s (%s); building without a lock", path, e.strerror)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
