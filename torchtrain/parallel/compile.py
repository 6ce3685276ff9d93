"""torch.compile of each transformer block, with a clear fallback where the backend cannot compile."""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def backend_works(backend: str, device: torch.device) -> str | None:
    """Compile and run a two-op function; return None if that works, else the reason it does not.

    NOTE: inductor needs a C++ compiler on CPU and Triton on GPU. Finding out here, on a tiny
    function, turns a failure deep inside the first training step into one warning at start-up.
    """
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, backend=backend, fullgraph=True)
        fn(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means "do not compile"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        torch._dynamo.reset()
    return None


def apply_compile(model: nn.Module, backend: str, device: torch.device) -> bool:
    """Compile each block in place (one graph per block, reused by all blocks of the same shape).

    Per-block compilation keeps compile time flat in the number of layers and composes with
    activation checkpointing (inside) and FSDP (outside). Returns whether compilation is on.
    """
    problem = backend_works(backend, device)
    if problem is not None:
        logger.warning(
            "torch.compile with backend %r does not work on %s (%s); training continues in eager mode. "
            "Set --compile.enabled false to silence this warning.", backend, device.type, problem,
        )
        return False
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, backend=backend, fullgraph=True))
    logger.info("torch.compile: backend %s, %d blocks", backend, len(model.layers))
    return True
