"""The training loss: summed token cross-entropy, normalised by the caller.

Summing here and dividing by the global number of valid tokens in the trainer (not averaging per
microbatch) is what makes gradient accumulation and data parallelism exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels with this value (document boundaries) do not count


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over valid tokens of ``-log softmax(logits)[label]``, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
