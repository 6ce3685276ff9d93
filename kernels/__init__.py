"""Custom kernels, each registered as a torch.library op next to a pure-PyTorch reference.

* ``kernels.attention``: FlashAttention-2 style Triton attention, op ``torchtrain::flash_attention``
  (GQA, causal, sliding window, packed-document masking; returns the log-sum-exp).

The model reaches attention only through ``torchtrain.models.attention.attention``, whose backend
table is where a kernel from this package is plugged in (backend ``"triton"``).
"""
