"""What the GPU's kernels save for the backward, and how the fake step on a CPU saves the same.

The planner runs a GPU plan's step on fake CPU tensors, so every op dispatches as it would on a CPU.
Where an op's CPU path saves different tensors for the backward than its CUDA kernel, the plan's
activations would be the CPU's. :data:`GPU_SAVED_FOR_BACKWARD` lists, for the ops of a Llama-family
step, what the CUDA kernel's autograd node keeps (the names autograd gives them, ``grad_fn._saved_<name>``),
read from torch's derivatives (the ``FusedRmsNormBackward0`` and ``ScaledDotProduct*Backward0`` nodes) and
from our own kernel's ``setup_context`` (``kernels/attention/op.py``):

* ``aten._fused_rms_norm`` (``F.rms_norm`` on CUDA): the input, the weight and ``rstd`` (fp32 ``[..., 1]``).
  On CPU ``_fused_rms_norm`` has no kernel, only its composite (``rms_norm_composite``), which autograd
  records op by op: an fp32 copy of the input and the fp32 normalised input, ``[S, d]`` each, plus
  ``rstd``. For a bf16 input that is 8·d bytes per token instead of the CUDA node's 2·d, per norm.
  :func:`gpu_autograd` gives ``_fused_rms_norm`` a CPU kernel for the duration of the fake step, so the
  dispatcher takes torch's own autograd formula, the one CUDA takes, and saves exactly the CUDA set.
* SDPA's CUDA kernels (flash, memory-efficient, cuDNN): query, key, value, output, the fp32
  log-sum-exp ``[B, H, S]`` (memory-efficient pads ``S`` to a multiple of 32), the additive mask where
  there is one (memory-efficient and cuDNN) and the dropout RNG state (two 8-byte scalars). The CPU's
  ``_scaled_dot_product_flash_attention_for_cpu``, which the fake step dispatches to with or without a
  mask, saves the same tensors but the RNG state: nothing to substitute.
* ``torchtrain::flash_attention`` (the Triton kernels): q, k, v, out and the fp32 lse ``[B, H, S]``, and
  the document ids when masking documents; its fake kernel is the same op, so the CPU step saves the same.

The fused AdamW (``fused=True``, on CUDA and CPU alike) keeps its two moments and a step count per
parameter and no temporaries worth counting; the fake step runs ``optimizer.step`` unwatched and counts
only the state it creates (``fake_step.py``), so there is nothing GPU-specific to plan there.
"""

from __future__ import annotations

import contextlib

import torch

aten = torch.ops.aten

GPU_SAVED_FOR_BACKWARD: dict[torch._ops.OpOverload, tuple[str, ...]] = {
    aten._fused_rms_norm.default: ("input", "weight", "result1"),  # result1: rstd, fp32 [..., 1]
    aten._scaled_dot_product_flash_attention.default: (
        "query", "key", "value", "output", "logsumexp", "philox_seed", "philox_offset"),
    aten._scaled_dot_product_efficient_attention.default: (
        "query", "key", "value", "attn_bias", "output", "log_sumexp", "philox_seed", "philox_offset"),
    aten._scaled_dot_product_cudnn_attention.default: (
        "query", "key", "value", "attn_bias", "output", "logsumexp", "philox_seed", "philox_offset"),
    torch.ops.torchtrain.flash_attention.default: ("q", "k", "v", "out", "lse", "document_ids", "kv_document_ids"),
}
"""Op -> the tensors its CUDA kernel's autograd node saves for the backward (see the module docstring)."""


@contextlib.contextmanager
def gpu_autograd(device_type: str):
    """Within this context, ops whose CPU path saves other tensors than their CUDA kernel save the CUDA set.

    NOTE: ``aten._fused_rms_norm`` has a CUDA kernel and a CompositeImplicitAutograd fallback; the
    dispatcher takes the fallback (autograd through its parts) on any backend without a kernel of its
    own, and torch's autograd formula (saving input, weight and rstd) on those with one. Registering
    torch's own decompositions as its CPU kernels, scoped to the fake step, makes a CPU tensor take the
    CUDA route: the same autograd node, the same DTensor sharding rules. Under ``FakeTensorMode`` the
    kernels never run (the fake mode answers with shapes); they are there to be a correct CPU kernel.
    Faking CUDA tensors instead does not work on a CPU-only build (the autograd engine aborts on a
    "cuda" device it cannot guard). Outside a GPU plan nothing is registered, so the CPU target and the
    trainer's CPU runs keep the composite path that a CPU really runs.
    """
    if device_type != "cuda":
        yield
        return
    from torch._decomp import decompositions

    with torch.library._scoped_library("aten", "IMPL") as lib:
        lib.impl("_fused_rms_norm", decompositions._fused_rms_norm, "CPU")
        lib.impl("_fused_rms_norm_backward", decompositions._fused_rms_norm_backward, "CPU")
        yield
