"""Data benchmark: ``torchtrain.data.prepare`` throughput and memory, and a run's start-up on its output.

    python bench/data.py                  # the recorded run: a ~100 MB generated corpus, 1 and 2 workers
    python bench/data.py --megabytes 20   # smaller
    python bench/data.py --quick          # a smoke test (seconds)

What is measured, in one run:

* the corpus: ``--megabytes`` of text generated from the standard library's sources (each document a
  source file with its lines shuffled by a seeded generator, so the text is real code and the corpus can be
  any size), written as ``.jsonl.zst`` files of ~16 MB;
* prepare: ``python -m torchtrain.data.prepare`` in a child process, with 1 and with ``--workers`` workers,
  the embedded tokenizer; wall time, tokens per second (all workers) and per worker, and the peak resident
  memory of the whole process tree (``ru_maxrss`` of the main process and of its largest worker, from
  ``getrusage``: the children's figure is the largest single child, not a sum, so the sum of the two is
  what is reported, an upper bound of the main process plus one worker), and shard bytes per token;
* the same with Hugging Face ``datasets``, as its users tokenise a corpus: ``load_dataset("json",
  data_files=...)`` (which first converts the files into its Arrow cache, a fresh one per run) and
  ``.map(batched=True, num_proc=N)`` calling the same ``tokenizers`` tokenizer's ``encode_batch_fast`` and
  appending EOS, into its Arrow cache; wall time of both steps together and the same peak memory figure;
* start-up: ``open_prepared`` and the first ``TokenLoader`` batch on the result, and on a folder of 1,000
  shards (``--shard-tokens`` chosen so), the time a run spends before its first step on data.

Results go to ``bench/results/data.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import provenance

sys.path.insert(0, str(provenance.REPO))

DEFAULT_OUT = provenance.RESULTS / "data.json"


def generate_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    """Write about ``megabytes`` of documents as ``.jsonl.zst`` files; return the bytes of text written."""
    import zstandard

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [p.read_text(errors="replace") for p in sources]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    target, written, part = megabytes * 1e6, 0, 0
    while written < target:
        lines = []
        size = 0
        while size < 16e6 and written + size < target:
            text = rng.choice(texts).splitlines()
            rng.shuffle(text)
            document = "\n".join(text)
            lines.append(json.dumps({"text": document}))
            size += len(document)
        (folder / f"part-{part:04d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress(("\n".join(lines) + "\n").encode()))
        written, part = written + size, part + 1
    return written


def run_prepare(corpus: Path, out: Path, workers: int, shard_tokens: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", _MEASURED, str(corpus), str(out), str(workers), str(shard_tokens)],
                   check=True, cwd=provenance.REPO, env=dict(os.environ, PYTHONPATH=str(provenance.REPO)))
    seconds = time.perf_counter() - started
    rss = json.loads((out / "rss.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    shard_bytes = sum(sh["bytes"] for s in ("train", "val") for sh in manifest["splits"][s]["shards"])
    return {"workers": workers, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_worker": tokens / seconds / workers, "peak_rss_mb": rss["main_mb"] + rss["worker_mb"],
            "peak_rss_main_mb": rss["main_mb"], "peak_rss_largest_worker_mb": rss["worker_mb"],
            "shards": len(manifest["splits"]["train"]["shards"]), "bytes_per_token": shard_bytes / tokens}


# The prepare run, in a child whose getrusage sees only its own process tree.
_MEASURED = """
import json, resource, sys
from torchtrain.data.prepare import prepare
corpus, out, workers, shard_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prepare(corpus, "default", out, workers=workers, shard_tokens=shard_tokens)
usage = lambda who: resource.getrusage(who).ru_maxrss / 1024
open(out + "/rss.json", "w").write(json.dumps({"main_mb": usage(resource.RUSAGE_SELF),
                                                "worker_mb": usage(resource.RUSAGE_CHILDREN)}))
"""


def run_datasets_map(corpus: Path, cache: Path, workers: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _DATASETS, str(corpus), str(cache), str(workers)], check=True,
                         capture_output=True, text=True, cwd=provenance.REPO,
                         env=dict(os.environ, PYTHONPATH=str(provenance.REPO), HF_DATASETS_CACHE=str(cache),
                                  HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")).stdout
    seconds = time.perf_counter() - started
    measured = json.loads(out.strip().splitlines()[-1])
    return {"workers": workers, "seconds": seconds, "load_s": measured["load_s"], "map_s": measured["map_s"],
            "tokens": measured["tokens"], "tokens_per_s": measured["tokens"] / seconds,
            "tokens_per_s_per_worker": measured["tokens"] / seconds / workers,
            "peak_rss_mb": measured["main_mb"] + measured["worker_mb"], "peak_rss_main_mb": measured["main_mb"],
            "peak_rss_largest_worker_mb": measured["worker_mb"],
            "cache_bytes": sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())}


# Hugging Face datasets' way, in a child whose getrusage sees only its own process tree.
_DATASETS = """
import json, resource, sys, time
from pathlib import Path
import datasets
from torchtrain.data import load_tokenizer
corpus, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
datasets.disable_progress_bars()
tokenizer = load_tokenizer("default")
backend, eos = tokenizer.backend, tokenizer.eos_id
def tokenize(batch):
    return {"input_ids": [e.ids + [eos] for e in backend.encode_batch_fast(batch["text"], add_special_tokens=False)]}
t = time.perf_counter()
dataset = datasets.load_dataset("json", data_files=sorted(map(str, Path(corpus).glob("*.jsonl.zst"))),
                                split="train", cache_dir=cache)
loaded = time.perf_counter()
tokens = dataset.map(tokenize, batched=True, num_proc=workers if workers > 1 else None, remove_columns=["text"])
mapped = time.perf_counter()
count = sum(len(ids) for batch in tokens.iter(batch_size=10_000) for ids in batch["input_ids"])
usage = lambda who: resource.getrusage(who).ru_maxrss / 1024
print(json.dumps({"load_s": loaded - t, "map_s": mapped - loaded, "tokens": count,
                  "main_mb": usage(resource.RUSAGE_SELF), "worker_mb": usage(resource.RUSAGE_CHILDREN)}))
"""


def startup(folder: Path, seq_len: int = 2048, batch: int = 8) -> dict:
    """Seconds to open a prepared folder and cut the first batch from it, in a fresh process."""
    code = ("import time, sys; t = time.perf_counter()\n"
            "from torchtrain.data import TokenLoader, load_tokenizer\n"
            "from torchtrain.data.prepared import open_prepared\n"
            "imported = time.perf_counter()\n"
            f"streams = open_prepared(sys.argv[1], load_tokenizer(sys.argv[1] + '/tokenizer.json'))\n"
            f"opened = time.perf_counter()\n"
            f"next(iter(TokenLoader(streams['train'], {seq_len}, {batch})))\n"
            "print(imported - t, opened - imported, time.perf_counter() - opened)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True, text=True,
                         cwd=provenance.REPO, env=dict(os.environ, PYTHONPATH=str(provenance.REPO))).stdout.split()
    imports, opened, first = map(float, out)
    return {"import_s": imports, "open_s": opened, "first_batch_s": first, "total_after_import_s": opened + first}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    provenance.check_destination(args.out)
    megabytes = 2.0 if args.quick else args.megabytes
    with tempfile.TemporaryDirectory(dir=provenance.REPO / "outputs" if (provenance.REPO / "outputs").is_dir()
                                     else None) as tmp:
        tmp = Path(tmp)
        text_bytes = generate_corpus(tmp / "corpus", megabytes)
        corpus_bytes = sum(p.stat().st_size for p in (tmp / "corpus").iterdir())
        print(f"corpus: {text_bytes / 1e6:.0f} MB of text in {corpus_bytes / 1e6:.0f} MB of .jsonl.zst", flush=True)
        runs = []
        for workers in sorted({1, args.workers}):
            runs.append(run_prepare(tmp / "corpus", tmp / f"tokens-{workers}", workers, 1 << 24))
            r = runs[-1]
            print(f"prepare, {workers} worker(s): {r['seconds']:.1f}s, {r['tokens_per_s'] / 1e6:.2f} M tokens/s "
                  f"({r['tokens_per_s_per_worker'] / 1e6:.2f} M per worker), peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(main {r['peak_rss_main_mb']:.0f} + largest worker {r['peak_rss_largest_worker_mb']:.0f}), "
                  f"{r['bytes_per_token']:.1f} bytes/token", flush=True)
        reference = []
        for workers in sorted({1, args.workers}):
            reference.append(run_datasets_map(tmp / "corpus", tmp / f"hf-cache-{workers}", workers))
            r = reference[-1]
            assert r["tokens"] == runs[0]["tokens"], (r["tokens"], runs[0]["tokens"])  # the same work
            print(f"datasets.map, num_proc {workers}: {r['seconds']:.1f}s (load {r['load_s']:.1f}s, map "
                  f"{r['map_s']:.1f}s), {r['tokens_per_s'] / 1e6:.2f} M tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(main {r['peak_rss_main_mb']:.0f} + largest worker {r['peak_rss_largest_worker_mb']:.0f}), "
                  f"cache {r['cache_bytes'] / 1e6:.0f} MB", flush=True)
        ratios = [{"workers": ours["workers"], "throughput_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
                   "peak_rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
                  for ours, theirs in zip(runs, reference)]
        for r in ratios:
            print(f"{r['workers']} worker(s): prepare / datasets.map throughput {r['throughput_ratio']:.2f}x, "
                  f"peak memory {r['peak_rss_ratio']:.2f}x", flush=True)
        tokens = runs[-1]["tokens"]
        many = run_prepare(tmp / "corpus", tmp / "tokens-many", args.workers, max(tokens // 1000, 1))
        start_few = startup(tmp / f"tokens-{args.workers}")
        start_many = startup(tmp / "tokens-many")
        print(f"start-up: {runs[-1]['shards']} shards {start_few['total_after_import_s']:.2f}s, "
              f"{many['shards']} shards {start_many['total_after_import_s']:.2f}s (after imports of "
              f"{start_many['import_s']:.1f}s)", flush=True)
    report = {
        "benchmark": "data", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": provenance.commit(), "working_tree_dirty": provenance.tree_dirty(),
        "machine": {"cpu": provenance.cpu_name(), "cpus": os.cpu_count()},
        "corpus": {"text_bytes": text_bytes, "file_bytes": corpus_bytes, "format": ".jsonl.zst"},
        "prepare": runs, "datasets_map": reference, "ratios": ratios,
        "startup": {"shards": runs[-1]["shards"], **start_few},
        "startup_many_shards": {"shards": many["shards"], **start_many},
    }
    provenance.write_report(args.out, report)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
