"""Causal attention as blocked matmuls, for compiled CPU training."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Every block's probabilities are kept for the backward (5/8 of S^2 per head, in 4 blocks): beyond this
# length the fused kernel, which keeps one value per query, is used.
BLOCKED_MAX_LEN = 1024


def blocked_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, blocks: int = 4
) -> Tensor:
    """Replaces `model.causal_attention` in compiled CPU training: [B, H, S, d] attention as matmuls, each
    of `blocks` blocks of queries against the keys up to its own end only. Fused by inductor, it skips most
    of the masked upper triangle that the CPU fused kernel computes anyway (its backward is the costly
    part), and v needs no padding to q's head size. `mask` [B|1, 1, S, S] (bool, True = attend) narrows
    the causal mask, e.g. to packed documents. Under bf16 autocast the scores are rounded to bf16 before
    the float softmax, as in eager attention."""
    s = q.shape[-2]
    # the blocks' matmuls read contiguous copies faster than strided views
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    size = -(-s // blocks)
    out = []
    # a fixed number of blocks (the last ones may be short or empty): one compiled graph for every length,
    # where a fixed block size would unroll a loop of another length for each number of blocks
    for n in range(blocks):
        # bounded by s without comparing: a comparison would specialise the graph to s modulo `blocks`
        start, end = torch.sym_min(n * size, s), torch.sym_min((n + 1) * size, s)
        scores = (q[..., start:end, :] @ k[..., :end, :].transpose(-1, -2)).float() * scale
        rows, cols = scores.shape[-2:]
        hide = (
            torch.arange(cols, device=q.device) > torch.arange(start, start + rows, device=q.device)[:, None]
        )
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
