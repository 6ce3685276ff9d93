"""Data pipeline: corpus readers, token shards, packing, and the resumable data-parallel loader."""

import json
import os
import shutil
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torchtrain.data import shards as shards_mod
from torchtrain.data.corpus import open_corpus, stable_unit_hash
from torchtrain.data.loader import IGNORE_INDEX, Batch, TokenLoader, build_datasets, pack_samples
from torchtrain.data.shards import TokenStream, build_shards, validation_mask
from torchtrain.data.tokenizer import load_tokenizer

# ----------------------------------------------------------------------------------------------
# Fixtures: a small corpus written by the test, and a tokenizer trained on it once per module.


def _documents(n=60):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "(", ")", ":", "\n", "    ",
             "Grüße", "日本", "🎉", "42", "3.14"]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 120)))) for i in range(n)]


@pytest.fixture(scope="module")
def docs():
    return _documents()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, docs):
    """Half the documents as .txt files (in a nested folder), half as one .jsonl with field "body"."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a").mkdir()
    half = len(docs) // 2
    for i, text in enumerate(docs[:half]):
        (root / "a" / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for text in docs[half:]:
            f.write(json.dumps({"body": text, "id": 1}) + "\n")
    (root / "ignored.csv").write_text("not,a,document\n")
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory, corpus_dir):
    corpus = open_corpus(str(corpus_dir), text_field="body")
    return load_tokenizer("default", vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"), corpus=corpus)


@pytest.fixture(scope="module")
def streams(tmp_path_factory, corpus_dir, tok):
    corpus = open_corpus(str(corpus_dir), text_field="body")
    return build_shards(corpus, tok, tmp_path_factory.mktemp("shards"), val_fraction=0.1)


# ----------------------------------------------------------------------------------------------
# Corpus readers


def test_txt_file_is_one_document(tmp_path):
    (tmp_path / "one.txt").write_text("line 1\nline 2\n")
    corpus = open_corpus(str(tmp_path / "one.txt"))
    assert list(corpus.documents()) == ["line 1\nline 2\n"]


def test_jsonl_custom_field_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"content": "first"}\n\n{"content": "second", "x": 1}\n')
    assert list(open_corpus(str(path), text_field="content").documents()) == ["first", "second"]


def test_jsonl_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text here"}\n')
    with pytest.raises(ValueError) as info:
        list(open_corpus(str(path)).documents())
    message = str(info.value)
    assert str(path) in message and "line 2" in message and "'text'" in message and "body" in message
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        list(open_corpus(str(path)).documents())


def test_directory_is_recursive_sorted_and_mixed(corpus_dir, docs):
    corpus = open_corpus(str(corpus_dir), text_field="body")
    names = [p.relative_to(corpus_dir).as_posix() for p in corpus.files]
    assert names == sorted(names) and "ignored.csv" not in names and names[-1] == "b.jsonl"
    assert list(corpus.documents()) == docs


def test_glob(corpus_dir, docs):
    corpus = open_corpus(str(corpus_dir / "a" / "*.txt"))
    assert list(corpus.documents()) == docs[:len(docs) // 2]
    recursive = open_corpus(str(corpus_dir / "**" / "*.jsonl"), text_field="body")
    assert list(recursive.documents()) == docs[len(docs) // 2:]


def test_missing_paths_explain_what_is_accepted(tmp_path):
    for spec in (str(tmp_path / "missing.jsonl"), str(tmp_path / "*.nothing")):
        with pytest.raises(FileNotFoundError) as info:
            open_corpus(spec)
        message = str(info.value)
        assert spec in message and '"stdlib"' in message and ".jsonl" in message and "glob" in message
        assert "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .txt, .jsonl, .json, .parquet files"):
        open_corpus(str(tmp_path / "empty"))


def test_stdlib_corpus():
    corpus = open_corpus("stdlib")
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [p.relative_to(root).as_posix() for p in corpus.files]
    assert len(names) > 500 and "os.py" in names and "json/decoder.py" in names
    assert names == sorted(names)
    assert not any("site-packages" in n or not n.endswith(".py") for n in names)
    first = next(iter(corpus.documents()))
    assert first == (root / names[0]).read_text(encoding="utf-8", errors="replace")


def test_fingerprint_tracks_content_not_location(tmp_path, corpus_dir):
    copy = tmp_path / "copy"
    shutil.copytree(corpus_dir, copy)
    original = open_corpus(str(corpus_dir), "body").fingerprint
    assert open_corpus(str(copy), "body").fingerprint == original
    assert open_corpus(str(copy), "text").fingerprint != original  # the text field changes the documents
    (copy / "a" / "000.txt").write_text("changed")
    assert open_corpus(str(copy), "body").fingerprint != original


# ----------------------------------------------------------------------------------------------
# Token shards


def test_shards_decode_back_to_documents(streams, tok, docs):
    assert streams["train"].tokens.dtype == np.uint16 and isinstance(streams["train"].tokens, np.memmap)
    seen = {}
    for split, stream in streams.items():
        assert stream.doc_offsets[0] == 0 and stream.doc_offsets[-1] == stream.num_tokens
        for j, index in enumerate(stream.doc_indices):
            tokens = stream.document(j)
            assert tokens[-1] == tok.eos_id and tok.eos_id not in tokens[:-1]
            seen[int(index)] = tok.decode(tokens[:-1])
    assert seen == dict(enumerate(docs))


def test_val_split_is_disjoint_stable_and_nonempty(streams):
    train, val = set(streams["train"].doc_indices.tolist()), set(streams["val"].doc_indices.tolist())
    assert train and val and not train & val and train | val == set(range(60))
    # The split is a pure function of the document index: the same documents, in any corpus of this size.
    assert sorted(val) == np.flatnonzero(validation_mask(np.arange(60), 0.1)).tolist()


def test_validation_mask_rules():
    indices = np.arange(20_000)
    mask = validation_mask(indices, 0.02)
    assert 0.015 < mask.mean() < 0.025
    assert np.array_equal(mask[:100], validation_mask(indices[:100], 0.02))  # depends on the index only
    assert validation_mask(np.arange(3), 1e-9).sum() == 1  # at least one held out
    assert validation_mask(np.arange(2), 0.99).tolist().count(False) == 1  # at least one kept
    assert not validation_mask(indices, 0.0).any()
    assert validation_mask(np.arange(5), 1.0).all()  # a validation-only source
    with pytest.raises(ValueError, match="val_fraction"):
        validation_mask(indices, 1.5)
    assert stable_unit_hash(7) == stable_unit_hash(np.array([7]))[0]


def test_shard_cache_reuse_and_atomicity(tmp_path, corpus_dir, tok, monkeypatch):
    corpus = open_corpus(str(corpus_dir), text_field="body")
    key_dir = tmp_path / "shards"
    key_dir.mkdir()
    (key_dir / "stale.tmp-1-deadbeef").mkdir()  # not a complete entry: never read
    builds, build = [], shards_mod._build
    monkeypatch.setattr(shards_mod, "_build", lambda *args: builds.append(build(*args)))
    first = build_shards(corpus, tok, tmp_path, val_fraction=0.1)
    assert len(builds) == 1
    meta = first["train"].path / "meta.json"
    mtime = meta.stat().st_mtime_ns
    second = build_shards(corpus, tok, tmp_path, val_fraction=0.1)
    assert len(builds) == 1 and meta.stat().st_mtime_ns == mtime
    assert np.array_equal(first["train"].tokens, second["train"].tokens)
    assert not any(".tmp-" in p.name for p in (tmp_path / "shards").iterdir() if p.name != "stale.tmp-1-deadbeef")
    # A different val_fraction is a different entry.
    build_shards(corpus, tok, tmp_path, val_fraction=0.2)
    assert len(builds) == 2


def test_concurrent_shard_builders_build_once(tmp_path, corpus_dir, tok, monkeypatch):
    """Threads stand in for ranks (flock excludes separate open()s); the slowed build makes them all wait."""
    corpus = open_corpus(str(corpus_dir), text_field="body")
    build, active, overlaps = shards_mod._build, [], []

    def slow_build(*args):
        active.append(1)
        overlaps.append(len(active))
        time.sleep(0.3)
        build(*args)
        active.pop()

    monkeypatch.setattr(shards_mod, "_build", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_shards(corpus, tok, tmp_path, 0.1)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and overlaps == [1]  # one build, which no other ran beside


def test_failed_shard_build_leaves_nothing(tmp_path, corpus_dir, tok, monkeypatch):
    corpus = open_corpus(str(corpus_dir), text_field="body")

    def broken(texts):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(tok, "encode_batch", broken)
    with pytest.raises(RuntimeError):
        build_shards(corpus, tok, tmp_path, 0.1)
    assert [p.suffix for p in (tmp_path / "shards").iterdir()] == [".lock"]
    monkeypatch.undo()
    assert build_shards(corpus, tok, tmp_path, 0.1)["train"].num_documents > 0


def test_empty_documents_are_skipped(tmp_path, tok):
    (tmp_path / "c").mkdir()
    for i, text in enumerate(["first doc", "", "   \n", "last doc"]):
        (tmp_path / "c" / f"{i}.txt").write_text(text)
    streams = build_shards(open_corpus(str(tmp_path / "c")), tok, tmp_path / "cache", val_fraction=0.0)
    assert streams["train"].doc_indices.tolist() == [0, 3] and streams["val"].num_tokens == 0


# ----------------------------------------------------------------------------------------------
# Packing


EOS = 1


def _hand_stream():
    # 10 11 12 EOS | 20 21 EOS | 30 31 32 33 34 EOS
    return TokenStream.from_documents([[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]], eos_id=EOS)


def test_packing_by_hand():
    stream = _hand_stream()
    assert stream.num_tokens == 13 and stream.num_samples(4) == 3
    batch = pack_samples(stream, [0, 1, 2], seq_len=4)
    assert batch.tokens.tolist() == [[10, 11, 12, EOS], [20, 21, EOS, 30], [31, 32, 33, 34]]
    assert batch.labels.tolist() == [[11, 12, EOS, -100], [21, EOS, -100, 31], [32, 33, 34, EOS]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]  # restart at the window start
    assert (batch.tokens.dtype, batch.labels.dtype, batch.document_ids.dtype, batch.positions.dtype) == (
        torch.int64, torch.int64, torch.int32, torch.int64)
    assert batch.num_valid_tokens() == 10
    with pytest.raises(IndexError):
        pack_samples(stream, [3], seq_len=4)


def _reference_sample(stream, i, seq_len):
    """Token by token, straight from the definitions."""
    doc_of = np.zeros(stream.num_tokens, dtype=np.int64)
    for j in range(stream.num_documents):
        doc_of[stream.doc_offsets[j]:stream.doc_offsets[j + 1]] = j
    w = np.asarray(stream.tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64)
    g = np.arange(i * seq_len, i * seq_len + seq_len)
    labels = np.where(doc_of[g + 1] == doc_of[g], w[1:], -100)
    positions = g - np.maximum(stream.doc_offsets[doc_of[g]], g[0])  # from the window or document start
    return w[:-1], labels, doc_of[g] - doc_of[g[0]], positions


def test_packing_matches_reference(streams, tok):
    stream, seq_len = streams["train"], 37
    samples = [0, 5, stream.num_samples(seq_len) - 1]
    batch = pack_samples(stream, samples, seq_len)
    for row, i in enumerate(samples):
        tokens, labels, doc_ids, positions = _reference_sample(stream, i, seq_len)
        assert batch.tokens[row].tolist() == tokens.tolist()
        assert batch.labels[row].tolist() == labels.tolist()
        assert batch.document_ids[row].tolist() == doc_ids.tolist()
        assert batch.positions[row].tolist() == positions.tolist()
    # Documents end with EOS, so the ignored labels are exactly those of the EOS tokens.
    assert torch.equal(batch.labels == IGNORE_INDEX, batch.tokens == tok.eos_id)


def test_batch_to_device():
    batch = pack_samples(_hand_stream(), [0, 1], 4)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.labels, batch.labels) and moved.shape == (2, 4)


# ----------------------------------------------------------------------------------------------
# Loader


def _long_stream(num_docs=50, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 250, size=int(rng.integers(1, 30))).tolist() for _ in range(num_docs)]
    return TokenStream.from_documents(docs, eos_id=EOS, dtype=np.uint16)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a._tensors(), b._tensors()))


def test_loader_determinism_by_seed():
    stream = _long_stream()
    a = _take(TokenLoader(stream, 8, 4, seed=3), 10)
    b = _take(TokenLoader(stream, 8, 4, seed=3), 10)
    c = _take(TokenLoader(stream, 8, 4, seed=4), 10)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_loader_epochs_visit_every_sample_once():
    stream = _long_stream()
    seq_len, batch_size = 8, 4
    loader = TokenLoader(stream, seq_len, batch_size, seed=0)
    num, steps = loader.num_samples[0], loader.steps_per_epoch
    assert steps == num // batch_size and num % batch_size  # this stream drops a remainder
    everything = pack_samples(stream, range(num), seq_len).tokens
    firsts = {tuple(row.tolist()): i for i, row in enumerate(everything)}  # rows are distinct here
    assert len(firsts) == num
    batches = _take(loader, 2 * steps)
    epoch0 = [firsts[tuple(r.tolist())] for b in batches[:steps] for r in b.tokens]
    epoch1 = [firsts[tuple(r.tolist())] for b in batches[steps:] for r in b.tokens]
    assert len(set(epoch0)) == len(epoch0) == steps * batch_size
    assert epoch0 != epoch1 and len(set(epoch1)) == len(epoch1)
    assert loader.state_dict() == {"epoch": 2, "samples_consumed": 0, "num_samples": num}


def test_loader_resumes_exactly_at_every_step():
    stream = _long_stream()
    loader = TokenLoader(stream, 8, 4, seed=1)
    total = 2 * loader.steps_per_epoch + 3  # crosses two epoch boundaries
    reference = _take(TokenLoader(stream, 8, 4, seed=1), total)
    for k in range(total):
        first = TokenLoader(stream, 8, 4, seed=1)
        assert all(_same(x, y) for x, y in zip(_take(first, k), reference))
        state = {key: int(v) for key, v in first.state_dict().items()}
        resumed = TokenLoader(stream, 8, 4, seed=1)
        resumed.load_state_dict(state)
        rest = _take(resumed, min(3, total - k))
        assert all(_same(x, y) for x, y in zip(rest, reference[k:])), f"diverged after resuming at step {k}"


def test_dp_ranks_partition_the_global_batch():
    stream = _long_stream()
    dp, local = 3, 2
    single = _take(TokenLoader(stream, 8, dp * local, seed=5), 12)
    ranks = [_take(TokenLoader(stream, 8, local, dp_rank=r, dp_size=dp, seed=5), 12) for r in range(dp)]
    for step in range(12):
        union = torch.cat([ranks[r][step].tokens for r in range(dp)])
        assert torch.equal(union, single[step].tokens)
        assert torch.equal(torch.cat([ranks[r][step].positions for r in range(dp)]), single[step].positions)


def test_resume_with_a_different_dp_size():
    """4 ranks x 2 samples for k steps, then 2 ranks x 4 samples: the same global batches."""
    stream = _long_stream()
    reference = _take(TokenLoader(stream, 8, 8, seed=2), 20)
    k = 7
    before = [TokenLoader(stream, 8, 2, dp_rank=r, dp_size=4, seed=2) for r in range(4)]
    for loader in before:
        _take(loader, k)
    states = [loader.state_dict() for loader in before]
    assert all(s == states[0] for s in states)  # every rank holds the same (global) state
    after = [TokenLoader(stream, 8, 4, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    for loader in after:
        loader.load_state_dict(states[0])
    continued = [_take(loader, 20 - k) for loader in after]
    for step in range(20 - k):
        union = torch.cat([continued[r][step].tokens for r in range(2)])
        assert torch.equal(union, reference[k + step].tokens)


def _marked_streams(sizes=(40, 25, 12)):
    """Streams whose tokens name their source: stream k holds only ids in [100 k + 3, 100 k + 99]."""
    rng = np.random.default_rng(1)
    return [TokenStream.from_documents([rng.integers(100 * k + 3, 100 * k + 99, size=int(rng.integers(1, 30))).tolist()
                                        for _ in range(n)], eos_id=EOS, dtype=np.uint16, name=f"source{k}")
            for k, n in enumerate(sizes)]


def _source_of_rows(batch):
    tokens = torch.where(batch.tokens == EOS, 10**6, batch.tokens)  # EOS belongs to every source
    return (tokens.min(dim=1).values // 100).tolist()


def test_blend_draws_each_source_in_proportion_to_its_weight():
    streams, weights = _marked_streams(), [0.6, 0.3, 0.1]
    loader = TokenLoader(streams, 8, 4, dp_rank=0, dp_size=2, seed=0, weights=weights)
    steps = 150
    rows = [k for batch in _take(loader, steps) for k in _source_of_rows(batch)]
    # This rank's half of each global batch follows the shares too: a multinomial's 4 sigma, at most.
    for k, weight in enumerate(weights):
        sigma = (len(rows) * weight * (1 - weight)) ** 0.5
        assert abs(rows.count(k) - weight * len(rows)) < 4 * sigma, (k, rows.count(k), len(rows))
    # Over all ranks the counts are the weights' shares to within one sample, and reported as tokens.
    assert all(abs(d - w * steps * 8) <= 1 for d, w in zip(loader.drawn, weights))
    assert loader.tokens_drawn() == [int(d) * 8 for d in loader.drawn] and sum(loader.drawn) == steps * 8
    # The smallest source was drawn more often than it has samples: each of its epochs visits every sample.
    small = streams[2]
    assert loader.drawn[2] > small.num_samples(8)


def test_blend_is_deterministic_and_resumes_under_another_dp_size():
    streams, weights = _marked_streams(), [5, 3, 2]
    reference = _take(TokenLoader(streams, 8, 8, seed=4, weights=weights), 30)
    assert not all(_same(x, y) for x, y in zip(reference, _take(TokenLoader(streams, 8, 8, seed=5,
                                                                              weights=weights), 30)))
    k = 11
    before = [TokenLoader(streams, 8, 2, dp_rank=r, dp_size=4, seed=4, weights=weights) for r in range(4)]
    for loader in before:
        _take(loader, k)
    state = {key: int(v) for key, v in before[0].state_dict().items()}
    assert all(loader.state_dict() == state for loader in before)
    after = [TokenLoader(streams, 8, 4, dp_rank=r, dp_size=2, seed=4, weights=weights) for r in range(2)]
    for loader in after:
        loader.load_state_dict(state)
    continued = [_take(loader, 30 - k) for loader in after]
    for step in range(30 - k):
        for name in ("tokens", "labels", "document_ids", "positions"):
            union = torch.cat([getattr(continued[r][step], name) for r in range(2)])
            assert torch.equal(union, getattr(reference[k + step], name)), (step, name)


def test_blend_visits_every_sample_of_a_source_once_per_epoch():
    streams = _marked_streams()
    loader = TokenLoader(streams, 8, 4, seed=2, weights=[1, 1, 1])
    everything = [{tuple(r.tolist()) for r in pack_samples(s, range(s.num_samples(8)), 8).tokens} for s in streams]
    seen = [[] for _ in streams]
    epoch = loader.epoch_samples[2]  # its samples less the remainder of a division by the global batch
    assert streams[2].num_samples(8) - 4 < epoch <= streams[2].num_samples(8)
    while loader.drawn[2] < 2 * epoch:
        batch = next(iter(loader))
        for source, row in zip(_source_of_rows(batch), batch.tokens):
            seen[source].append(tuple(row.tolist()))
    first, second = seen[2][:epoch], seen[2][epoch:2 * epoch]
    assert len(set(first)) == len(set(second)) == epoch and set(first) | set(second) <= everything[2]
    assert first != second  # a fresh permutation


def test_blend_state_from_another_blend_is_rejected():
    loader = TokenLoader(_marked_streams(), 8, 2, weights=[1, 1, 1])
    other = TokenLoader(_marked_streams((40, 25, 13)), 8, 2, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="changed"):
        loader.load_state_dict(other.state_dict())


def test_validation_loader_is_ordered_and_finite():
    stream = _long_stream()
    loader = TokenLoader(stream, 8, 3, shuffle=False, infinite=False)
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    expected = pack_samples(stream, range(loader.steps_per_epoch * 3), 8).tokens
    assert torch.equal(torch.cat([b.tokens for b in batches]), expected)
    assert all(_same(a, b) for a, b in zip(list(loader), batches))  # a second pass is the same pass


def test_too_short_stream_states_the_numbers():
    stream = _hand_stream()  # 13 tokens: 3 samples of 4
    with pytest.raises(ValueError) as info:
        TokenLoader(stream, 4, 2, dp_rank=0, dp_size=2)
    message = str(info.value)
    assert "13 tokens" in message and "3 samples" in message and "needs 4" in message
    assert "local_batch_size 2 x 2 data-parallel ranks" in message


def test_state_from_another_dataset_is_rejected():
    loader = TokenLoader(_long_stream(), 8, 2)
    state = loader.state_dict()
    state["num_samples"] += 1
    with pytest.raises(ValueError, match="changed"):
        loader.load_state_dict(state)


def test_build_datasets(tmp_path, corpus_dir, tok, docs):
    tok.save(tmp_path / "tokenizer.json")
    tokenizer, (train,), (val,) = build_datasets(str(corpus_dir), "body", str(tmp_path / "tokenizer.json"),
                                                 cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert tokenizer.content_hash == tok.content_hash
    assert train.num_documents + val.num_documents == len(docs) and val.num_documents >= 1
    assert train.num_samples(16) == (train.num_tokens - 1) // 16
    batch = next(iter(TokenLoader(train, 16, 2, seed=0)))
    assert batch.tokens.shape == (2, 16)
    # The default tokenizer trained on a given corpus (here the dataset itself).
    tokenizer2, (train2,), _ = build_datasets(str(corpus_dir), "body", "default", vocab_size=300,
                                           cache_dir=tmp_path / "cache", val_fraction=0.1,
                                           tokenizer_corpus=str(corpus_dir))
    assert tokenizer2.content_hash == tok.content_hash and np.array_equal(train2.tokens, train.tokens)
    assert os.path.commonpath([tokenizer2.path, tmp_path / "cache"]) == str(tmp_path / "cache")


@pytest.mark.parametrize("suffix,compress", [(".gz", "gzip"), (".bz2", "bz2"), (".xz", "lzma")])
def test_compressed_files_read_as_their_text(tmp_path, suffix, compress):
    import importlib

    module = importlib.import_module(compress)
    lines = [json.dumps({"text": f"document {i} \u00e9"}) for i in range(3)]
    (tmp_path / f"a.jsonl{suffix}").write_bytes(module.compress("\n".join(lines).encode()))
    (tmp_path / f"b.txt{suffix}").write_bytes(module.compress("one whole document".encode()))
    assert list(open_corpus(tmp_path / f"a.jsonl{suffix}").documents()) == [f"document {i} \u00e9" for i in range(3)]
    # a directory takes compressed .jsonl/.txt files too, in sorted order
    assert list(open_corpus(tmp_path).documents()) == [f"document {i} \u00e9" for i in range(3)] + ["one whole document"]


def test_parquet_zstd_and_json_sources_read_as_their_documents(tmp_path):
    import pyarrow
    import pyarrow.parquet
    import zstandard

    pyarrow.parquet.write_table(pyarrow.table({"id": [1, 2], "body": ["row one \u00e9", "row two"]}),
                                tmp_path / "a.parquet")
    lines = "".join(json.dumps({"body": f"zstd {i}"}) + "\n" for i in range(2)).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.json").write_text(json.dumps([{"body": "array 0"}, {"body": "array 1"}]))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"a whole zstd text"))
    assert list(open_corpus(tmp_path, "body").documents()) == [
        "row one \u00e9", "row two", "zstd 0", "zstd 1", "array 0", "array 1", "a whole zstd text"]
    with pytest.raises(ValueError, match=r"a.parquet: no column 'text' \(it has: \['id', 'body'\]\)"):
        list(open_corpus(tmp_path / "a.parquet").documents())


def test_hugging_face_dataset_folders_read_as_their_train_split(tmp_path):
    """What datasets' save_to_disk writes (a Dataset, a DatasetDict) and a dataset repository's folder
    whose README.md declares its configs (parquet files of a train and a test split)."""
    import datasets

    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict({"id": [0, 1, 2], "body": ["first row", "second \u00e9", "third"]})
    test = datasets.Dataset.from_dict({"id": [9], "body": ["held out"]})
    train.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved_dict"))
    datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "no_train"))
    repository = tmp_path / "repository"
    (repository / "data").mkdir(parents=True)
    train.to_parquet(str(repository / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(repository / "data" / "test-00000-of-00001.parquet"))
    (repository / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n---\n# notes\n")
    for name in ("saved", "saved_dict", "repository"):
        corpus = open_corpus(tmp_path / name, "body")
        assert list(corpus.documents()) == ["first row", "second \u00e9", "third"], name
        assert corpus.fingerprint != open_corpus(tmp_path / name, "id").fingerprint  # the column is in the key
    with pytest.raises(ValueError, match=r"saved: no column 'text' \(it has: \['id', 'body'\]\)"):
        list(open_corpus(tmp_path / "saved").documents())
    with pytest.raises(ValueError, match=r"no_train could not be read as a Hugging Face dataset \(it holds the "
                                         r"splits \['test'\], none named 'train'\)"):
        list(open_corpus(tmp_path / "no_train", "body").documents())
    (tmp_path / "saved" / "state.json").write_text("{garbled")
    with pytest.raises(ValueError, match=r"saved could not be read as a Hugging Face dataset"):
        list(open_corpus(tmp_path / "saved", "body").documents())


def test_files_that_are_not_text_are_refused_by_name(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x03\x04" + b"\0" * 16)
    with pytest.raises(ValueError, match=r"data.zip is a zip archive, which \[data\].dataset does not read"):
        list(open_corpus(archive).documents())
    garbled = tmp_path / "data.jsonl.zst"
    garbled.write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 16)
    with pytest.raises(ValueError, match=r"data.jsonl.zst could not be read as zstd-compressed text"):
        list(open_corpus(garbled).documents())
    fake = tmp_path / "table.parquet"
    fake.write_bytes(b"PAR1\0\0PAR1")
    with pytest.raises(ValueError, match=r"table.parquet could not be read as Parquet"):
        list(open_corpus(fake).documents())
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"abc\0\x01\x02")
    with pytest.raises(ValueError, match=r"weights.txt holds binary data \(a NUL byte"):
        list(open_corpus(binary).documents())
    damaged = tmp_path / "cut.jsonl.gz"
    damaged.write_bytes(gzip_bytes(b'{"text": "a"}\n' * 1000)[:40])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz could not be read as gzip-compressed text"):
        list(open_corpus(damaged).documents())


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def test_text_that_is_not_utf8_is_decoded_with_one_warning_counting_the_replacements(tmp_path, caplog):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 na\u00efve \ufffd".encode("latin-1", errors="ignore") + "ok \ufffd".encode())
    with caplog.at_level("WARNING", logger="torchtrain.data.corpus"):
        (text,) = open_corpus(latin).documents()
    assert text.startswith("caf\ufffd na\ufffdve") and text.endswith("ok \ufffd")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the U+FFFD that was in the file is not counted
    assert warnings == [f"{latin} is not valid UTF-8: 2 undecodable byte sequences replaced by U+FFFD"]
    lines = tmp_path / "latin.jsonl"
    lines.write_bytes(b'{"text": "caf\xe9"}\n{"text": "na\xefve"}\n')
    caplog.clear()
    with caplog.at_level("WARNING", logger="torchtrain.data.corpus"):
        assert list(open_corpus(lines).documents()) == ["caf\ufffd", "na\ufffdve"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{lines} is not valid UTF-8: 2 undecodable byte sequences replaced by U+FFFD"]
