"""Causal attention as blocked matmuls, for compiled CPU training."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Every block's probabilities are kept for the backward (S^2 / 2 per head): beyond this length the fused
# kernel, which keeps one value per query, is used.
BLOCKED_MAX_LEN = 1024


def blocked_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, block: int = 64
) -> Tensor:
    """Replaces `model.causal_attention` in compiled CPU training: [B, H, S, d] attention as matmuls, each
    block of queries against the keys up to its own end only. Fused by inductor, it skips the masked upper
    triangle that the CPU fused kernel computes anyway (its backward is the costly part), and v needs no
    padding to q's head size. `mask` [B|1, 1, S, S] (bool, True = attend) narrows the causal mask, e.g. to
    packed documents. Under bf16 autocast the scores are rounded to bf16 before the float softmax, as in
    eager attention."""
    s = q.shape[-2]
    # the blocks' matmuls read contiguous copies faster than strided views
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = []
    # counted in blocks, so that a compiled graph guards on the number of blocks, not on the exact length
    for n in range(-(-s // block)):
        start, end = n * block, min((n + 1) * block, s)
        scores = (q[..., start:end, :] @ k[..., :end, :].transpose(-1, -2)).float() * scale
        hide = torch.arange(end, device=q.device) > torch.arange(start, end, device=q.device)[:, None]
        if mask is not None:
            hide = hide | ~mask[..., start:end, :end]
        out.append(scores.masked_fill(hide, float("-inf")).softmax(-1).to(v.dtype) @ v[..., :end, :])
    return torch.cat(out, dim=-2)


def blocked_up_to(max_len: int, reference: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`blocked_causal_attention` for sequences up to max_len, `reference` for longer ones."""

    def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
        if q.shape[-2] > max_len:
            return reference(q, k, v, scale, mask)
        return blocked_causal_attention(q, k, v, scale, mask)

    return causal_attention
