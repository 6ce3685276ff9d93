"""Distributed checkpoints (torch.distributed.checkpoint), committed atomically.

Layout under ``job.output_dir/checkpoint.folder``::

    step-00000100/          a complete checkpoint (DCP files + .metadata)
    .step-00000200.partial  a save in progress; renamed to step-00000200 only once every rank is done

A checkpoint becomes visible in one ``rename``, so a crash or kill during a save leaves the
previous checkpoints untouched and the partial folder is removed at the next start. Only tensors
are stored: optimizer hyperparameters come from the recipe, and small integer states (step, data
position) are stored as tensors, so loading never unpickles anything of ours.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

_COMPLETE = re.compile(r"^step-(\d{8})$")
_PARTIAL_SUFFIX = ".partial"


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
    """Saves, finds and loads the checkpoints of one run."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.is_rank0 = dist.get_rank() == 0
        if self.is_rank0:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Hidden ".step-*" folders are saves or deletions that a crash or kill interrupted.
            for leftover in self.folder.glob(".step-*"):
                logger.warning("removing %s, left by an interrupted save or delete", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        dist.barrier()

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _COMPLETE.match(p.name))]
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Stateful]) -> Path:
        final = self.folder / f"step-{step:08d}"
        partial = self.folder / f".step-{step:08d}{_PARTIAL_SUFFIX}"
        dcp.save(state, checkpoint_id=partial)
        dist.barrier()  # every rank's shards are on disk before the checkpoint is declared complete
        if self.is_rank0:
            if final.exists():  # a re-run of the same step replaces the older copy
                shutil.rmtree(final)
            os.rename(partial, final)
            _fsync_dir(self.folder)
            self._prune()
        dist.barrier()
        logger.info("saved checkpoint %s", final)
        return final

    def load(self, path: Path, state: dict[str, Stateful]) -> None:
        dcp.load(state, checkpoint_id=path)
        logger.info("resumed from checkpoint %s", path)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, old in self.checkpoints()[: -self.keep_last]:
            # Rename first so a kill mid-delete never leaves a half-deleted "complete" checkpoint.
            doomed = old.with_name(f".{old.name}.deleting")
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
