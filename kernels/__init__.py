"""Custom kernels, each registered as a torch.library op next to a pure-PyTorch reference.

The model reaches attention only through ``torchtrain.models.attention.attention``, whose backend
table is where a kernel from this package is plugged in.
"""
