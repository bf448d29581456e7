"""Projections of a few rows inside a compiled CPU graph."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

# A compiled CPU graph calls the matmul library for every F.linear. For the few rows of a decode step a
# multiply-sum is cheaper: inductor fuses it into the kernel of the ops around it, with no library call.
# For more rows the library's blocking wins; the fused loops are split across threads by row.
FUSED_LINEAR_MAX_ROWS = 4


def small_row_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Replaces `F.linear` (the model's projections) in compiled CPU decoding: up to
    FUSED_LINEAR_MAX_ROWS rows as a multiply-sum that inductor fuses with its neighbours."""
    if x.numel() > FUSED_LINEAR_MAX_ROWS * x.shape[-1]:
        return F.linear(x, weight, bias)
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias
