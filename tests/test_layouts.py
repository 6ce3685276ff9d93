"""Every parallel layout trains like one process: same losses, gradient norms and validation loss;
a compiled one compiles in its first step only.

Each layout is a real ``torchrun`` job over gloo (CPU, fp32, the debug model with packed-document
masking) that trains 4 steps from the layout-independent initialisation, checkpoints at step 2,
and resumes from that checkpoint under the same layout. The global batch (4 samples of 64 tokens)
is the same as the single-process run's: local_batch_size x data-parallel ranks.
"""

import json
import sys

import pytest

from launcher import REPO, torchrun

STEPS, RESUME_FROM = 4, 2
GLOBAL_BATCH = 4


def overrides(out_dir, local_batch_size: int, *layout: str) -> list[str]:
    return ["--config", str(REPO / "recipes/debug.toml"), "--job.output_dir", str(out_dir),
            "--model.name", "debug", "--training.seq_len", "64", "--training.local_batch_size", str(local_batch_size),
            "--training.steps", str(STEPS), "--lr_scheduler.warmup_steps", "1", "--optimizer.lr", "3e-3",
            "--training.max_norm", "0.5", "--compile.enabled", "false", "--metrics.log_every", "1",
            "--training.val_every", "2", "--training.val_batches", "1", "--checkpoint.every", str(RESUME_FROM),
            "--checkpoint.keep_last", "0", "--data.document_mask", "true", *layout]


def run(tmp_path, name: str, nproc: int, dp: int, *layout: str) -> dict:
    out = tmp_path / f"{name}.json"
    args = ["--out", str(out), "--resume-from", str(RESUME_FROM),
            *overrides(tmp_path / name, GLOBAL_BATCH // dp, *layout)]
    if nproc == 1:
        import subprocess
        subprocess.run([sys.executable, str(REPO / "tests/workers/train_and_resume.py"), *args], check=True,
                       cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                       capture_output=True)
    else:
        torchrun(nproc, REPO / "tests/workers/train_and_resume.py", *args)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single", 1, 1)


ON, OFF = ["--compile.enabled", "true"], []  # compile: the trainer's default backend (inductor) or none
# Compiled and traced by AOTAutograd but run eagerly (aot_eager): where the layout adds nothing inside the
# compiled blocks that inductor lowers differently from the layouts compiled with it (TP's collectives
# inside blocks, FSDP's around them), and inductor's cold compile would cost half a minute more per layout.
TRACED = ["--compile.enabled", "true", "--compile.backend", "aot_eager"]


def ac(mode: str) -> list[str]:
    return ["--activation_checkpoint.mode", mode, *(["--activation_checkpoint.num_layers", "2"]
                                                   if mode == "layers" else [])]


# name: (processes, data-parallel ranks x accumulation steps, recipe overrides). A covering matrix of what users type:
# every parallelism (FSDP, HSDP, TP, each pipeline schedule, each CP rotation) and their pairs up to
# 8 processes, every (compile, checkpointing) pair, and every parallelism with compile on and off
# where it can run compiled (zero-bubble schedules are refused with compile: tests/test_pp.py; HSDP
# runs FSDP's compiled path, covered by fsdp2_compiled, with one more all-reduce; the ring rotation
# inside compiled blocks is tests/test_cp.py's ring_compile, traced with aot_eager: with inductor it
# cost 150 s of the suite's time, cold). Compiled layouts use inductor, the ones marked * aot_eager:
#
#   checkpointing | compile off                         | compile on
#   none          | fsdp2, pp2_fsdp2, pp2_gpipe_fsdp2_accum2 | fsdp2_tp2*
#   selective     | tp2, pp2_interleaved, pp2_cp2, cp2_ring | fsdp2_compiled
#   full          | pp2_zero_bubble, hsdp2x2            | tp2_compiled_full, cp2_fsdp2*
#   layers (2/4)  | pp2_tp2_fsdp2                       | pp2_1f1b*
LAYOUTS = {
    "fsdp2": (2, 2, ["--parallelism.dp_shard", "2", *OFF, *ac("none")]),
    "fsdp2_compiled": (2, 2, ["--parallelism.dp_shard", "2", *ON, *ac("selective")]),
    "hsdp2x2": (4, 4, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2", *OFF, *ac("full")]),
    "tp2": (2, 1, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1", *OFF, *ac("selective")]),
    # Compiled blocks under TP: the first block's input came from the embedding's reduce-scatter still
    # in flight, which crashed the second block; a whole-block checkpoint traced inside the compiled
    # block crashed AOTAutograd (see parallel/__init__.py).
    "tp2_compiled_full": (2, 1, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1", *ON, *ac("full")]),
    "pp2_1f1b": (2, 1, ["--parallelism.pp", "2", "--parallelism.dp_shard", "1", *TRACED, *ac("layers")]),
    "pp2_interleaved": (2, 1, ["--parallelism.pp", "2", "--parallelism.dp_shard", "1",
                               "--parallelism.pp_schedule", "interleaved_1f1b", *OFF, *ac("selective")]),
    "pp2_zero_bubble": (2, 1, ["--parallelism.pp", "2", "--parallelism.dp_shard", "1",
                               "--parallelism.pp_schedule", "interleaved_zb", *OFF, *ac("full")]),
    "fsdp2_tp2": (4, 2, ["--parallelism.tp", "2", "--parallelism.dp_shard", "2", *TRACED, *ac("none")]),
    "pp2_fsdp2": (4, 2, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2", *OFF, *ac("none")]),
    # Two pipeline steps per optimizer step: FSDP reduces once, in the last (tests/test_pp.py counts it).
    # One sample per pipeline step: gpipe (1F1B needs a microbatch per stage).
    "pp2_gpipe_fsdp2_accum2": (4, 4, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2",
                                      "--parallelism.pp_schedule", "gpipe", "--training.grad_accum_steps", "2",
                                      "--training.val_batches", "2", *OFF, *ac("none")]),  # the same 4 samples
    "pp2_tp2_fsdp2": (8, 2, ["--parallelism.pp", "2", "--parallelism.tp", "2", "--parallelism.dp_shard", "2",
                             *OFF, *ac("layers")]),
    # Context parallel: each rank holds a load-balanced half of every sequence; FSDP over dp_shard x cp.
    "cp2_fsdp2": (4, 2, ["--parallelism.cp", "2", "--parallelism.dp_shard", "2", *TRACED, *ac("full")]),
    "cp2_ring": (2, 1, ["--parallelism.cp", "2", "--parallelism.dp_shard", "1", "--parallelism.cp_rotate", "ring",
                        *OFF, *ac("selective")]),
    "pp2_cp2": (4, 1, ["--parallelism.pp", "2", "--parallelism.cp", "2", "--parallelism.dp_shard", "1",
                       *OFF, *ac("selective")]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_the_single_process_run_and_resumes(tmp_path, single, name):
    nproc, dp, layout = LAYOUTS[name]
    got = run(tmp_path, name, nproc, dp, *layout)
    # NOTE: sums run in another order under each layout, and Adam turns the fp32 rounding of tiny
    # gradient entries into full-size updates, so the gradient norm drifts by ~1e-4 after two steps.
    for key, rel in (("losses", 2e-5), ("val_losses", 2e-5), ("grad_norms", 5e-4)):
        assert got[key].keys() == single[key].keys(), key
        for step, value in single[key].items():
            assert got[key][step] == pytest.approx(value, rel=rel), (key, step)
    if ON[0] in layout:  # compiled in the first step only (and for the first validation, under no_grad)
        graphs = got["graphs_after_step"]
        assert len(graphs) == STEPS and graphs[1] == graphs[0] > 0 and graphs[3] == graphs[2], graphs
    # Resumed from step 2 under the same layout: the uninterrupted run's steps 3 and 4.
    assert sorted(got["resumed_losses"], key=int) == ["3", "4"]
    for step in ("3", "4"):
        assert got["resumed_losses"][step] == pytest.approx(got["losses"][step], rel=1e-6, abs=0), step
        assert got["resumed_grad_norms"][step] == pytest.approx(got["grad_norms"][step], rel=1e-6, abs=0), step


# Resumed from the single-process run's step-2 checkpoint under another layout (DCP reshards the
# model and optimizer; the loader's global sample position re-shards the data over the new
# data-parallel ranks): steps 3 and 4 must be the single-process run's.
RESHARDED = {
    "fsdp2_tp2": (4, 2, ["--parallelism.tp", "2", "--parallelism.dp_shard", "2"]),
    "pp2_fsdp2_interleaved": (4, 2, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2",
                                     "--parallelism.pp_schedule", "interleaved_1f1b"]),
}


@pytest.mark.parametrize("name", RESHARDED)
def test_a_single_process_checkpoint_resumes_under_another_layout(tmp_path, single, name):
    import shutil

    nproc, dp, layout = RESHARDED[name]
    out_dir = tmp_path / name
    shutil.copytree(single["output_dir"] + f"/checkpoints/step-{RESUME_FROM:08d}",
                    out_dir / f"checkpoints/step-{RESUME_FROM:08d}")
    out = tmp_path / f"{name}.json"
    torchrun(nproc, REPO / "tests/workers/train_losses.py", "--out", out,
             *overrides(out_dir, GLOBAL_BATCH // dp, *layout, "--checkpoint.resume", "true"))
    got = json.loads(out.read_text())
    assert sorted(got["losses"], key=int) == ["3", "4"]
    for step in ("3", "4"):
        assert got["losses"][step] == pytest.approx(single["losses"][step], rel=2e-5), step
        assert got["grad_norms"][step] == pytest.approx(single["grad_norms"][step], rel=5e-4), step
