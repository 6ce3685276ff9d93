"""Which attention backend ``model.attention = "auto"`` runs on a GPU, and the measurements it may rest on.

By default ``auto`` picks backends others have proven on GPUs: PyTorch's SDPA (flash / cuDNN) for plain
causal attention and FlexAttention where packed documents or a sliding window mask it. Our Triton kernels
(``"triton"``) replace that default for a mask variant only where a recorded GPU check of the same kernels,
on a GPU of the same compute capability, measured them correct in bf16 and faster than the default at every
sequence length it timed. ``bench/gpu_check.sh`` writes that record (:data:`GPU_CHECK_RECORD`, through
:func:`record_choices`); without it, or for another capability, or after the kernels changed (their
fingerprint differs), or under another PyTorch release (it brings SDPA's and Flex's kernels and the Triton
that compiles ours, so the comparison may come out otherwise), ``auto`` keeps the default.

The mask variants, as the model calls attention: ``causal`` (plain), ``documents`` (causal + packed
documents, the training default), ``window`` (causal + sliding window, with or without documents).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["GPU_CHECK_RECORD", "VARIANTS", "DEFAULT_BACKEND", "variant_of", "kernels_fingerprint", "torch_release",
           "decide", "record_choices", "measured_choice"]

GPU_CHECK_RECORD = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_check.json"
VARIANTS = ("causal", "documents", "window")
# What auto runs on CUDA without a measurement: backends tested on GPUs by others.
DEFAULT_BACKEND = {"causal": "sdpa", "documents": "flex", "window": "flex"}
CANDIDATE = "triton"  # the backend a measurement may promote


def variant_of(document_mask: bool, sliding_window: int) -> str:
    """The mask variant of a run's attention calls."""
    return "window" if sliding_window else "documents" if document_mask else "causal"


def kernels_fingerprint() -> str:
    """A hash of our attention kernels' source: a measurement holds only for the kernels it ran."""
    # NOTE: the files are found, not imported: importing the kernels imports triton, whose interpreter setting
    # is fixed by the first import (and this is only bookkeeping).
    digest = hashlib.sha256()
    for module in ("triton_kernels", "op"):
        digest.update(Path(importlib.util.find_spec(f"torchtrain.kernels.attention.{module}").origin).read_bytes())
    return digest.hexdigest()[:16]


def torch_release() -> str:
    """The running PyTorch's release, ``major.minor`` (``2.13.0+cu130`` -> ``2.13``)."""
    import torch

    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def decide(variant: str, correct: dict[str, bool], fwd_bwd_ms: dict[str, dict[int, float]]) -> tuple[str, str]:
    """(backend, why) for one variant from a GPU check's findings.

    Args:
        correct: backend -> whether its bf16 forward and backward passed the check against the fp32 reference.
        fwd_bwd_ms: backend -> {sequence length: median forward+backward milliseconds} of the timings that ran.
    """
    default = DEFAULT_BACKEND[variant]
    if default not in correct:
        return default, f"{default} not checked"
    if not correct.get(CANDIDATE):
        return default, f"{CANDIDATE} not measured correct"
    ours, theirs = fwd_bwd_ms.get(CANDIDATE, {}), fwd_bwd_ms.get(default, {})
    if not correct.get(default):
        return (CANDIDATE, f"{default} failed its check") if ours else (default, f"{CANDIDATE} not timed")
    common = sorted(set(ours) & set(theirs))
    if not common:
        return default, f"{CANDIDATE} and {default} not timed at a common sequence length"
    slower = [s for s in common if ours[s] >= theirs[s]]
    ratios = ", ".join(f"{s}: {theirs[s] / ours[s]:.2f}x" for s in common)
    if slower:
        return default, f"{CANDIDATE} not faster than {default} at every length ({ratios})"
    return CANDIDATE, f"{CANDIDATE} correct and faster than {default} at every length ({ratios})"


def capability_name(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"


def record_choices(path: Path, capability: str, device_name: str, commit: str,
                   choices: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Write ``choices`` (variant -> (backend, why)) for ``capability`` into the record at ``path``, keeping the
    other capabilities' entries; returns the record."""
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
    entries = record.setdefault("attention_choice", {})
    entries[capability] = {"device": device_name, "commit": commit, "kernels": kernels_fingerprint(),
                           "torch": torch_release(),
                           "variants": {v: {"backend": b, "why": why} for v, (b, why) in choices.items()}}
    return record


def measured_choice(capability: str, variant: str, path: Optional[Path] = None) -> Optional[str]:
    """The backend the record (default :data:`GPU_CHECK_RECORD`) measured best for this capability and variant;
    None without a valid record."""
    path = path or GPU_CHECK_RECORD
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text()).get("attention_choice", {}).get(capability)
    except (OSError, ValueError, AttributeError):
        logger.warning("attention auto: %s is unreadable; using the default backends", path)
        return None
    if not entry or variant not in entry.get("variants", {}):
        return None
    if entry.get("kernels") != kernels_fingerprint():
        logger.info("attention auto: %s measured other kernels (%s, commit %s); using the default backends",
                    path, entry.get("kernels"), entry.get("commit"))
        return None
    release = torch_release()
    if entry.get("torch") != release:
        logger.info("attention auto: %s was measured under torch %s, this is %s; using the default backends",
                    path, entry.get("torch"), release)
        return None
    choice = entry["variants"][variant]
    logger.info("attention auto: %s for %s attention on %s (%s, measured at commit %s)", choice["backend"],
                variant, capability, choice.get("why"), entry.get("commit"))
    return choice["backend"]
