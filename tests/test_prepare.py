"""``python -m torchtrain.data.prepare``: parallel, resumable tokenisation into shards, and training from them.

The instrument is the trainer's own cache (``build_shards``, one process, whole corpus at once): a prepared
folder must hold exactly its token streams, and a run must train on it with exactly its losses.
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from launcher import REPO
from test_train import run
from torchtrain.data import build_shards, load_tokenizer, open_corpus
from torchtrain.data import prepare as prepare_module
from torchtrain.data.prepare import prepare
from torchtrain.data.prepared import open_prepared

VAL_FRACTION = 0.1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """60 documents: 40 in one .jsonl, 20 as .txt files (stdlib sources)."""
    folder = tmp_path_factory.mktemp("corpus")
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    with open(folder / "a.jsonl", "w") as f:
        for path in sources[:40]:
            f.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    for path in sources[40:]:
        (folder / f"{path.stem}.txt").write_text(path.read_text(errors="replace"))
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "tokens"
    subprocess.run([sys.executable, "-m", "torchtrain.data.prepare", "--dataset", str(corpus), "--out", str(out),
                    "--workers", "2", "--shard-tokens", "50000", "--val-fraction", str(VAL_FRACTION)],
                   check=True, cwd=REPO, capture_output=True)
    return out


def test_prepared_shards_hold_the_trainers_own_token_streams(corpus, prepared, tokenizer, tmp_path):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 3  # several shards, read back as one stream
    cached = build_shards(open_corpus(str(corpus)), tokenizer, tmp_path / "cache", VAL_FRACTION)
    streams = open_prepared(prepared, tokenizer)
    for split in ("train", "val"):
        assert streams[split].num_tokens == cached[split].num_tokens > 0, split
        np.testing.assert_array_equal(streams[split].tokens[0:streams[split].num_tokens], cached[split].tokens)
        np.testing.assert_array_equal(streams[split].doc_offsets, cached[split].doc_offsets)
        np.testing.assert_array_equal(streams[split].doc_indices, cached[split].doc_indices)
    # Per-source counts add up, and the tokenizer is recorded with its identity.
    assert set(manifest["sources"]) == {"a.jsonl", *(p.name for p in corpus.glob("*.txt"))}
    assert sum(s["tokens"] for s in manifest["sources"].values()) == sum(
        manifest["splits"][split]["tokens"] for split in ("train", "val"))
    assert manifest["tokenizer"]["content_hash"] == tokenizer.content_hash
    assert manifest["tokenizer"]["eos_id"] == tokenizer.eos_id


def test_an_interrupted_preparation_continues_to_the_same_shards(corpus, prepared, monkeypatch, tmp_path):
    out = tmp_path / "tokens"
    closes = []
    original = prepare_module._Shard.close

    def close_then_stop(shard):
        closes.append(shard.name)
        if len(closes) == 5:  # two shard pairs are recorded, the third is being closed: stop, as a kill would
            raise KeyboardInterrupt
        return original(shard)

    monkeypatch.setattr(prepare_module._Shard, "close", close_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), "default", out, workers=2, val_fraction=VAL_FRACTION, shard_tokens=50000)
    assert not (out / "manifest.json").exists() and (out / "progress.json").exists()
    monkeypatch.setattr(prepare_module._Shard, "close", original)
    manifest = prepare(str(corpus), "default", out, workers=2, val_fraction=VAL_FRACTION, shard_tokens=50000)
    whole = json.loads((prepared / "manifest.json").read_text())
    assert manifest["splits"] == whole["splits"] and manifest["sources"] == whole["sources"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in prepared.iterdir())


def test_a_run_trains_on_a_prepared_folder_as_on_its_corpus(corpus, prepared, tmp_path):
    common = ["--training.steps", "3", "--training.val_every", "3", "--checkpoint.enabled", "false",
              "--data.val_fraction", str(VAL_FRACTION)]
    from_corpus = run(tmp_path / "corpus", "--data.dataset", str(corpus), *common)
    from_prepared = run(tmp_path / "prepared", "--data.dataset", str(prepared), *common)
    assert from_prepared.losses == from_corpus.losses and from_prepared.val_losses == from_corpus.val_losses


def test_a_prepared_folder_refuses_another_tokenizer(prepared, tmp_path):
    other = tmp_path / "tokenizer.json"
    other.write_text(Path(load_tokenizer("default").path).read_text() + "\n")  # other bytes, another identity
    with pytest.raises(ValueError, match="was prepared with the tokenizer .* set data.tokenizer to the one"):
        open_prepared(prepared, load_tokenizer(str(other)))


def test_a_tokenizer_trained_on_the_users_corpus_travels_with_the_folder(corpus, tmp_path):
    from torchtrain.data import build_datasets

    out = tmp_path / "tokens"
    manifest = prepare(str(corpus), "default", out, workers=1, val_fraction=VAL_FRACTION, train_tokenizer=400,
                       tokenizer_sample_bytes=200_000)
    assert manifest["tokenizer"]["vocab_size"] == 400 and (out / "tokenizer.json").is_file()
    # data.tokenizer "default" on a prepared folder is the folder's own tokenizer, and its tokens are the folder's.
    tokenizer, train, _ = build_datasets(str(out), tokenizer_spec="default", val_fraction=VAL_FRACTION)
    assert tokenizer.vocab_size == 400 and tokenizer.content_hash == manifest["tokenizer"]["content_hash"]
    first = train.document(0)
    assert tokenizer.decode(first[:-1].tolist()) == next(open_corpus(str(corpus)).documents())
