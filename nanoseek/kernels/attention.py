"""Causal attention as blocked matmuls, for compiled CPU training; attention within groups of tokens packed
into one row without padding (`GroupedMask`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


@dataclass
class GroupedMask:
    """The mask of one row [1, T] that packs groups of tokens back to back, no padding between them, and
    whose tokens attend within their own group only: each group is a row of a padded [G, S] layout, where
    `mask` [G, 1, S, S] (bool, True = attend; within the causal mask) says what each token attends to. The
    linear layers then compute real tokens only; attention (`grouped_attention`) moves them to that layout
    and back. Token i sits at slot `slots[i]` of the layout flattened to [G*S]; `tokens` [G*S] holds each
    slot's token, T for padding. A padding slot must attend to something (e.g. itself): a row of the softmax
    over nothing would be NaN, and its backward would carry the NaN into real tokens' gradients."""

    mask: Tensor
    slots: Tensor
    tokens: Tensor

    @classmethod
    def of(cls, mask: Tensor, lengths: Sequence[int]) -> GroupedMask:
        """Groups of these `lengths` in order, each at the start of its row of `mask` [G, 1, S, S]."""
        g, s = mask.shape[0], mask.shape[-1]
        if len(lengths) != g or not all(0 < n <= s for n in lengths):
            raise ValueError(f"lengths: {g} groups of 1 to {s} tokens expected, got {list(lengths)}")
        device = mask.device
        starts = torch.arange(g, device=device) * s
        slots = torch.cat([torch.arange(n, device=device) + starts[i] for i, n in enumerate(lengths)])
        tokens = torch.full((g * s,), slots.numel(), dtype=torch.long, device=device)
        tokens[slots] = torch.arange(slots.numel(), device=device)
        return cls(mask, slots, tokens)

    def dense(self) -> Tensor:
        """The same mask over the packed row: [1, 1, T, T]."""
        s = self.mask.shape[-1]
        group, at = self.slots // s, self.slots % s
        within = self.mask[group[:, None], 0, at[:, None], at[None, :]]
        return ((group[:, None] == group[None, :]) & within)[None, None]


def _to_groups(x: Tensor, mask: GroupedMask) -> Tensor:
    """[H, T, d] -> [G, H, S, d] in one gather, padding slots zero."""
    h, _, d = x.shape
    g, s = mask.mask.shape[0], mask.mask.shape[-1]
    padded = torch.cat([x, x.new_zeros(h, 1, d)], dim=1)
    heads = torch.arange(h, device=x.device)
    return padded[heads[None, :, None], mask.tokens.view(g, 1, s)]


def _from_groups(x: Tensor, mask: GroupedMask) -> Tensor:
    """[G, H, S, d] -> [H, T, d] in one gather."""
    s = mask.mask.shape[-1]
    heads = torch.arange(x.shape[1], device=x.device)
    return x[(mask.slots // s)[None, :], heads[:, None], (mask.slots % s)[None, :]]


class _Regroup(torch.autograd.Function):
    """`_to_groups` (to=True) or `_from_groups`, whose gradient is the other one: each reads every token
    once, so the gradient is a gather too, where autograd's own would scatter-add."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: GroupedMask, to: bool) -> Tensor:
        ctx.mask, ctx.to = mask, to
        return _to_groups(x, mask) if to else _from_groups(x, mask)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return (_from_groups(grad, ctx.mask) if ctx.to else _to_groups(grad, ctx.mask)), None, None


def grouped_attention(inner: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`inner` (a causal attention) that also takes a `GroupedMask`: q, k, v [1, H, T, d] move to the
    groups' padded layout [G, H, S, d], `inner` attends there under the groups' mask, and the outputs move
    back to [1, H, T, dv]. Any other mask goes to `inner` as it is."""

    def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
        if not isinstance(mask, GroupedMask):
            return inner(q, k, v, scale, mask)
        q, k, v = (_Regroup.apply(x[0], mask, True) for x in (q, k, v))
        return _Regroup.apply(inner(q, k, v, scale, mask.mask), mask, False)[None]

    return causal_attention
