"""Checkpoint robustness: a kill mid-save, damaged files, a checkpoint of another model, a hostile .metadata,
async saves."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from launcher import REPO, torchrun
from test_train import run, tiny
from torchtrain.checkpoint import SafeFileSystemReader, UnsafeCheckpointError, file_checksum
from torchtrain.config import ConfigError


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    out, ready = tmp_path / "killed", tmp_path / "ready"
    cmd = [sys.executable, str(REPO / "tests/workers/ckpt_hang_save.py"), "--hang-step", "4", "--ready", str(ready),
           "--config", str(REPO / "recipes/debug.toml"), *tiny(out, "--checkpoint.every", "2")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the worker exited ({proc.returncode}) before hanging in the save:\n"
                            f"{proc.stderr.read()[-4000:]}")
            assert time.monotonic() < deadline, "the worker never reached the save of step 4"
            time.sleep(0.1)
        partial = out / "checkpoints/.step-00000004.partial"
        shards = sorted(p.name for p in partial.iterdir())
        assert shards and ".metadata" not in shards, shards  # mid-save: shards written, not finished
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".step-00000004.partial", "step-00000002"]

    resumed = run(out, "--checkpoint.every", "2", "--checkpoint.resume", "true")
    assert sorted(resumed.losses) == [3, 4, 5, 6, 7, 8]  # from the last complete checkpoint, step 2
    assert not partial.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004", "step-00000006", "step-00000008"]
    full = run(tmp_path / "full", "--checkpoint.every", "2")
    for step in resumed.losses:
        # Steps 1-2 ran in another process (possibly another CPU thread count), so allow rounding.
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), step
    assert resumed.val_losses[8] == pytest.approx(full.val_losses[8], rel=1e-5, abs=1e-6)


def _damage(folder, how: str) -> None:
    if how == "record of the wrong shape":
        (folder / "torchtrain.json").write_text(json.dumps({"model": ["debug"]}))
    elif how == "metadata missing":
        (folder / ".metadata").unlink()
    elif how == "metadata truncated":
        data = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(data[: len(data) // 2])
    elif how == "shard truncated":
        shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "shard bytes changed":  # same size, still a valid file: only the checksum can tell
        shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif how == "metadata truncated, no checksums":  # a checkpoint saved before checksums were recorded
        record = json.loads((folder / "torchtrain.json").read_text())
        del record["files"]
        (folder / "torchtrain.json").write_text(json.dumps(record))
        _damage(folder, "metadata truncated")


DAMAGE = ["record of the wrong shape", "metadata missing", "metadata truncated", "shard truncated",
          "shard bytes changed", "metadata truncated, no checksums"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    full = run(tmp_path / "full", "--training.steps", "4", "--checkpoint.every", "2")
    expected = {
        "record of the wrong shape": r"unreadable torchtrain.json \(its model record is a list, not a table\)",
        "metadata missing": ".metadata is missing",
        "metadata truncated": r".metadata has \d+ bytes, \d+ were written",
        "shard truncated": r"__0_0.distcp has 1000 bytes, \d+ were written",
        "shard bytes changed": "__0_0.distcp does not match its checksum",
        "metadata truncated, no checksums": ".metadata: not a readable DCP metadata file",
    }
    for how in DAMAGE:
        out = tmp_path / how.replace(" ", "_").replace(",", "")
        shutil.copytree(tmp_path / "full/checkpoints", out / "checkpoints")
        _damage(out / "checkpoints/step-00000004", how)
        resumed = run(out, "--training.steps", "4", "--checkpoint.every", "0")  # resume = "auto"
        assert sorted(resumed.losses) == [3, 4], how  # from step 2, the newest intact one
        for step in (3, 4):
            assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-6), (how, step)
        log = (out / "train.log").read_text()
        assert re.search(expected[how], log) and "trying the checkpoint before it" in log, (how, log[-2000:])
        # The damaged one is set aside, not deleted, and this run's own step 4 replaced it.
        assert _names(out / "checkpoints") == ["damaged-step-00000004", "step-00000002", "step-00000004"], how
    # Nothing intact: one error naming the newest checkpoint's damage; nothing is written.
    out = tmp_path / "all_damaged"
    shutil.copytree(tmp_path / "full/checkpoints", out / "checkpoints")
    _damage(out / "checkpoints/step-00000004", "shard truncated")
    _damage(out / "checkpoints/step-00000002", "metadata missing")
    before = sorted(p.name for p in (out / "checkpoints").rglob("*"))
    with pytest.raises(ConfigError, match=r"step-00000004: __0_0.distcp has 1000 bytes.*no older checkpoint in "
                                          r".* is intact either"):
        run(out, "--training.steps", "4", "--checkpoint.resume", "true")
    assert sorted(p.name for p in (out / "checkpoints").rglob("*")) == before


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_rerun_resumes_its_own_run_and_never_clobbers_another(tmp_path):
    """checkpoint.resume: "auto" continues this run, refuses another's; false needs overwrite to start over."""
    first = run(tmp_path, "--training.steps", "4", "--checkpoint.every", "2", "--training.val_every", "0")
    rerun = run(tmp_path, "--training.steps", "6", "--training.val_every", "0")  # the same command, longer
    assert sorted(rerun.losses) == [5, 6]
    assert _names(tmp_path / "checkpoints") == ["step-00000002", "step-00000004", "step-00000006"]
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")}
    for overrides, message in [
        (["--training.seq_len", "32"], r"holds the checkpoints of another run \(.*step-00000006: training.seq_len: "
                                       r"checkpoint 64, recipe 32\)\. .*--checkpoint.resume true.*"
                                       r"--checkpoint.resume false --checkpoint.overwrite true"),
        (["--data.dataset", str(tmp_path / "other.txt")], r"data.dataset: checkpoint 'stdlib', recipe '.*other.txt'"),
        (["--checkpoint.resume", "false"], r"checkpoint.resume = false would start over in .*checkpoints, which holds "
                                           r"3 checkpoint\(s\) \(newest step-00000006\).*--checkpoint.overwrite true"),
        (["--checkpoint.overwrite", "true"],
         r"checkpoint.overwrite = True is invalid; .*needs checkpoint.resume = false"),
        (["--checkpoint.resume", "maybe"],
         r"checkpoint.resume = 'maybe' is invalid; valid choices: 'auto', true, false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run(tmp_path, "--training.steps", "8", *overrides)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").rglob("*")} == before  # nothing touched
    # resume = true with nothing to resume is an error; "auto" starts at step 0.
    with pytest.raises(ConfigError, match=r"checkpoint.resume = true, but .*empty/checkpoints holds no checkpoint"):
        run(tmp_path / "empty", "--checkpoint.resume", "true")
    # Starting over is explicit, and then only the new run's checkpoints are left.
    fresh = run(tmp_path, "--training.steps", "2", "--checkpoint.resume", "false", "--checkpoint.overwrite", "true",
                "--training.val_every", "0")
    assert fresh.losses[1] == first.losses[1] and _names(tmp_path / "checkpoints") == ["step-00000002"]


def test_checkpoint_of_another_model_is_refused_before_training(tmp_path):
    run(tmp_path, "--training.steps", "2")
    # A record written before head_dim and qk_norm were recorded reads as having their values of then.
    record_path = tmp_path / "checkpoints/step-00000002/torchtrain.json"
    record = json.loads(record_path.read_text())
    assert record["model"].pop("head_dim") == 32 and record["model"].pop("qk_norm") is False
    record_path.write_text(json.dumps(record))
    with pytest.raises(ConfigError) as failure:
        run(tmp_path, "--model.name", "debug_30m", "--checkpoint.resume", "true")
    message = str(failure.value)
    assert str(tmp_path / "checkpoints/step-00000002") in message
    for expected in ("name: checkpoint 'debug', recipe 'debug_30m'", "dim: checkpoint 256, recipe 512",
                     "num_layers: checkpoint 4, recipe 8", "ffn_dim: checkpoint 704, recipe 1408",
                     "head_dim: checkpoint 32, recipe 64"):
        assert expected in message, message
    assert "vocab_size" not in message and "num_heads" not in message  # equal fields are not listed
    assert "step 1/8" not in (tmp_path / "train.log").read_text()  # the second run ran no step


def _tamper(path, data: bytes) -> None:
    """Replace a checkpoint file and its recorded checksum, as whoever rewrites the files can (the checksums
    find damage, not an attacker: the unpickler's allow list is what stands against a hostile file)."""
    path.write_bytes(data)
    record = json.loads((path.parent / "torchtrain.json").read_text())
    record["files"][path.name] = file_checksum(path)
    (path.parent / "torchtrain.json").write_text(json.dumps(record))


def test_a_checkpoint_with_a_code_executing_metadata_pickle_is_refused(tmp_path):
    run(tmp_path, "--training.steps", "2")
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "full/checkpoints")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    metadata = tmp_path / "checkpoints/step-00000002/.metadata"
    _tamper(metadata, pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refusing to load: .* references (posix|os)\.system"):
        run(tmp_path, "--checkpoint.resume", "true")
    assert not marker.exists()
    # Export and generate read a checkpoint's model through the same guard.
    from torchtrain.hf_checkpoint import read_dcp_model_state
    from torchtrain.models import get_model_args

    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load: .* references (posix|os)\.system"):
        read_dcp_model_state(tmp_path / "checkpoints/step-00000002", get_model_args("debug"))
    assert not marker.exists()

    # Genuine DCP metadata with an entry stored as pickled bytes (DCP would torch.load it) is refused.
    good = SafeFileSystemReader(tmp_path / "full/checkpoints/step-00000002").read_metadata()
    key = next(iter(good.state_dict_metadata))
    good.state_dict_metadata[key] = BytesStorageMetadata()
    _tamper(metadata, pickle.dumps(good))
    with pytest.raises(UnsafeCheckpointError, match=rf"entry '{key}' is BytesStorageMetadata, not a tensor"):
        run(tmp_path, "--checkpoint.resume", "true")


def test_async_save_is_complete_resumable_and_equals_sync(tmp_path):
    sync = run(tmp_path / "sync", "--checkpoint.every", "2")
    asyn = run(tmp_path / "async", "--checkpoint.every", "2", "--checkpoint.async_mode", "async")
    assert asyn.losses == sync.losses
    folder = tmp_path / "async/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{s:08d}" for s in (2, 4, 6, 8)]
    for step in (2, 4, 6, 8):
        assert {".metadata", "torchtrain.json"} <= {p.name for p in (folder / f"step-{step:08d}").iterdir()}
    log = (tmp_path / "async/train.log").read_text()
    assert "checkpoint step 2: staging and writing in the background; save() blocked training for" in log
    # The optimizer step after a save waits for the copy; the resume below shows the copy was of the saved step.
    assert "for the state to be staged; this save blocked training for" in log
    assert "checkpoint step 8: background write committed" in log

    # Resume the async run from its step-4 checkpoint: the same losses as the sync run.
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    os.rename(folder / "step-00000004", stopped / "checkpoints/step-00000004")
    resumed = run(stopped, "--checkpoint.resume", "true", "--checkpoint.async_mode", "async")
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    for step in resumed.losses:
        assert resumed.losses[step] == sync.losses[step], step
    assert resumed.val_losses[8] == sync.val_losses[8]


def test_async_save_across_two_fsdp_ranks_resumes_bitwise(tmp_path):
    """The background writes run collectives on their own gloo group, beside FSDP's on the default one."""
    out = tmp_path / "losses.json"
    torchrun(2, REPO / "tests/workers/train_and_resume.py", "--out", out, "--resume-from", "4",
             "--config", REPO / "recipes/debug.toml",
             *tiny(tmp_path / "run", "--training.local_batch_size", "2", "--checkpoint.async_mode", "async"))
    result = json.loads(out.read_text())
    assert sorted(result["resumed_losses"], key=int) == ["5", "6", "7", "8"]
    for step, loss in result["resumed_losses"].items():
        assert loss == result["losses"][step], step
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
