"""Tokenizer: byte-level BPE round trips, tokenizer.json loading, and the build-once cache."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tokenizers

from torchtrain.data import tokenizer as tokenizer_mod
from torchtrain.data.corpus import open_corpus
from torchtrain.data.tokenizer import (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer, load_tokenizer,
                                       tokenizer_from_file, train_bpe, training_subset)

VOCAB = 400
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Grüße aus München! Ça va? 日本語のテキスト, emoji 🎉🚀, and tabs\tand\r\nCRLF.\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n" * 5,
    "numbers 0123456789 3.14159 -42 1e-9 0xFF " * 10,
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_corpus")
    for i, text in enumerate(DOCS):
        (root / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return open_corpus(str(root))


@pytest.fixture(scope="module")
def tok(small_corpus, tmp_path_factory):
    return load_tokenizer("default", vocab_size=VOCAB, cache_dir=tmp_path_factory.mktemp("tok_cache"),
                          corpus=small_corpus)


@pytest.mark.parametrize("text", [
    "hello world",
    "    indented = {'key': [1, 2, 3]}\n\n",
    "Grüße, naïve café — “quotes” 日本語 🎉 \u200b zero-width",
    "text never seen in training: zxqv ЖЩЮ ∮∑∫ \x00\x7f",
    "a literal <|eos|> and <|bos|> inside a document",
    "",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_special_tokens_and_ids(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.backend.id_to_token(tok.eos_id) == EOS_TOKEN
    # Documents are data: the literal string never becomes the special token, and nothing is added.
    assert tok.eos_id not in tok.encode(f"x {EOS_TOKEN} y {BOS_TOKEN} {PAD_TOKEN}")
    assert tok.encode("") == []
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.decode([tok.eos_id], skip_special_tokens=True) == ""


def test_learned_merges_compress(tok):
    text = DOCS[1]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_tokenizer_json_file_and_folder(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    data = (tmp_path / "tokenizer.json").read_bytes()
    for spec in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
        loaded = load_tokenizer(spec)
        assert loaded.path == (tmp_path / "tokenizer.json").resolve()
        assert loaded.content_hash == hashlib.sha256(data).hexdigest()
        assert loaded.encode(DOCS[2]) == tok.encode(DOCS[2])
        assert (loaded.eos_id, loaded.bos_id, loaded.vocab_size) == (tok.eos_id, tok.bos_id, tok.vocab_size)


def test_foreign_tokenizer_json(tmp_path):
    """A tokenizer.json with other special-token names (GPT-2 style) is recognised."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "<|endoftext|>": 2},
                                                                unk_token="hello"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = tokenizer_from_file(tmp_path / "tokenizer.json")
    assert (loaded.eos_id, loaded.bos_id, loaded.vocab_size) == (2, None, 3)
    assert loaded.encode("hello world") == [0, 1]


def test_tokenizer_without_eos_is_rejected(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="end-of-document"):
        tokenizer_from_file(tmp_path / "tokenizer.json")
    assert tokenizer_from_file(tmp_path / "tokenizer.json", eos_token="b").eos_id == 1


def test_missing_and_malformed_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*\"default\".*tokenizer.json"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_vocab_too_small(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="at least 259"):
        load_tokenizer("default", vocab_size=100, cache_dir=tmp_path, corpus=small_corpus)


def counted(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call; returns the record."""
    calls, real = [], getattr(module, name)

    def wrapper(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_cache_reuse(small_corpus, tmp_path, monkeypatch):
    builds = counted(monkeypatch, tokenizer_mod, "_build_default")
    first = load_tokenizer("default", vocab_size=300, cache_dir=tmp_path, corpus=small_corpus)
    assert len(builds) == 1
    stat = first.path.stat()
    second = load_tokenizer("default", vocab_size=300, cache_dir=tmp_path, corpus=small_corpus)
    assert len(builds) == 1  # loaded, not rebuilt
    assert second.path == first.path and second.path.stat().st_mtime_ns == stat.st_mtime_ns
    assert second.content_hash == first.content_hash
    # A different vocabulary size is a different entry; nothing but finished files is left behind.
    load_tokenizer("default", vocab_size=320, cache_dir=tmp_path, corpus=small_corpus)
    assert len(builds) == 2
    assert not list(tmp_path.rglob("*.tmp"))
    # "" means $TORCHTRAIN_CACHE.
    monkeypatch.setenv("TORCHTRAIN_CACHE", str(tmp_path))
    assert load_tokenizer("default", vocab_size=300, corpus=small_corpus).path == first.path
    assert len(builds) == 2


def test_training_is_deterministic(small_corpus):
    a = train_bpe(small_corpus.documents(), 300).to_str()
    b = train_bpe(small_corpus.documents(), 300).to_str()
    assert a == b


def test_concurrent_builders_build_once(small_corpus, tmp_path, monkeypatch):
    """Ranks starting together: one trains under the file lock, the others wait and load its file.

    flock treats separate open() calls as separate lockers even within one process, so threads
    exercise the same exclusion as torchrun's processes. The build is slowed down so that every
    thread finds the cache empty and has to wait on the lock.
    """
    build, active, overlaps = tokenizer_mod._build_default, [], []

    def slow_build(*args):
        active.append(1)
        overlaps.append(len(active))
        time.sleep(0.3)
        build(*args)
        active.pop()

    monkeypatch.setattr(tokenizer_mod, "_build_default", slow_build)
    results, errors = [], []

    def rank():
        try:
            results.append(load_tokenizer("default", vocab_size=330, cache_dir=tmp_path, corpus=small_corpus))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert overlaps == [1]  # one build, which no other ran beside
    assert len({r.content_hash for r in results}) == 1


_RANK_SCRIPT = """
import sys
from torchtrain.data import tokenizer as t
from torchtrain.data.corpus import open_corpus
builds, build = [], t._build_default
t._build_default = lambda *args: builds.append(build(*args))
tok = t.load_tokenizer("default", vocab_size=340, cache_dir=sys.argv[1], corpus=open_corpus(sys.argv[2]))
print(len(builds), tok.content_hash)
"""


def test_concurrent_processes_build_once(small_corpus, tmp_path):
    """Two real processes, as torchrun would start them: exactly one trains."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path), small_corpus.spec],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    counts, hashes = zip(*(out.split() for out, _ in outputs))
    assert sorted(counts) == ["0", "1"] and len(set(hashes)) == 1


def test_failed_build_leaves_no_cache_entry(small_corpus, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", broken)
    with pytest.raises(RuntimeError):
        load_tokenizer("default", vocab_size=300, cache_dir=tmp_path, corpus=small_corpus)
    assert not list(tmp_path.rglob("tokenizer.json")) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert load_tokenizer("default", vocab_size=300, cache_dir=tmp_path, corpus=small_corpus).vocab_size == 300


def test_training_subset_is_deterministic_and_bounded(small_corpus):
    everything = list(training_subset(small_corpus, None))
    assert everything == list(small_corpus.documents())
    subset = list(training_subset(small_corpus, 600))
    assert subset == list(training_subset(small_corpus, 600))
    assert 0 < len(subset) < len(everything) and all(doc in everything for doc in subset)


def test_repr(tok):
    assert isinstance(tok, Tokenizer) and "vocab_size=400" in repr(tok)


def _hf_folder(tok, folder: Path, *, post_processor_bos: bool, config: dict | None) -> Path:
    """A Hugging Face style tokenizer folder: tokenizer.json (optionally adding BOS, as Llama's does) and
    tokenizer_config.json."""
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    if post_processor_bos:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, tok.bos_id)])
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    return folder


@pytest.mark.parametrize("post_processor_bos,config", [
    (True, {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}),  # Llama-3: the post-processor adds BOS
    (False, {"bos_token": None, "eos_token": EOS_TOKEN}),  # Qwen2: no BOS
    (True, None),  # a bare tokenizer.json that adds BOS
])
def test_documents_start_as_transformers_starts_them(tok, tmp_path, post_processor_bos, config):
    """The instrument: transformers' own tokenizer of the folder, encoding a text with its special tokens."""
    from transformers import PreTrainedTokenizerFast

    folder = _hf_folder(tok, tmp_path / "model", post_processor_bos=post_processor_bos, config=config)
    ours = load_tokenizer(folder)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **(config or {}))
    for text in DOCS:
        expected = reference(text)["input_ids"]
        assert ours.document(ours.encode(text)) == expected + [ours.eos_id], text
    assert ours.add_bos == post_processor_bos


def test_tokenizer_config_sets_eos_and_bos_and_enters_the_hash(tok, tmp_path):
    plain = _hf_folder(tok, tmp_path / "plain", post_processor_bos=True, config=None)
    configured = _hf_folder(tok, tmp_path / "configured", post_processor_bos=True,
                            config={"eos_token": {"content": PAD_TOKEN}, "add_bos_token": False})
    a, b = load_tokenizer(plain), load_tokenizer(configured)
    assert (a.eos_id, a.add_bos) == (tok.eos_id, True)
    assert (b.eos_id, b.add_bos) == (tok.pad_id, False)  # the config's EOS, and its add_bos_token over the template
    assert b.document([7, 8]) == [7, 8, tok.pad_id] and a.document([7, 8]) == [tok.bos_id, 7, 8, tok.eos_id]
    assert a.content_hash != b.content_hash  # the shards they make differ, so do their cache keys
    (configured / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(configured)
