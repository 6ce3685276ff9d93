"""FlashAttention-2 style attention: Triton kernels, their torch op and the pure-PyTorch reference.

* :func:`flash_attention` (op ``torchtrain::flash_attention``): ``(out, lse)``; the kernels on
  CUDA (and on CPU under ``TRITON_INTERPRET=1``), the reference elsewhere. See ``op.py``.
* :func:`reference_attention` / :func:`reference_attention_backward`: the oracle (``reference.py``).
* ``triton_kernels.py``: the ``@triton.jit`` kernels; imported lazily, only when needed.
"""

from torchtrain.kernels.attention.op import flash_attention
from torchtrain.kernels.attention.reference import (document_mask, reference_attention, reference_attention_backward,
                                         visibility_mask)

__all__ = ["flash_attention", "reference_attention", "reference_attention_backward", "document_mask",
           "visibility_mask"]
