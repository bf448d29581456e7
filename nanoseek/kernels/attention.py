"""Causal attention as blocked matmuls, for compiled CPU training; attention within groups of tokens packed
into one row without padding (`GroupedMask`), and under an additive mask (`biased_attention`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Every block's probabilities are kept for the backward (5/8 of S^2 per head in 4 blocks, all of S^2 in
# `biased_attention`): beyond this length the fused kernel, which keeps one value per query, is used.
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


def up_to_len(
    max_len: int, short: Callable[..., Tensor], long: Callable[..., Tensor]
) -> Callable[..., Tensor]:
    """`short` (an attention (q, k, v, scale, mask) over [B, H, S, d]) for S up to max_len, `long` beyond."""

    def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
        return (short if q.shape[-2] <= max_len else long)(q, k, v, scale, mask)

    return attention


def biased_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor) -> Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v [B, H, S, d] and the additive form of a mask (causal
    itself), bias [B|1, 1, S, S] float (0: attend, -inf: not), as `GroupedMask.bias`. One block of every
    query against every key: where the mask is sparse (a GRPO group's completions see the prompt and
    themselves only), skipping the upper triangle saves little, and compiled CPU code adds a float bias
    in the softmax's vector loop where a bool mask and position comparisons slow it. Under bf16 autocast
    the scores are rounded to bf16 before the float softmax, as in eager attention."""
    scores = (q @ k.transpose(-1, -2)).float() * scale + bias
    return scores.softmax(-1).to(v.dtype) @ v


@dataclass
class GroupedMask:
    """The mask of one row [1, T] that packs groups of tokens back to back, no padding between them, and
    whose tokens attend within their group only, each group a row of a padded layout [G, S] where `mask`
    [G, 1, S, S] (bool, True = attend; within the causal mask) says what each token attends to. The linear
    layers then compute real tokens only; attention (`grouped_attention`) moves them to that layout and
    back. `tokens` [G, S] holds each slot's token (T: padding), `rows` and `cols` [T] each token's slot:
    every index a tensor of its own, so that no kernel divides to find a slot; `bias` is `mask` in additive
    form (0 or -inf, float), built once for all the layers that attend under it. A padding slot must
    attend to something (e.g. itself): a softmax over nothing would be NaN, and its backward would carry
    the NaN into real tokens' gradients."""

    mask: Tensor
    tokens: Tensor
    rows: Tensor
    cols: Tensor
    bias: Tensor

    @classmethod
    def of(cls, mask: Tensor, lengths: Sequence[int]) -> GroupedMask:
        """Groups of these `lengths`, in order, each at the start of its row of `mask` [G, 1, S, S]."""
        g, s = mask.shape[0], mask.shape[-1]
        if len(lengths) != g or not all(0 < n <= s for n in lengths):
            raise ValueError(f"lengths: {g} groups of 1 to {s} tokens expected, got {list(lengths)}")
        device = mask.device
        rows = torch.repeat_interleave(torch.arange(g, device=device), torch.tensor(lengths, device=device))
        cols = torch.cat([torch.arange(n, device=device) for n in lengths])
        tokens = torch.full((g, s), rows.numel(), device=device)
        tokens[rows, cols] = torch.arange(rows.numel(), device=device)
        bias = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
        return cls(mask, tokens, rows, cols, bias)

    def dense(self) -> Tensor:
        """The same mask over the packed row: [1, 1, T, T]."""
        within = self.mask[self.rows[:, None], 0, self.cols[:, None], self.cols[None, :]]
        return ((self.rows[:, None] == self.rows[None, :]) & within)[None, None]


def _read_tokens(x: Tensor, tokens: Tensor) -> Tensor:
    """x [H, T, d] at `tokens` [G, S] (T: zero) -> [G, H, S, d], in one gather."""
    h, _, d = x.shape
    padded = torch.cat([x, x.new_zeros(h, 1, d)], dim=1)
    heads = torch.arange(h, device=x.device)
    return padded[heads[None, :, None], tokens[:, None, :]]


def _read_slots(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x [G, H, S, d] at the slots `rows`, `cols` [T] -> [H, T, d], in one gather."""
    heads = torch.arange(x.shape[1], device=x.device)
    return x[rows[None, :], heads[:, None], cols[None, :]]


class _Regroup(torch.autograd.Function):
    """Tokens [H, T, d] to their groups' layout [G, H, S, d] (to=True), or back: each is the other's
    gradient, a gather where autograd's own would scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: GroupedMask, to: bool) -> Tensor:
        ctx.mask, ctx.to = mask, to
        return _read_tokens(x, mask.tokens) if to else _read_slots(x, mask.rows, mask.cols)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        mask = ctx.mask
        if ctx.to:
            return _read_slots(grad, mask.rows, mask.cols), None, None
        return _read_tokens(grad, mask.tokens), None, None


def grouped_attention(
    inner: Callable[..., Tensor], biased: Callable[..., Tensor] | None = None
) -> Callable[..., Tensor]:
    """`inner` (a causal attention) that also takes a `GroupedMask`: q, k, v [1, H, T, d] move to the
    groups' padded layout [G, H, S, d], `inner` attends there under the groups' mask (or, where given,
    `biased` under its additive form, `GroupedMask.bias`), and the outputs move back to [1, H, T, dv]. Any
    other mask goes to `inner` as it is."""

    def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
        if not isinstance(mask, GroupedMask):
            return inner(q, k, v, scale, mask)
        q, k, v = (_Regroup.apply(x[0], mask, True) for x in (q, k, v))
        out = inner(q, k, v, scale, mask.mask) if biased is None else biased(q, k, v, scale, mask.bias)
        return _Regroup.apply(out, mask, False)[None]

    return causal_attention
