"""Distributed checkpoints (torch.distributed.checkpoint), committed atomically.

Layout under ``job.output_dir/checkpoint.folder``::

    step-00000100/          a complete checkpoint (DCP files + .metadata)
    .step-00000200.partial  a save in progress; renamed to step-00000200 only once every rank is done

A checkpoint becomes visible in one ``rename``, so a crash or kill during a save leaves the
previous checkpoints untouched and the partial folder is removed at the next start. Only tensors
are stored: optimizer hyperparameters come from the recipe, and small integer states (step, data
position) are stored as tensors, so loading never unpickles anything of ours.

Each checkpoint also holds ``torchtrain.json`` (rank 0 writes it into the partial folder just
before the rename): the model name and the ModelArgs fields that set tensor shapes. Loading
compares it with the recipe and raises ConfigError listing every differing field before DCP reads
anything; the parallel layout is not recorded, since DCP reshards. DCP's own ``.metadata`` is a
pickle: it is read through :class:`SafeFileSystemReader`, an allow-list unpickler (see there for
what is and is not guarded). ``async_mode = "async"`` copies and writes with ``dcp.async_save`` in
the background, holds the next optimizer step until the copy is done, and commits the previous save
at the start of the next one and at the end of training.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from torchtrain.config import Config, ConfigError, check_choice, invalid

logger = logging.getLogger(__name__)

ASYNC_MODES = ("disabled", "async")  # checkpoint.async_mode


def check_checkpoint(config: Config) -> None:
    check_choice(config, "checkpoint", "async_mode", ASYNC_MODES)
    if config.checkpoint.resume not in (True, False, "auto"):
        raise invalid(config, "checkpoint", "resume", "valid choices: 'auto', true, false")
    if config.checkpoint.overwrite and config.checkpoint.resume is not False:
        raise invalid(config, "checkpoint", "overwrite",
                      "it deletes the folder's checkpoints, so it needs checkpoint.resume = false")


def check_resume(config: Config, model: dict[str, Any]) -> list[str]:
    """Refuse, before anything is built, a resume setting that would clobber or mix up checkpoints.

    Reads only the folder's listing and the newest readable ``torchtrain.json``; every rank may call it.
    Returns how the recipe's data differ from the checkpoint's when ``checkpoint.resume = true`` continues
    a run with other data (then the data loader starts at the beginning of the new data).
    """
    if not config.checkpoint.enabled:
        return []
    folder = Path(config.job.output_dir) / config.checkpoint.folder
    found = complete_checkpoints(folder)
    resume = config.checkpoint.resume
    if not found:
        if resume is True:
            raise ConfigError(f"{config.source}: checkpoint.resume = true, but {folder} holds no checkpoint; "
                              "'auto' starts at step 0 when there is none")
        return []
    newest = found[-1][1]
    if resume is False:
        if not config.checkpoint.overwrite:
            raise ConfigError(
                f"{config.source}: checkpoint.resume = false would start over in {folder}, which holds "
                f"{len(found)} checkpoint(s) (newest {newest.name}) that its saves would replace; pass "
                "--checkpoint.overwrite true to delete them, or give this run another job.output_dir")
        return []
    saved = _newest_record(found)
    if saved is None:  # none readable: resume tries each and says why it cannot (load_newest_intact)
        return []
    path, record = saved
    model_differences = _differences(_with_older_defaults(record.get("model", {})), model)
    data_differences = _differences(record.get("run", {}), run_record(config))
    if resume is True and not model_differences:
        return data_differences
    if model_differences or data_differences:
        # Only a run of the same model can go on with other data.
        allow = "" if model_differences else "pass --checkpoint.resume true to continue it with this recipe's data, "
        raise ConfigError(
            f"{config.source}: {folder} holds the checkpoints of another run ({path}: "
            + "; ".join(model_differences + data_differences) + "). Give this run another job.output_dir, " + allow
            + "or start over in it with --checkpoint.resume false --checkpoint.overwrite true (which deletes them)")


def run_record(config: Config) -> dict[str, Any]:
    """The recipe fields that make checkpoints one run's: the data they were trained on, in what pieces.

    The model's shape is the other half (:func:`model_record`); what may change between a save and a
    resume (layout, steps, schedule, cadences) is left out.
    """
    return {"data.dataset": config.data.dataset, "data.tokenizer": config.data.tokenizer,
            "data.blend": [dataclasses.asdict(source) for source in config.data.blend],
            "training.seq_len": config.training.seq_len}


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{key}: checkpoint {saved.get(key, '(missing)')!r}, recipe {value!r}"
            for key, value in wanted.items() if key in saved and saved[key] != value]


def _newest_record(found: list[tuple[int, Path]]) -> tuple[Path, dict[str, Any]] | None:
    for _, path in reversed(found):
        try:
            record = json.loads((path / _RECORD).read_text())
            if isinstance(record, dict) and isinstance(record.get("model"), dict):
                return path, record
        except (OSError, ValueError):
            continue
    return None

_COMPLETE = re.compile(r"^step-(\d{8})$")
_PARTIAL_SUFFIX = ".partial"
_SHARD_OWNER = re.compile(r"^__(\d+)_")  # DCP's FileSystemWriter names each rank's files __<rank>_<n>.distcp
_RECORD = "torchtrain.json"  # the model record, written by rank 0 into the folder before its rename
_SHAPE_FIELDS = ("dim", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "ffn_dim", "head_dim", "qk_norm")


def _with_older_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved model record with the shape fields records before them lacked, at the values they then had."""
    saved = dict(saved)
    if isinstance(saved.get("dim"), int) and isinstance(saved.get("num_heads"), int) and saved["num_heads"] > 0:
        saved.setdefault("head_dim", saved["dim"] // saved["num_heads"])
    saved.setdefault("qk_norm", False)
    return saved


class ModelAndOptimizer(Stateful):
    """Model and optimizer state keyed by parameter names (so any layout can load it later)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        # param_groups hold hyperparameters, which the recipe decides; keep the tensors only.
        return {"model": model_sd, "optimizer": optim_sd["state"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _, optim_sd = get_state_dict(self.model, self.optimizer)
        optim_sd["state"] = state["optimizer"]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd,
                       options=StateDictOptions(strict=True))


class IntState(Stateful):
    """An object whose state is a flat dict of ints (data loader, LR schedule), stored as tensors."""

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.int64) for k, v in self.obj.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.obj.load_state_dict({k: int(v) for k, v in state.items()})


class RNGState(Stateful):
    """Torch RNG states. Every rank is seeded alike, so rank 0's state stands for all."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


class CheckpointManager:
    """Saves, finds, checks and loads the checkpoints of one run.

    ``model_record`` (see :func:`model_record`) is written next to every checkpoint and compared on
    load, so a checkpoint of another model is refused with the differing fields before any DCP read.
    With ``async_mode="async"`` both the copy of the state to CPU memory ("staging") and the write
    run in background threads (``dcp.async_save`` with a :class:`DefaultStager`, on a gloo group of
    its own); the write is committed (barrier, then rename) at the start of the next save or by
    :meth:`wait` / :meth:`close`. The state must not change until it is staged: give the
    ``optimizer`` and its ``step`` waits for the copy (the forward and backward in between never
    write parameters or optimizer state, so the copy overlaps them). ``last_blocked_s`` is what the
    save held the training loop: the ``save`` call plus that wait.
    """

    def __init__(self, folder: Path, keep_last: int, async_mode: str = "disabled",
                 model_record: dict[str, Any] | None = None, optimizer: torch.optim.Optimizer | None = None,
                 run_record: dict[str, Any] | None = None, start_over: bool = False):
        if async_mode not in ASYNC_MODES:
            raise ValueError(f"async_mode must be one of {ASYNC_MODES}, not {async_mode!r}")
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.async_mode = async_mode
        self.model_record = dict(model_record) if model_record is not None else None
        self.run_record = dict(run_record) if run_record is not None else None
        self.is_rank0 = dist.get_rank() == 0
        self.last_blocked_s = 0.0  # how long the last save() held up the training loop
        self._pending: tuple[Future, int, Path, Path] | None = None
        self._staging: Future | None = None  # the background copy of the state, until it is done
        self._async_group = self._stager = None
        self._checksummer: ThreadPoolExecutor | None = None
        if async_mode == "async":
            # Background saves run collectives from another thread: give them a group of their own so
            # they never interleave with the training loop's collectives on the default group.
            self._async_group = dist.new_group(backend="gloo")
            # NOTE: one stager for the whole run: it keeps its CPU buffers (pinned on CUDA, for fast
            # non-blocking device-to-host copies on a side stream) from one save to the next instead
            # of allocating the size of the state again at every save.
            on_accelerator = torch.accelerator.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=on_accelerator, use_shared_memory=False,
                                                        use_async_staging=True,
                                                        use_non_blocking_copy=on_accelerator))
            if optimizer is not None:
                optimizer.register_step_pre_hook(lambda *_: self._await_staging())
            # Checksums of a background save are computed in the background too (zlib releases the GIL).
            self._checksummer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-checksum")
        if self.is_rank0:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Hidden ".step-*" folders are saves or deletions that a crash or kill interrupted.
            for leftover in self.folder.glob(".step-*"):
                logger.warning("removing %s, left by an interrupted save or delete", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
            if start_over:  # checkpoint.overwrite: the user asked for the folder's checkpoints to go
                for _, old in self.checkpoints():
                    logger.warning("checkpoint.overwrite: deleting %s", old)
                    _delete(old)
        dist.barrier()

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.folder)

    def latest(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Stateful]) -> Path:
        """Save ``state`` as checkpoint ``step``; with async_mode "async", return before it is on disk."""
        self.wait()  # commit the previous background save first: checkpoints appear in step order
        final = self.folder / f"step-{step:08d}"
        partial = self.folder / f".step-{step:08d}{_PARTIAL_SUFFIX}"
        started = time.perf_counter()
        if self.async_mode == "async":
            response = dcp.async_save(state, storage_writer=FileSystemWriter(partial), process_group=self._async_group,
                                      async_stager=self._stager)
            self._staging = response.staging_completion
            upload, rank = response.upload_completion, dist.get_rank(self._async_group)
            sums = self._checksummer.submit(lambda: (upload.result(), own_file_checksums(partial, rank))[1])
            self._pending = (sums, step, partial, final)
            self.last_blocked_s = time.perf_counter() - started
            logger.info("checkpoint step %d: staging and writing in the background; save() blocked training for "
                        "%.3fs", step, self.last_blocked_s)
        else:
            dcp.save(state, storage_writer=FileSystemWriter(partial))
            self._commit(step, partial, final, own_file_checksums(partial, dist.get_rank()))
            self.last_blocked_s = time.perf_counter() - started
            logger.info("checkpoint step %d: save() blocked training for %.3fs", step, self.last_blocked_s)
        return final

    def _await_staging(self) -> None:
        """Block until the in-flight save has copied the state (before anything may change it)."""
        if self._staging is None:
            return
        started = time.perf_counter()
        self._staging.result()
        self._staging = None
        waited = time.perf_counter() - started
        self.last_blocked_s += waited
        logger.info("checkpoint: waited %.3fs for the state to be staged; this save blocked training for %.3fs "
                    "in all", waited, self.last_blocked_s)

    def wait(self) -> None:
        """Finish and commit a background save, if one is in flight (a no-op for synchronous saves)."""
        self._await_staging()
        if self._pending is None:
            return
        sums, step, partial, final = self._pending
        self._pending = None
        started = time.perf_counter()
        # Raises if this rank's write failed; then nothing is committed.
        self._commit(step, partial, final, sums.result())
        logger.info("checkpoint step %d: background write committed (waited %.3fs)", step,
                    time.perf_counter() - started)

    def close(self) -> None:
        """Commit any background save; call at the end of training on every rank."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._checksummer is not None:
            self._checksummer.shutdown()
            self._checksummer = None

    def _commit(self, step: int, partial: Path, final: Path, checksums: dict[str, list[int]]) -> None:
        # Every rank's shards are on disk (and checksummed) before the checkpoint is declared complete.
        every_ranks = [None] * dist.get_world_size()
        dist.all_gather_object(every_ranks, checksums)
        if self.is_rank0:
            if self.model_record is not None:
                files = {name: entry for each in every_ranks for name, entry in each.items()}
                record = {"format": 2, "step": step, "model": self.model_record, "run": self.run_record or {},
                          "files": dict(sorted(files.items()))}
                path = partial / _RECORD
                with open(path, "w") as f:
                    json.dump(record, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
            if final.exists():  # a re-run of the same step replaces the older copy
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_dir(self.folder)
            self._prune()
        dist.barrier()
        logger.info("saved checkpoint %s", final)

    def check(self, path: Path) -> None:
        """Raise ConfigError if the checkpoint at ``path`` was saved for another model than the recipe's."""
        if self.model_record is None:
            return
        record_path = Path(path) / _RECORD
        if not record_path.is_file():
            logger.warning("%s has no %s (saved by an older version?); its model shapes are not checked",
                           path, _RECORD)
            return
        try:
            saved = json.loads(record_path.read_text())["model"]
            if not isinstance(saved, dict):
                raise TypeError(f"its model record is a {type(saved).__name__}, not a table")
            saved = _with_older_defaults(saved)
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedCheckpointError(f"checkpoint {path}: unreadable {_RECORD} ({e})") from None
        differences = [f"{key}: checkpoint {saved.get(key, '(missing)')!r}, recipe {value!r}"
                       for key, value in self.model_record.items() if saved.get(key) != value]
        if differences:
            raise ConfigError(
                f"checkpoint {path} was saved for a different model than this recipe's: "
                + "; ".join(differences)
                + ". Resume it with the model it was trained with, or point checkpoint.folder / "
                  "job.output_dir at another run."
            )

    def load(self, path: Path, state: dict[str, Stateful]) -> None:
        """Load ``state`` from ``path`` after checking the model record; never runs pickled code."""
        self.check(path)
        self.verify(path)
        # Read the metadata once up front so a refusal surfaces as itself, not wrapped in DCP's
        # per-rank CheckpointException (dcp.load below reads it again through the same guard).
        SafeFileSystemReader(path).read_metadata()
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(path))
        except CheckpointException as e:  # a shard missing, truncated or garbled, on any rank
            rank, (error, _) = next(iter(e.failures.items()))
            raise DamagedCheckpointError(f"checkpoint {path}: a shard could not be read on rank {rank} "
                                         f"({type(error).__name__}: {error})") from None
        logger.info("resumed from checkpoint %s", path)

    def verify(self, path: Path) -> None:
        """Raise DamagedCheckpointError unless every file of ``path`` has its recorded size and checksum.

        The files are shared out over the ranks, each reads its share; every rank raises the same error.
        """
        rank, world = dist.get_rank(), dist.get_world_size()
        problems = [None] * world
        dist.all_gather_object(problems, verify_files(path, rank, world))
        found = [problem for each in problems for problem in each]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise DamagedCheckpointError(f"checkpoint {path}: {found[0]}{more}")

    def load_newest_intact(self, state: dict[str, Stateful]) -> int | None:
        """Load the newest checkpoint that reads whole; return its step (None: there is none).

        A damaged one (files missing, truncated or garbled) is skipped with a warning that says why,
        and the one before it is tried; when every one is damaged, the newest's error is raised. A
        checkpoint of another model is not damage: its ConfigError stops the run.
        """
        errors, damaged = [], []
        for step, path in reversed(self.checkpoints()):
            try:
                self.load(path, state)
            except DamagedCheckpointError as e:
                logger.warning("%s; trying the checkpoint before it", e)
                errors.append(e)
                damaged.append(path)
                continue
            # The damaged, newer ones are set aside (kept for a look, never loaded or pruned again): the
            # saves of this resumed run must be the newest checkpoints of the folder.
            if self.is_rank0:
                for bad in damaged:
                    aside = bad.with_name(f"damaged-{bad.name}")
                    logger.warning("moving the damaged %s to %s", bad, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                    os.rename(bad, aside)
            dist.barrier()
            return step
        if errors:
            raise type(errors[0])(f"{errors[0]}; no older checkpoint in {self.folder} is intact either")
        return None

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, old in self.checkpoints()[: -self.keep_last]:
            _delete(old)


def _delete(checkpoint: Path) -> None:
    # Rename first so a kill mid-delete never leaves a half-deleted "complete" checkpoint.
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_CHUNK = 8 << 20


def file_checksum(path: Path) -> list[int]:
    """``[size, crc32]`` of a file, read in chunks (zlib's crc32 runs at about a GB/s and releases the GIL)."""
    size, crc, buffer = 0, 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return [size, crc]


def own_file_checksums(folder: Path, rank: int) -> dict[str, list[int]]:
    """Checksums of the files ``rank`` wrote into a DCP save: its ``__<rank>_*`` shards; rank 0 also the rest."""
    mine = []
    for path in Path(folder).iterdir():
        owner = _SHARD_OWNER.match(path.name)
        if path.is_file() and path.name != _RECORD and (int(owner.group(1)) == rank if owner else rank == 0):
            mine.append(path)
    return {path.name: file_checksum(path) for path in mine}


def verify_files(checkpoint: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share (every ``world``-th file) of a checkpoint's recorded files.

    A checkpoint without recorded checksums (saved before they were recorded) has nothing to verify.
    """
    try:
        record = json.loads((Path(checkpoint) / _RECORD).read_text())
        files = record.get("files", {}) if isinstance(record, dict) else {}
        if not isinstance(files, dict):
            raise TypeError(f"its file list is a {type(files).__name__}")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as e:
        return [f"unreadable {_RECORD} ({e})"] if rank == 0 else []
    problems = []
    for name in sorted(files)[rank::world]:
        path = Path(checkpoint) / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        expected = files[name]
        size = path.stat().st_size
        if size != expected[0]:
            problems.append(f"{name} has {size} bytes, {expected[0]} were written (truncated or replaced)")
        elif file_checksum(path)[1] != expected[1]:
            problems.append(f"{name} does not match its checksum (its bytes changed after the save)")
    return problems


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first (partial saves are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _COMPLETE.match(p.name)))


def saved_model_name(checkpoint: Path) -> str | None:
    """The model name recorded in a checkpoint's ``torchtrain.json``, or None if it has none."""
    record = Path(checkpoint) / _RECORD
    return json.loads(record.read_text())["model"]["name"] if record.is_file() else None


def model_record(name: str, args: Any) -> dict[str, Any]:
    """What a checkpoint must agree on with the recipe: the model name and the fields that set shapes.

    The parallel layout is not part of it: DCP reshards any layout into any other on load.
    """
    return {"name": name, **{field: getattr(args, field) for field in _SHAPE_FIELDS}}


class DamagedCheckpointError(ConfigError):
    """A checkpoint's files are missing, truncated or garbled: resume falls back to an older one."""


class UnsafeCheckpointError(DamagedCheckpointError):
    """A checkpoint's DCP metadata asks for something other than plain DCP metadata."""


class SafeFileSystemReader(FileSystemReader):
    """A FileSystemReader whose ``.metadata`` is unpickled with an allow list instead of ``pickle.load``.

    Guarded: the ``.metadata`` pickle may only build DCP's own metadata dataclasses, torch.Size,
    torch dtypes / layouts / memory formats and plain containers; any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it is looked up, so no code named by the file runs.
    Entries stored as pickled bytes are refused too (we only store tensors; DCP would load such
    entries with ``torch.load``). The ``.distcp`` shards are read by DCP with
    ``torch.load(weights_only=True)``, torch's own restricted unpickler. Not guarded: the values of
    the tensors (a tampered checkpoint can hold any numbers) and file sizes / offsets beyond what
    DCP checks.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        if not Path(path).is_file():
            raise UnsafeCheckpointError(f"{path}: missing (the folder is not a complete DCP checkpoint)")
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except UnsafeCheckpointError as e:
                raise UnsafeCheckpointError(f"{path}: refusing to load: {e}") from None
            except Exception as e:  # truncated or garbled file
                raise UnsafeCheckpointError(f"{path}: not a readable DCP metadata file ({e})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise UnsafeCheckpointError(f"{path}: entry {key!r} is {type(entry).__name__}, not a tensor; "
                                            "torchtrain checkpoints hold tensors only")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem as dcp_fs
    from torch.distributed.checkpoint import metadata as dcp_md

    allowed: dict[tuple[str, str], Any] = {}
    for module in (dcp_md, dcp_fs):
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING", "_StorageInfo"):
            if hasattr(module, name):
                obj = getattr(module, name)
                allowed[(obj.__module__, name)] = obj
    allowed[("torch", "Size")] = torch.Size
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed[("torch.serialization", "_get_layout")] = _layout_by_name  # how torch.layout pickles
    allowed[("pathlib._local", "PosixPath")] = pathlib.PosixPath
    for name in dir(torch):  # dtypes, layouts and memory formats pickle as attributes of torch
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = obj
    return allowed


def _layout_by_name(name: Any) -> torch.layout:
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if not isinstance(name, str) or name not in layouts:
        raise UnsafeCheckpointError(f"unknown tensor layout {name!r}")
    return layouts[name]


class _MetadataUnpickler(pickle.Unpickler):
    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the .metadata pickle references {module}.{name}, which is not part of DCP metadata "
                "(a tampered or foreign file; nothing from it was run)") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
