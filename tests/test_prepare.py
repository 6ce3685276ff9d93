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
from torchtrain.config import load_config
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
    tokenizer, (train,), _ = build_datasets(str(out), tokenizer_spec="default", val_fraction=VAL_FRACTION)
    assert tokenizer.vocab_size == 400 and tokenizer.content_hash == manifest["tokenizer"]["content_hash"]
    first = train.document(0)
    assert tokenizer.decode(first[:-1].tolist()) == next(open_corpus(str(corpus)).documents())


def test_a_blended_run_draws_its_sources_by_weight_and_validates_each(corpus, prepared, tmp_path):
    """A prepared folder (weight 3) blended with raw files (weight 1); two held-out validation sources."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    blend = json.dumps([{"dataset": str(prepared), "weight": 3, "name": "prepared"},
                        {"dataset": str(corpus / "a.jsonl"), "weight": 1}])
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"text": f"def held_out_{i}(x):\n    return x * {i}\n" * 40}) + "\n"
                                for i in range(20)))
    result = run(tmp_path / "run", "--data.blend", blend, "--data.cache_dir", str(tmp_path / "cache"),
                 "--data.validation", json.dumps([str(prepared), str(held_out)]), "--checkpoint.enabled", "false")
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    drawn = {name: events.Scalars(f"data/tokens/{name}")[-1].value for name in ("prepared", "a.jsonl")}
    samples = 8 * 4  # steps x global batch
    assert drawn == {"prepared": 0.75 * samples * 64, "a.jsonl": 0.25 * samples * 64}
    per_source = {name: events.Scalars(f"loss/val/{name}")[-1].value for name in ("tokens", "held_out.jsonl")}
    assert result.val_losses[8] == pytest.approx(sum(per_source.values()) / 2)
    assert per_source["held_out.jsonl"] < per_source["tokens"]  # the repetitive held-out text is the easier
    saved = load_config(tmp_path / "run" / "config.toml").data  # the recipe the run saved reads back the same
    assert [(s.dataset, s.weight, s.name) for s in saved.blend] == [(str(prepared), 3.0, "prepared"),
                                                                    (str(corpus / "a.jsonl"), 1.0, "")]


def test_a_hugging_face_dataset_prepared_with_a_model_folders_tokenizer(tokenizer, tmp_path):
    """A saved ``datasets`` dataset, tokenised with a Llama-style model folder's tokenizer (its template adds
    BOS; its tokenizer_config.json names BOS and EOS): every document starts with BOS and ends with EOS, the
    folder carries both files, and the trainer opens it with that tokenizer or with its own copy."""
    import datasets
    import tokenizers
    from torchtrain.data import build_datasets

    datasets.disable_progress_bars()
    texts = [f"def f{i}(x):\n    return x + {i}\n" * (i + 1) for i in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    model = tmp_path / "model"
    model.mkdir()
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_id)])
    backend.save(str(model / "tokenizer.json"))
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))

    out = tmp_path / "tokens"
    manifest = prepare(str(tmp_path / "saved"), str(model), out, workers=1, val_fraction=VAL_FRACTION)
    assert manifest["tokenizer"]["add_bos"] and manifest["sources"]["saved"]["documents"] == 30
    assert (out / "tokenizer_config.json").read_bytes() == (model / "tokenizer_config.json").read_bytes()
    for spec in (str(model), "default"):
        _, (train,), (val,) = build_datasets(str(out), tokenizer_spec=spec, val_fraction=VAL_FRACTION)
        assert train.num_documents + val.num_documents == 30
        for stream in (train, val):
            for j in range(stream.num_documents):
                document = stream.document(j)
                assert document[0] == tokenizer.bos_id and document[-1] == tokenizer.eos_id
                assert tokenizer.decode(document[1:-1].tolist()) == texts[stream.doc_indices[j]]
    with pytest.raises(ValueError, match="prepared with the tokenizer"):  # the same vocabulary, without BOS
        open_prepared(out, tokenizer)


def test_a_run_goes_on_with_a_blend_only_when_asked_and_then_from_the_blends_beginning(corpus, prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchtrain.config import ConfigError

    out = tmp_path / "run"
    run(out, "--training.steps", "4", "--data.dataset", str(prepared), "--training.val_every", "0")
    blend = json.dumps([{"dataset": str(prepared), "weight": 1}, {"dataset": str(corpus / "a.jsonl"), "weight": 1}])
    more = ["--training.steps", "6", "--data.blend", blend, "--data.cache_dir", str(tmp_path / "cache"),
            "--training.val_every", "0"]
    with pytest.raises(ConfigError, match=r"data.blend: checkpoint \[\], recipe .*--checkpoint.resume true"):
        run(out, *more)
    resumed = run(out, *more, "--checkpoint.resume", "true")
    assert sorted(resumed.losses) == [5, 6]  # the model, optimizer and step went on
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    drawn = [events.Scalars(f"data/tokens/{name}")[-1].value for name in ("tokens", "a.jsonl")]
    assert drawn == [4 * 64, 4 * 64]  # two steps of 4 samples of 64 tokens, from the blend's beginning
