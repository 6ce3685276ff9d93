"""End-to-end training on the real corpus: loss, resume, metrics, checkpoints, errors, data parallel."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher import REPO, torchrun
from torchtrain.config import ConfigError, load_config
from torchtrain.train import TrainingDiverged, train


def tiny(out: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run of the debug model on the default corpus and tokenizer."""
    return ["--job.output_dir", str(out), "--model.name", "debug", "--training.seq_len", "64",
            "--training.local_batch_size", "4", "--training.steps", "8", "--lr_scheduler.warmup_steps", "2",
            "--compile.enabled", "false", "--metrics.log_every", "1", "--training.val_every", "4",
            "--training.val_batches", "2", "--checkpoint.every", "4", "--checkpoint.keep_last", "0", *extra]


def run(out: Path, *extra: str):
    return train(load_config(REPO / "recipes/debug.toml", tiny(out, *extra)))


def test_loss_falls_on_the_default_corpus(tmp_path):
    result = run(tmp_path, "--training.steps", "40", "--training.seq_len", "128", "--training.local_batch_size", "8",
                 "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "5", "--training.val_every", "20",
                 "--checkpoint.enabled", "false")
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert math.log(8192) - 0.5 < losses[0] < math.log(8192) + 1.0  # starts near uniform over the vocab
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, losses  # down by 2 nats in 40 steps
    assert result.val_losses[40] < result.val_losses[20] < losses[0]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full", "--training.grad_accum_steps", "2")
    # The run that "stopped" at step 4: the same folder holding only what existed after step 4.
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full/checkpoints/step-00000004", stopped / "checkpoints/step-00000004")
    resumed = run(stopped, "--training.grad_accum_steps", "2", "--checkpoint.resume", "true")
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in resumed.losses:
        assert resumed.losses[step] == full.losses[step], step  # bitwise: == on Python floats
    assert resumed.val_losses[8] == full.val_losses[8]


def test_outputs_config_tensorboard_and_checkpoints(tmp_path):
    run(tmp_path, "--checkpoint.keep_last", "1")
    assert load_config(tmp_path / "config.toml").to_dict() == load_config(
        REPO / "recipes/debug.toml", tiny(tmp_path, "--checkpoint.keep_last", "1")).to_dict()
    assert "step 8/8" in (tmp_path / "train.log").read_text()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000008"]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/train", "loss/val", "loss/val_perplexity", "optim/lr", "optim/grad_norm",
                "perf/tokens_per_s", "perf/tflops", "perf/step_time_s", "perf/eta_s", "memory/peak_gib"}
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("loss/train")] == list(range(1, 9))
    assert [e.step for e in events.Scalars("loss/val")] == [4, 8]


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = run(tmp_path / "big", "--training.local_batch_size", "4", "--checkpoint.enabled", "false")
    accum = run(tmp_path / "accum", "--training.local_batch_size", "2", "--training.grad_accum_steps", "2",
                "--checkpoint.enabled", "false")
    for step in big.losses:
        assert accum.losses[step] == pytest.approx(big.losses[step], rel=1e-5, abs=1e-5)


def test_data_parallel_fsdp_resumes_a_single_process_run_and_matches_it(tmp_path):
    """FSDP over 2 gloo ranks continues a 1-process checkpoint with the 1-process losses.

    Both start from the same weights (the step-2 checkpoint, resharded by DCP on load) and see the
    same global batches (the loader's position is counted in samples, not per rank).
    """
    single = run(tmp_path / "single", "--checkpoint.every", "2")
    dp2_dir = tmp_path / "dp2"
    shutil.copytree(tmp_path / "single/checkpoints/step-00000002", dp2_dir / "checkpoints/step-00000002")
    out = tmp_path / "dp2.json"
    torchrun(2, REPO / "tests/workers/train_losses.py", "--out", out, "--config", REPO / "recipes/debug.toml",
             *tiny(dp2_dir, "--training.local_batch_size", "2", "--checkpoint.resume", "true",
                   "--checkpoint.every", "0"))
    dp2 = {int(k): v for k, v in json.loads(out.read_text())["losses"].items()}
    assert sorted(dp2) == list(range(3, 9))
    # Each log line shows the spread of step times over the ranks and the slowest rank.
    assert re.search(r"ranks \d+\.\d\d-\d+\.\d\ds, slowest rank [01]", (dp2_dir / "train.log").read_text())
    events = EventAccumulator(str(dp2_dir / "tb"))
    events.Reload()
    assert {"perf/step_time_min_s", "perf/step_time_median_s", "perf/step_time_max_s",
            "perf/slowest_rank"} <= set(events.Tags()["scalars"])
    for step in dp2:
        assert dp2[step] == pytest.approx(single.losses[step], rel=1e-5, abs=1e-5), step


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run(tmp_path, "--training.steps", "4")
    before = {p.name: p.stat().st_size for p in (tmp_path / "checkpoints/step-00000004").iterdir()}
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss .* not finite.*last good checkpoint is .*step-00000004"):
        run(tmp_path, "--optimizer.lr", "1e6", "--training.max_norm", "0", "--training.steps", "30",
            "--checkpoint.resume", "true", "--checkpoint.every", "1000", "--training.val_every", "0")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004"]
    assert {p.name: p.stat().st_size for p in (tmp_path / "checkpoints/step-00000004").iterdir()} == before
    resumed = run(tmp_path, "--training.steps", "6", "--checkpoint.resume", "true")  # still loadable
    assert sorted(resumed.losses) == [5, 6]


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    run(tmp_path, "--training.steps", "4")
    partial = tmp_path / "checkpoints/.step-00000006.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half written")
    resumed = run(tmp_path, "--training.steps", "6", "--checkpoint.resume", "true")
    assert sorted(resumed.losses) == [5, 6]
    assert not partial.exists()


def test_missing_dataset_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"recipes/debug.toml: \[data\] .*no/such/corpus"):
        run(tmp_path, "--data.dataset", str(tmp_path / "no/such/corpus"))
    assert not (tmp_path / "checkpoints").exists()


def test_tokenizer_larger_than_model_vocab_fails(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(8999)} | {"[UNK]": 8999, "</s>": 9000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"w{i}" for i in range(5000)))
    with pytest.raises(ConfigError, match=r"9001 tokens, more than the 8192 embeddings of model 'debug'"):
        run(tmp_path / "out", "--data.tokenizer", str(tmp_path / "tokenizer.json"), "--data.dataset", str(corpus))


def test_layout_errors_come_before_the_model_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"fsdp_cpu_offload = true moves GPU memory to the CPU, but this run is on cpu"):
        run(tmp_path / "offload", "--parallelism.fsdp_cpu_offload", "true")
    with pytest.raises(ConfigError, match=r"multiply to 4, but 1 processes were launched"):
        run(tmp_path / "tp", "--parallelism.tp", "4", "--parallelism.dp_shard", "1")
    assert not (tmp_path / "offload" / "checkpoints").exists()


def test_command_line_error_is_one_message_and_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torchtrain.train", "--config", "recipes/debug.toml",
                           "--training.stepz", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key training.stepz" in proc.stderr and "'steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compiled_training_matches_eager(tmp_path):
    common = ("--training.steps", "3", "--checkpoint.enabled", "false", "--training.val_every", "0")
    eager = run(tmp_path / "eager", *common)
    compiled = run(tmp_path / "compiled", *common, "--compile.enabled", "true")
    for step in eager.losses:
        assert compiled.losses[step] == pytest.approx(eager.losses[step], rel=1e-4), step


def test_full_activation_checkpointing_matches_none(tmp_path):
    common = ("--training.steps", "3", "--checkpoint.enabled", "false", "--training.val_every", "0")
    plain = run(tmp_path / "plain", *common)
    recomputed = run(tmp_path / "full", *common, "--activation_checkpoint.mode", "full")
    for step in plain.losses:
        assert recomputed.losses[step] == pytest.approx(plain.losses[step], rel=1e-6), step


def test_losses_read_from_the_device_only_at_log_steps_are_all_recorded(tmp_path):
    every_step = run(tmp_path / "every", "--checkpoint.enabled", "false", "--training.val_every", "0")
    every_fourth = run(tmp_path / "fourth", "--checkpoint.enabled", "false", "--training.val_every", "0",
                       "--metrics.log_every", "4")
    assert every_fourth.losses == every_step.losses and every_fourth.grad_norms == every_step.grad_norms


def test_an_empty_data_file_is_named_in_one_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match=rf"data.dataset = '{empty}': the 'train' split is too short"):
        run(tmp_path / "out", "--data.dataset", str(empty), "--data.val_fraction", "0", "--training.val_every", "0")
