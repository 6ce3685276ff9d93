"""Checkpoint benchmark: save / load throughput of the trainer's checkpoint path against the disk itself.

    python bench/checkpoint.py                        # the recorded run (~0.3B parameters, ~3.6 GB, ~2 minutes)
    python bench/checkpoint.py --params-billion 0.5   # a bigger model (~6 GB of checkpoint)
    python bench/checkpoint.py --model debug_30m      # a registry model instead
    python bench/checkpoint.py --quick                # a smoke test (the "debug" model, seconds)
    python bench/checkpoint.py --hf                   # Hugging Face export and import (~1.2B parameters, ~4.7 GB)

What is measured. The model is built the way the trainer builds it (``build_model``: meta device ->
``parallelize`` -> ``to_empty`` -> ``init_weights``, fp32, eager), the optimizer is the trainer's
AdamW (``build_optimizer``), in a one-process gloo group (``init_distributed``). A few real
``train_step`` calls on one random batch create the AdamW moments, so the checkpoint holds what a
training run's does: parameters + exp_avg + exp_avg_sq (+ step counters), all fp32, ~12 bytes per
parameter, behind the trainer's ``state`` dict (``ModelAndOptimizer``, ``IntState``, ``RNGState``).
The default model is a Llama shape (dim 1536, 12/4 heads, FFN 4096, vocab 32000) with as many layers
as give ``--params-billion`` (default 0.3B -> ~3.6 GB of checkpoint: this machine has 24 GB of memory
and 2 cores; the async save also stages a full copy of the state in memory).

* save: ``CheckpointManager(async_mode="disabled").save(step, state)`` -- the whole call, i.e. DCP's
  planning, the writes (DCP fsyncs its files), the model record, the atomic rename and the directory
  fsync. Throughput = bytes of the checkpoint folder / seconds.
* disk: the same number of bytes written to the same folder with 64 MiB buffered ``write`` calls and
  one ``fsync``: the disk's own sequential write speed, measured in the same run, interleaved with
  the saves (disk, save, disk, save, ...); the target is save >= 50% of it (medians compared).
* load: ``CheckpointManager.load(path, state)`` into the live model and optimizer. Cold = after
  ``posix_fadvise(DONTNEED)`` on every file of the checkpoint (evicts its clean pages from the page
  cache, per file, no root needed, nothing else on the machine is touched); warm = immediately again,
  served from the page cache. The disk's read speed is measured the same way on the baseline file.
  ``DONTNEED`` is a request the kernel may partly ignore (pages still mapped or dirty stay), and the
  storage under a virtual disk may have its own cache: a "cold" read far above the disk's write speed
  betrays either, so treat cold figures as an upper bound of a truly cold read.
* checksums: each save records every file's size and CRC-32 (``own_file_checksums``, run by the rank
  that wrote the file, right after its writes, inside ``save`` above); timed again on its own, right after
  the saves (the pages still cached, as in a save), and as a share of the save. A resume verifies them
  first (``verify_files``): timed after the same eviction as a cold load, as a share of the cold load.
* async stall: ``CheckpointManager(async_mode="async").save()`` starts copying the state to CPU
  memory ("staging") and writing it, both in the background, and returns; the next step's optimizer
  step waits for the copy to finish. ``last_blocked_s`` is how long the two held the training loop
  (the save call plus that wait), read after the next step. It is compared
  with the time of one training step of the SAME model measured in this run (median of
  ``--steps`` eager steps of ``--batch-size`` x ``--seq-len`` tokens after one warm-up step); the
  target is a stall < 10% of a step. ``--step-time`` replaces the measured step time (say where it
  comes from). One training step is also timed while the background write runs, and the
  ``wait()`` that commits it, so the cost the background write puts on training is visible.

Hugging Face export and import (``--hf``, results in ``bench/results/checkpoint_hf.json``). A Llama shape
(dim 2048, 16/8 heads, FFN 5632, vocab 32000, layers for ``--params-billion``, default 1.2B) is saved
once as a DCP checkpoint of its fp32 tensors, named as the trainer names them. Then, each in fresh
processes (the figures of one never include another's memory): ``export_checkpoint`` to bf16
safetensors shards of ``--max-shard-mb`` (default 1000) with 1 process and with 2 (torchrun, gloo),
the two folders compared byte for byte; and ``load_hf_weights`` of that folder into the model on 1
process and under the trainer's FSDP2 on 2. Each process reports its wall time, its resident memory
after imports (the baseline; for import, after ``to_empty``, whose pages are not resident until
written) and its peak (``getrusage(RUSAGE_SELF).ru_maxrss``, which counts the pages of the mapped
safetensors files it touched). Export's bound: baseline + the largest tensor x 10 bytes (fp32
target, DCP's copy of the stored chunk, bf16 cast) + ``--max-shard-mb``; import's: baseline + the
rank's fp32 parameters + what it reads.

The checkpoint folder defaults to a temporary folder under ``outputs/`` (removed afterwards), on the
same file system as a training run's checkpoints. Results go to ``bench/results/checkpoint.json``
(``--out``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from provenance import check_destination, commit, cpu_name, tree_dirty, write_report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "bench" / "results" / "checkpoint.json"
TARGET_SAVE_FRACTION, TARGET_STALL_FRACTION = 0.5, 0.10
CHUNK = 64 << 20  # bytes per write() / read() of the disk baseline
SEED = 0


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout
        fields = out.splitlines()[-1].split()
        return f"{fields[0]} ({fields[1]})"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _evict(path: Path) -> None:
    """Ask the kernel to drop the (clean) cached pages of every file under ``path`` (or of ``path``)."""
    for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially (buffered writes of CHUNK bytes, then fsync)."""
    buf = os.urandom(1 << 20) * (CHUNK >> 20)  # incompressible, in case the storage compresses
    view = memoryview(buf)
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(view[: min(CHUNK, left)])
        os.fsync(f.fileno())
    return time.perf_counter() - started


def disk_read(path: Path) -> float:
    """Seconds to read ``path`` sequentially into one reused buffer."""
    buf = bytearray(CHUNK)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - started


def build(opts: argparse.Namespace):
    """The trainer's model, optimizer, state dict and one step on a random batch; returns a dict."""
    import torch

    from torchtrain.checkpoint import IntState, ModelAndOptimizer, RNGState, model_record
    from torchtrain.config import Config
    from torchtrain.data import Batch
    from torchtrain.models import get_model_args
    from torchtrain.optim import LRSchedule, build_optimizer
    from torchtrain.parallel import ParallelDims, build_mesh, init_distributed
    from torchtrain.train import StepCounter, build_model, train_step

    device = torch.device("cpu")
    config = Config()
    config.training.seq_len = opts.seq_len
    config.training.local_batch_size = opts.batch_size
    config.training.device = "cpu"
    config.training.dtype = "float32"
    config.data.document_mask = False
    config.compile.enabled = False
    if opts.model:
        config.model.name = opts.model
        args = get_model_args(opts.model)
        name = opts.model
    else:
        args = get_model_args("debug")
        args.dim, args.num_heads, args.num_kv_heads, args.ffn_dim, args.vocab_size = 1536, 12, 4, 4096, 32000
        args.num_layers = 1
        one = args.num_params(exclude_embedding=False)
        args.num_layers = 2
        per_layer = args.num_params(exclude_embedding=False) - one  # one block
        args.num_layers = max(1, round((opts.params_billion * 1e9 - (one - per_layer)) / per_layer))
        name = f"bench_{args.num_params(exclude_embedding=False) / 1e9:.2f}b"
    args.attention = "sdpa"
    args.max_seq_len = max(args.max_seq_len, opts.seq_len)
    init_distributed(device)
    dims = ParallelDims.resolve(config.parallelism, 1)
    mesh = build_mesh(dims, device)
    parts = build_model(args, config, mesh, dims, device, torch.float32)
    optimizer = build_optimizer(parts.model, config.optimizer, device)
    lr_schedule = LRSchedule(optimizer, config.lr_scheduler, 1000)
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, args.vocab_size, (opts.batch_size, opts.seq_len + 1), generator=gen)
    batch = Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                  torch.zeros((opts.batch_size, opts.seq_len), dtype=torch.int32),
                  torch.arange(opts.seq_len).expand(opts.batch_size, -1).contiguous())
    dp_group = mesh.dp.get_group()
    counter = StepCounter()

    class _Data:  # the loader's position, as the trainer stores it
        def state_dict(self):
            return {"position": 0}

        def load_state_dict(self, state):
            pass

    state = {"model_and_optimizer": ModelAndOptimizer(parts.model, optimizer), "lr_schedule": IntState(lr_schedule),
             "data": IntState(_Data()), "rng": RNGState(device), "step": IntState(counter)}

    def step() -> float:
        started = time.perf_counter()
        train_step(parts, optimizer, [batch], config, dp_group, nullcontext())
        lr_schedule.step()
        counter.step += 1
        return time.perf_counter() - started

    return {"args": args, "name": name, "state": state, "step": step, "optimizer": optimizer,
            "record": model_record(name, args),
            "params": args.num_params(exclude_embedding=False), "threads": torch.get_num_threads()}


def run(opts: argparse.Namespace) -> dict:
    from torchtrain.checkpoint import CheckpointManager, own_file_checksums, verify_files

    built = build(opts)
    state, step = built["state"], built["step"]
    print(f"model {built['name']}: {built['params'] / 1e6:.1f}M parameters; timing train steps ...", flush=True)
    step_times = [step() for _ in range(1 + opts.steps)]  # the first creates the AdamW moments
    measured_step_s = statistics.median(step_times[1:])
    step_s = opts.step_time if opts.step_time else measured_step_s

    folder = opts.folder
    sync = CheckpointManager(folder / "sync", keep_last=0, async_mode="disabled", model_record=built["record"])
    disk_file = folder / "disk-baseline.bin"
    saves, disk_writes, ckpt_bytes, last = [], [], 0, None
    for i in range(opts.repeats):
        if last is not None:
            shutil.rmtree(last)
        if ckpt_bytes:  # the first save tells how many bytes the baseline must write
            disk_file.unlink(missing_ok=True)
            disk_writes.append(disk_write(disk_file, ckpt_bytes))
        started = time.perf_counter()
        last = sync.save(i + 1, state)
        saves.append(time.perf_counter() - started)
        ckpt_bytes = _folder_bytes(last)
        print(f"  save {i + 1}: {saves[-1]:.2f}s for {ckpt_bytes / 1e9:.2f} GB", flush=True)
    disk_file.unlink(missing_ok=True)
    disk_writes.append(disk_write(disk_file, ckpt_bytes))  # one disk write after the last save too
    print(f"  disk writes: {', '.join(f'{s:.2f}s' for s in disk_writes)}", flush=True)

    loads_cold, loads_warm, reads_cold, reads_warm, sums, verifies = [], [], [], [], [], []
    for _ in range(opts.repeats):
        started = time.perf_counter()  # what a save adds after its writes (pages still cached), inside save above
        own_file_checksums(last, 0)
        sums.append(time.perf_counter() - started)
        _evict(last)
        started = time.perf_counter()  # what a resume adds before its reads, files cold
        problems = verify_files(last)
        verifies.append(time.perf_counter() - started)
        assert not problems, problems
        _evict(disk_file)
        reads_cold.append(disk_read(disk_file))
        reads_warm.append(disk_read(disk_file))
        _evict(last)
        started = time.perf_counter()
        sync.load(last, state)
        loads_cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        sync.load(last, state)
        loads_warm.append(time.perf_counter() - started)
    disk_file.unlink(missing_ok=True)
    shutil.rmtree(last)

    asy = CheckpointManager(folder / "async", keep_last=1, async_mode="async", model_record=built["record"],
                            optimizer=built["optimizer"])
    blocked, step_during, waits, totals = [], [], [], []
    for i in range(opts.repeats):
        started = time.perf_counter()
        asy.save(100 + i, state)
        step_during.append(step())  # its optimizer step waits for the staging copy, if still running
        blocked.append(asy.last_blocked_s)
        waited = time.perf_counter()
        asy.wait()
        waits.append(time.perf_counter() - waited)
        totals.append(time.perf_counter() - started)
        print(f"  async save {i + 1}: blocked {blocked[-1]:.3f}s, step during write {step_during[-1]:.2f}s, "
              f"wait {waits[-1]:.2f}s", flush=True)
    asy.close()

    gb = ckpt_bytes / 1e9
    med = statistics.median
    return {
        "model": {"name": built["name"], "params": built["params"], "dim": built["args"].dim,
                  "num_layers": built["args"].num_layers, "vocab_size": built["args"].vocab_size},
        "checkpoint_bytes": ckpt_bytes,
        "threads": built["threads"],
        "step": {"seconds": step_times[1:], "first_seconds": step_times[0], "median_s": measured_step_s,
                 "tokens": opts.seq_len * opts.batch_size, "step_time_used_s": step_s,
                 "source": "--step-time" if opts.step_time else "measured (same model, eager, this run)"},
        "save": {"seconds": saves, "median_s": med(saves), "gb_per_s": gb / med(saves)},
        "disk_write": {"seconds": disk_writes, "median_s": med(disk_writes), "gb_per_s": gb / med(disk_writes)},
        "load_cold": {"seconds": loads_cold, "gb_per_s": gb / med(loads_cold)},
        "load_warm": {"seconds": loads_warm, "gb_per_s": gb / med(loads_warm)},
        "disk_read_cold": {"seconds": reads_cold, "gb_per_s": gb / med(reads_cold)},
        "disk_read_warm": {"seconds": reads_warm, "gb_per_s": gb / med(reads_warm)},
        "async": {"blocked_s": blocked, "median_blocked_s": med(blocked), "stall_fraction": med(blocked) / step_s,
                  "step_during_write_s": step_during, "wait_s": waits, "total_s": totals,
                  "gb_per_s_end_to_end": gb / med(totals)},
        "save_fraction_of_disk": (gb / med(saves)) / (gb / med(disk_writes)),
        "checksums_at_save": {"seconds": sums, "gb_per_s": gb / med(sums), "fraction_of_save": med(sums) / med(saves)},
        "verify_cold": {"seconds": verifies, "gb_per_s": gb / med(verifies),
                        "fraction_of_load_cold": med(verifies) / med(loads_cold)},
    }


def _targets(r: dict) -> list[str]:
    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    frac, stall = r["save_fraction_of_disk"], r["async"]["stall_fraction"]
    return [
        f"save throughput: {r['save']['gb_per_s']:.2f} GB/s = {100 * frac:.0f}% of the disk's sequential write "
        f"({r['disk_write']['gb_per_s']:.2f} GB/s); target >= {100 * TARGET_SAVE_FRACTION:.0f}%: "
        f"{verdict(frac >= TARGET_SAVE_FRACTION)}",
        f"async save stall: {r['async']['median_blocked_s']:.3f}s = {100 * stall:.1f}% of a "
        f"{r['step']['step_time_used_s']:.2f}s training step ({r['step']['source']}); target < "
        f"{100 * TARGET_STALL_FRACTION:.0f}%: {verdict(stall < TARGET_STALL_FRACTION)}",
    ]


def _print_table(report: dict) -> None:
    r = report["results"]
    m = r["model"]
    print(f"\n{m['name']}: {m['params'] / 1e6:.1f}M parameters, checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB "
          f"(model + AdamW moments, fp32); folder on {report['machine']['filesystem']}; "
          f"{report['machine']['threads']} threads, {report['machine']['cpu']}")
    rows = [("save (CheckpointManager, sync)", r["save"]), ("disk sequential write + fsync", r["disk_write"]),
            ("load cold (after fadvise DONTNEED)", r["load_cold"]), ("disk read cold", r["disk_read_cold"]),
            ("load warm (page cache)", r["load_warm"]), ("disk read warm (page cache)", r["disk_read_warm"]),
            ("CRC-32 of the files after a save", r["checksums_at_save"]), ("verify before a load (cold)", r["verify_cold"])]
    print(f"{'':38s} {'GB/s':>7s} {'median s':>9s}  runs (s)")
    for label, row in rows:
        secs = row["seconds"]
        print(f"{label:38s} {row['gb_per_s']:7.2f} {statistics.median(secs):9.2f}  "
              + " ".join(f"{s:.2f}" for s in secs))
    a, s = r["async"], r["step"]
    print(f"train step ({s['tokens']} tokens, eager): median {s['median_s']:.2f}s of "
          + " ".join(f"{x:.2f}" for x in s["seconds"]) + f" (first, with AdamW state creation: {s['first_seconds']:.2f}s)")
    print(f"async save: blocked {' '.join(f'{x:.3f}' for x in a['blocked_s'])}s; step during the background write "
          f"{' '.join(f'{x:.2f}' for x in a['step_during_write_s'])}s; wait() {' '.join(f'{x:.2f}' for x in a['wait_s'])}s; "
          f"end to end {a['gb_per_s_end_to_end']:.2f} GB/s")
    print(f"checksums: {100 * r['checksums_at_save']['fraction_of_save']:.0f}% of a save's time (included in it); "
          f"verifying: {100 * r['verify_cold']['fraction_of_load_cold']:.0f}% of a cold load's time (before it)")
    print("page cache: 'cold' figures follow posix_fadvise(DONTNEED) per file; if they exceed what the disk can do, "
          "the kernel kept pages and they are warm reads in disguise.")
    for line in report["verdicts"]:
        print(line)


# ---- Hugging Face export and import at scale (--hf): time and peak memory per process

HF_OUT = REPO / "bench" / "results" / "checkpoint_hf.json"


def _hf_model_args(opts: argparse.Namespace):
    """A Llama shape of ``--params-billion`` (dim 2048, 16/8 heads, FFN 5632, vocab 32000), or the debug model (--quick)."""
    from torchtrain.models import get_model_args

    args = get_model_args("debug")
    if opts.quick:
        return args
    args.dim, args.num_heads, args.num_kv_heads, args.ffn_dim, args.vocab_size = 2048, 16, 8, 5632, 32000
    args.num_layers = 1
    one = args.num_params(exclude_embedding=False)
    args.num_layers = 2
    per_layer = args.num_params(exclude_embedding=False) - one
    args.num_layers = max(1, round((opts.params_billion * 1e9 - (one - per_layer)) / per_layer))
    return args


def _rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def hf_worker(opts: argparse.Namespace) -> None:
    """One process of a measurement (``--worker save|export|import``), started by ``hf_run`` alone or under
    torchrun; writes its figures to ``--folder/<worker>-<world>-rank<R>.json``."""
    import dataclasses
    import json
    import resource

    import torch
    import torch.distributed as dist

    from torchtrain.models import ModelArgs, Transformer

    args = ModelArgs(**json.loads(opts.model_json))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    folder = opts.folder
    baseline = _rss_bytes()  # the interpreter, torch and torchtrain imported, nothing read yet
    figures: dict = {}
    started = time.perf_counter()
    if opts.worker == "save":  # the training checkpoint to export: the model's tensors as the trainer names them
        import torch.distributed.checkpoint as dcp

        with torch.device("meta"):
            model = Transformer(args)
        model.to_empty(device="cpu")
        model.init_weights(seed=SEED)
        dcp.save({"model_and_optimizer": {"model": model.state_dict()}}, checkpoint_id=folder / "dcp", no_dist=True)
    elif opts.worker == "export":
        from torchtrain.hf_checkpoint import export_checkpoint

        out = folder / f"export-{world}"
        export_checkpoint(folder / "dcp", args, out, "llama", torch.bfloat16, max_shard_bytes=int(opts.max_shard_mb * 1e6))
        if world > 1:
            dist.barrier()
    else:  # import: the trainer's FSDP2 over the processes (none for one), then load_hf_weights
        from torchtrain.hf_checkpoint import load_hf_weights
        from torchtrain.parallel.fsdp import apply_fsdp

        with torch.device("meta"):
            model = Transformer(args)
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            apply_fsdp(model, init_device_mesh("cpu", (world,)), torch.float32, "default", False, False)
        model.to_empty(device="cpu")
        baseline = _rss_bytes()  # to_empty's parameters are not resident until written
        started = time.perf_counter()
        load_hf_weights(model, folder / "export-1", args)
        if world > 1:
            dist.barrier()
        figures["local_param_bytes"] = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    figures.update(seconds=time.perf_counter() - started, baseline_rss_bytes=baseline,
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    (folder / f"{opts.worker}-{world}-rank{rank}.json").write_text(json.dumps(figures))
    if world > 1:
        dist.destroy_process_group()


def _launch(opts: argparse.Namespace, worker: str, nproc: int, model_json: str) -> list[dict]:
    import json

    script = [os.path.abspath(__file__), "--worker", worker, "--folder", str(opts.folder), "--model-json", model_json,
              "--max-shard-mb", str(opts.max_shard_mb)]
    launch = ([sys.executable] if nproc == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    subprocess.run([*launch, *script], check=True, env=env, cwd=REPO)
    return [json.loads((opts.folder / f"{worker}-{nproc}-rank{r}.json").read_text()) for r in range(nproc)]


def hf_run(opts: argparse.Namespace) -> dict:
    """Save the model once as a DCP checkpoint (fp32), export it to bf16 safetensors with 1 and 2 processes, check
    the two folders are the same bytes, and import the export under 1 process and FSDP 2, each in fresh processes."""
    import dataclasses
    import json

    from torchtrain.models import Transformer

    args = _hf_model_args(opts)
    model_json = json.dumps(dataclasses.asdict(args))
    import torch
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Transformer(args).state_dict().items()}
    largest = max(math.prod(s) for s in shapes.values())
    params = sum(math.prod(s) for s in shapes.values())
    print(f"model: {params / 1e9:.2f}B parameters; saving the fp32 checkpoint ...", flush=True)
    save = _launch(opts, "save", 1, model_json)[0]
    ckpt_bytes = _folder_bytes(opts.folder / "dcp")
    exports, imports = {}, {}
    for nproc in (1, 2):
        print(f"export, {nproc} process(es) ...", flush=True)
        exports[nproc] = _launch(opts, "export", nproc, model_json)
    out1, out2 = opts.folder / "export-1", opts.folder / "export-2"
    names = sorted(p.name for p in out1.iterdir())
    same = names == sorted(p.name for p in out2.iterdir()) and all(
        subprocess.run(["cmp", "-s", out1 / n, out2 / n]).returncode == 0 for n in names)
    export_bytes = _folder_bytes(out1)
    shutil.rmtree(out2)
    for nproc in (1, 2):
        print(f"import, {nproc} process(es) ...", flush=True)
        imports[nproc] = _launch(opts, "import", nproc, model_json)
    mb = 1e6
    max_shard = opts.max_shard_mb * mb
    # What one export process may hold: the tensor being read (fp32) with DCP's copy of its stored chunk, its
    # bf16 cast, and the shard buffer the format's own writer would keep (ours writes each tensor as it comes).
    bound_tensor = largest * (4 + 4 + 2)
    return {
        "model": {"params": params, "dim": args.dim, "num_layers": args.num_layers, "vocab_size": args.vocab_size,
                  "largest_tensor_params": largest},
        "checkpoint_bytes": ckpt_bytes, "export_bytes": export_bytes, "export_dtype": "bfloat16",
        "max_shard_mb": opts.max_shard_mb, "save_s": save["seconds"],
        "export": {str(n): {"seconds": max(r["seconds"] for r in rs),
                            "peak_rss_mb": [r["peak_rss_bytes"] / mb for r in rs],
                            "baseline_rss_mb": [r["baseline_rss_bytes"] / mb for r in rs],
                            "bound_mb": [(r["baseline_rss_bytes"] + bound_tensor + max_shard) / mb for r in rs]}
                   for n, rs in exports.items()},
        "export_same_bytes_1_and_2_processes": same,
        "import": {str(n): {"seconds": max(r["seconds"] for r in rs),
                            "peak_rss_mb": [r["peak_rss_bytes"] / mb for r in rs],
                            "baseline_rss_mb": [r["baseline_rss_bytes"] / mb for r in rs],
                            "local_param_mb": [r["local_param_bytes"] / mb for r in rs],
                            "overhead_mb": [(r["peak_rss_bytes"] - r["baseline_rss_bytes"] - r["local_param_bytes"]) / mb
                                            for r in rs]}
                   for n, rs in imports.items()},
        "bound": "export: baseline RSS + largest tensor x (4 + 4 + 2 bytes: fp32 read, DCP's chunk, bf16 cast) + "
                 "--max-shard-mb; import: baseline + the rank's fp32 parameters + the largest block read",
    }


def _print_hf(report: dict) -> None:
    r = report["results"]
    print(f"\n{r['model']['params'] / 1e9:.2f}B parameters: checkpoint {r['checkpoint_bytes'] / 1e9:.2f} GB fp32 -> "
          f"{r['export_bytes'] / 1e9:.2f} GB bf16; {report['machine']['cpu']}")
    for n, e in r["export"].items():
        print(f"export, {n} process(es): {e['seconds']:.1f}s; peak RSS per process "
              f"{', '.join(f'{x:.0f}' for x in e['peak_rss_mb'])} MB (bound {', '.join(f'{x:.0f}' for x in e['bound_mb'])} MB; "
              f"baseline {', '.join(f'{x:.0f}' for x in e['baseline_rss_mb'])} MB)")
    print(f"same bytes from 1 and 2 processes: {r['export_same_bytes_1_and_2_processes']}")
    for n, i in r["import"].items():
        print(f"import, {n} process(es): {i['seconds']:.1f}s; peak RSS per process "
              f"{', '.join(f'{x:.0f}' for x in i['peak_rss_mb'])} MB, of which parameters "
              f"{', '.join(f'{x:.0f}' for x in i['local_param_mb'])} MB, baseline "
              f"{', '.join(f'{x:.0f}' for x in i['baseline_rss_mb'])} MB, the rest "
              f"{', '.join(f'{x:.0f}' for x in i['overhead_mb'])} MB")


def command_line(argv: list[str] | None) -> str:
    """The command that ran this benchmark, as recorded beside its figures."""
    return "python " + " ".join([os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)])


def measure_in_folder(a: argparse.Namespace, prefix: str, measure) -> tuple[dict, float, str]:
    """``measure(a)`` writing under ``a.folder`` (default: a temporary folder under outputs/, removed
    afterwards): its results, its wall time in seconds and the folder's filesystem."""
    own_folder = a.folder is None
    if own_folder:
        (REPO / "outputs").mkdir(exist_ok=True)
        a.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=REPO / "outputs"))
    a.folder.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        results = measure(a)
        wall = time.perf_counter() - started
        filesystem = _filesystem(a.folder)
    finally:
        if own_folder:
            shutil.rmtree(a.folder, ignore_errors=True)
    return results, wall, filesystem


def machine(filesystem: str) -> dict:
    """What the figures depend on: CPU, memory, the written folder's filesystem, Python."""
    return {"cpu": cpu_name(), "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "filesystem": filesystem, "python": platform.python_version()}


def hf_main(a: argparse.Namespace, argv: list[str] | None) -> None:
    import torch

    results, wall, filesystem = measure_in_folder(a, "bench-checkpoint-hf-", hf_run)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv), "commit": commit(), "dirty": tree_dirty(),
        "machine": {**machine(filesystem), "torch": torch.__version__},
        "options": {"params_billion": None if a.quick else a.params_billion, "quick": a.quick,
                    "max_shard_mb": a.max_shard_mb},
        "wall_s": wall,
        "results": results,
    }
    _print_hf(report)
    write_report(a.out, report)
    print(f"results written to {a.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params-billion", type=float, default=None,
                   help="size of the default Llama-shaped model (default 0.3: ~3.6 GB of checkpoint; with --hf 1.2: "
                        "~4.7 GB)")
    p.add_argument("--hf", action="store_true",
                   help="measure Hugging Face export (1 and 2 processes) and import (1 process, FSDP 2) instead; "
                        f"results to {HF_OUT.relative_to(REPO)}")
    p.add_argument("--max-shard-mb", type=float, default=1000.0, help="--hf: the export's largest file, in MB")
    p.add_argument("--worker", choices=["save", "export", "import"], help=argparse.SUPPRESS)
    p.add_argument("--model-json", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="a registry model instead of --params-billion")
    p.add_argument("--folder", type=Path, default=None,
                   help="where to write (default: a temporary folder under outputs/, removed afterwards)")
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT.relative_to(REPO)}")
    p.add_argument("--quick", action="store_true", help="the 'debug' model, one repeat: a smoke test")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed train steps (after one warm-up step)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--step-time", type=float, default=None,
                   help="seconds per training step to judge the async stall against (default: measured)")
    a = p.parse_args(argv)
    if a.worker:
        return hf_worker(a)
    a.out = a.out or (HF_OUT if a.hf else DEFAULT_OUT)
    a.params_billion = a.params_billion or (1.2 if a.hf else 0.3)
    check_destination(a.out)
    if a.hf:
        return hf_main(a, argv)
    if a.quick:
        a.model, a.repeats, a.steps, a.seq_len = a.model or "debug", 1, 1, 128
    own_folder = a.folder is None
    results, wall, filesystem = measure_in_folder(a, "bench-checkpoint-", run)
    import torch

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "commit": commit(),
        "dirty": tree_dirty(),
        "machine": {**machine(filesystem), "threads": results["threads"], "torch": torch.__version__},
        "options": {"repeats": a.repeats, "steps": a.steps, "seq_len": a.seq_len, "batch_size": a.batch_size,
                    "params_billion": None if a.model else a.params_billion, "model": a.model,
                    "step_time": a.step_time, "folder": "temporary under outputs/" if own_folder else str(a.folder)},
        "targets": {"save_fraction_of_disk_write": TARGET_SAVE_FRACTION, "async_stall_fraction": TARGET_STALL_FRACTION},
        "wall_s": wall,
        "results": results,
    }
    report["verdicts"] = _targets(results)
    _print_table(report)
    write_report(a.out, report)
    print(f"results written to {a.out}")


if __name__ == "__main__":
    main()
