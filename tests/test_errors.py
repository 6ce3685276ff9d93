"""A user's mistakes, through the command line users type: one `error:` line, exit status 2, no traceback.

Each case runs ``torchtrain.train.main`` (what ``python -m torchtrain.train`` and torchrun's workers run)
with the default recipe and one mistake: a recipe value, an override, a data file or a checkpoint. It
must end with exit status 2 and exactly one line on stderr, ``error: ...``, naming the key or the file;
any other exception would fail the test with its traceback. A run that already saved checkpoints in
the output folder must find them byte for byte as they were.
"""

import bz2
import gzip
import shutil
from pathlib import Path

import pytest

from launcher import REPO, torchrun
from test_train import run, tiny
from torchtrain.train import main

RECIPE = str(REPO / "recipes/debug.toml")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """An output folder holding a finished run's checkpoints (steps 2 and 4)."""
    out = tmp_path_factory.mktemp("saved")
    run(out, "--training.steps", "4", "--checkpoint.every", "2", "--training.val_every", "0")
    return out


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _data(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


# (id, overrides or a function of (tmp, saved) returning them, what the message must name)
CASES = [
    ("steps zero", ["--training.steps", "0"], "training.steps = 0"),
    ("lr nan", ["--optimizer.lr", "nan"], "optimizer.lr"),
    ("lr negative", ["--optimizer.lr", "-1"], "optimizer.lr = -1.0"),
    ("lr not a number", ["--optimizer.lr", "fast"], "optimizer.lr = 'fast' is not a valid finite number"),
    ("dtype", ["--training.dtype", "float16"], "training.dtype = 'float16'"),
    ("model name", ["--model.name", "llama9"], "llama9"),
    ("attention backend", ["--model.attention", "flashy"], "model.attention"),
    ("unknown section", ["--trainig.steps", "5"], "trainig"),
    ("unknown key", ["--training.stepz", "5"], "training.stepz"),
    ("malformed override", ["--training.steps"], "--training.steps"),
    ("layout vs world size", ["--parallelism.dp_shard", "2"], "parallelism"),
    ("tp zero", ["--parallelism.tp", "0"], "parallelism.tp = 0"),
    ("pipeline schedule", ["--parallelism.pp_schedule", "zigzag"], "parallelism.pp_schedule"),
    ("collective timeout", ["--parallelism.collective_timeout_s", "0"], "parallelism.collective_timeout_s"),
    ("lr schedule", ["--lr_scheduler.name", "exp"], "lr_scheduler.name"),
    ("val fraction", ["--data.val_fraction", "1.5"], "data.val_fraction"),
    ("blend key misspelt", ["--data.blend", '[{"dataset": "stdlib", "wieght": 2}]'],
     "is not a valid list of tables with the keys dataset, weight, name"),
    ("blend weight", ["--data.blend", '[{"dataset": "stdlib", "weight": 0}]'], "weights must be positive"),
    ("blend source missing", lambda tmp, saved: ["--data.blend", f'[{{"dataset": "{tmp}/nowhere.jsonl"}}]'],
     "nowhere.jsonl"),
    ("validation source missing", lambda tmp, saved: ["--data.validation", f'["{tmp}/held_out"]'], "held_out"),
    ("checkpointing mode", ["--activation_checkpoint.mode", "some"], "activation_checkpoint.mode"),
    ("async mode", ["--checkpoint.async_mode", "later"], "checkpoint.async_mode"),
    ("resume word", ["--checkpoint.resume", "maybe"], "checkpoint.resume = 'maybe'"),
    ("overwrite without resume false", ["--checkpoint.overwrite", "true"], "checkpoint.overwrite"),
    ("uncatchable signal", ["--job.preemption_signals", '["SIGKILL"]'], "job.preemption_signals"),
    ("negative stall factor", ["--job.stall_factor", "-1"], "job.stall_factor"),
    ("sequence beyond the model", ["--training.seq_len", "100000"], "seq_len"),
    ("float8 on CPU", ["--float8.enabled", "true"], "float8"),
    ("missing recipe", lambda tmp, saved: ["--config", str(tmp / "nope.toml")], "nope.toml"),
    ("recipe syntax", lambda tmp, saved: ["--config", _data(tmp, "bad.toml", b"[training\nsteps = 2\n")], "bad.toml"),
    ("recipe unknown section", lambda tmp, saved: ["--config", _data(tmp, "sec.toml", b"[trainer]\nsteps = 2\n")],
     "trainer"),
    ("dataset missing", lambda tmp, saved: ["--data.dataset", str(tmp / "corpus.txt")], "corpus.txt"),
    ("dataset empty", lambda tmp, saved: ["--data.dataset", _data(tmp, "empty.txt", b"")], "empty.txt"),
    ("dataset too short", lambda tmp, saved: ["--data.dataset", _data(tmp, "short.txt", b"def f(): pass\n")],
     "data.dataset"),
    ("dataset zstd", lambda tmp, saved: ["--data.dataset", _data(tmp, "c.jsonl.zst", b"(\xb5/\xfd\x00")],
     "c.jsonl.zst"),
    ("dataset parquet", lambda tmp, saved: ["--data.dataset", _data(tmp, "c.parquet", b"PAR1\x00\x00PAR1")],
     "c.parquet"),
    ("dataset binary", lambda tmp, saved: ["--data.dataset", _data(tmp, "c.bin", bytes(range(256)) * 64)], "c.bin"),
    ("dataset gzip of nothing", lambda tmp, saved: ["--data.dataset", _data(tmp, "e.txt.gz", gzip.compress(b""))],
     "e.txt.gz"),
    ("dataset bad bzip2", lambda tmp, saved: ["--data.dataset", _data(tmp, "b.txt.bz2", bz2.compress(b"x")[:20])],
     "b.txt.bz2"),
    ("initial load path", lambda tmp, saved: ["--checkpoint.initial_load_path", str(tmp / "no_model")], "no_model"),
    ("another model's checkpoints", lambda tmp, saved: ["--job.output_dir", str(saved), "--model.name", "debug_30m"],
     "checkpoints of another run"),
    ("another dataset's checkpoints", lambda tmp, saved: ["--job.output_dir", str(saved), "--training.seq_len", "32"],
     "training.seq_len: checkpoint 64, recipe 32"),
    ("start over without overwrite",
     lambda tmp, saved: ["--job.output_dir", str(saved), "--checkpoint.resume", "false"], "checkpoint.overwrite true"),
    ("resume with nothing", lambda tmp, saved: ["--job.output_dir", str(tmp / "new"), "--checkpoint.resume", "true"],
     "holds no checkpoint"),
]


@pytest.mark.parametrize("overrides,named", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_mistake_ends_in_one_error_line(tmp_path, saved, capsys, overrides, named):
    if callable(overrides):
        overrides = overrides(tmp_path, saved)
    before = _files(saved / "checkpoints")
    argv = (["--config", RECIPE] if "--config" not in overrides else []) + tiny(tmp_path / "out", *overrides)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert stopped.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0], lines[0]
    assert _files(saved / "checkpoints") == before


def test_every_damaged_checkpoint_ends_in_one_error_line_and_is_left_as_it_was(tmp_path, saved, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved / "checkpoints", out / "checkpoints")
    for step in (2, 4):
        shard = max((out / f"checkpoints/step-{step:08d}").glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:1000])
    before = _files(out / "checkpoints")
    with pytest.raises(SystemExit) as stopped:
        main(["--config", RECIPE, *tiny(out, "--training.steps", "6")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: checkpoint ") and "step-00000004: __0_0.distcp has 1000 bytes" in lines[0]
    assert "no older checkpoint" in lines[0]
    assert _files(out / "checkpoints") == before


def test_under_torchrun_rank_0_says_it_once(tmp_path):
    proc = torchrun(2, REPO / "torchtrain/train.py", "--config", RECIPE,
                    *tiny(tmp_path, "--optimizer.lr", "nan"), check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "optimizer.lr" in proc.stderr, proc.stderr[-3000:]
    # torchrun itself reports a failed worker with its own summary (and a traceback of its launcher); the
    # workers' status is 2 and no frame of ours is in it.
    assert "exitcode  : 2" in proc.stderr and f'File "{REPO / "torchtrain"}' not in proc.stderr, proc.stderr[-3000:]
