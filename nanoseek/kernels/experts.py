"""Fast forms of the routed experts.

The reference, `model.routed_experts`, loops over the experts as DeepSeek's code does. Every function here
named `*_experts` takes its arguments (x [T, d], the router's weights and expert ids [T, K], the stacked
weights gate_up [E, 2I, d] and down [E, d, I], and `out`, to which it adds the routed experts' outputs)
and returns the same sum. The `grouped_*` functions run every expert over its rows of xs, which are grouped
by expert (`counts` [E] rows each), as the sorted forms and expert parallelism's dispatcher need.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import when_compiled

Linear = Callable[[Tensor, Tensor], Tensor]


def swiglu(x: Tensor, gate_up: Tensor, down: Tensor, linear: Linear = F.linear) -> Tensor:
    """One expert over rows x: down(silu(gate(x)) * up(x))."""
    g, u = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(g) * u, down)


# ---- every expert over its rows -----------------------------------------------------------------------
def grouped_experts_loop(
    xs: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor, linear: Linear = F.linear
) -> Tensor:
    """The reference `grouped_experts`: a matmul pair per active expert (any matmul, FP8's too). split and
    unbind, not slicing: their backward is one concatenation, not a full-size zero gradient per expert."""
    chunks = zip(xs.split(counts.tolist()), gate_up.unbind(0), down.unbind(0), strict=True)
    return torch.cat([swiglu(chunk, gu, dn, linear) for chunk, gu, dn in chunks if chunk.shape[0]])


def grouped_experts_mm(xs: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Replaces `grouped_experts_loop`: every expert's matmul in one `torch._grouped_mm` call."""
    offs = counts.cumsum(0).to(torch.int32)
    g, u = grouped_linear(xs, gate_up, offs).chunk(2, dim=-1)
    return grouped_linear(F.silu(g) * u, down, offs)


def grouped_linear(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x [N, in] with rows grouped by expert, w [E, out, in], offs [E] int32 end row of each group ->
    [N, out]."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know this op: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    return grouped_mm(x, w.transpose(1, 2), offs=offs)


def _probe_grouped_mm() -> bool:
    """Older torch builds lack torch._grouped_mm or its CPU kernel: then the experts run a matmul each."""
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(2, 8, 8), offs=torch.tensor([1, 2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


GROUPED_MM_CPU = _probe_grouped_mm()


@cache
def grouped_mm_on_cuda(index: int) -> bool:
    """Whether torch._grouped_mm runs in bf16 on this GPU (Hopper or newer, in recent torch builds)."""
    try:
        x = torch.ones(32, 16, dtype=torch.bfloat16, device=f"cuda:{index}")
        offs = torch.tensor([16, 32], dtype=torch.int32, device=x.device)
        torch._grouped_mm(x, torch.ones(2, 16, 16, dtype=torch.bfloat16, device=x.device), offs=offs)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def grouped_experts_cuda(xs: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """Replaces `grouped_experts_loop` on a GPU where `grouped_mm_on_cuda`: every expert's matmul in one
    `torch._grouped_mm` call when the experts compute in bf16 (bf16 weights, or under bf16 autocast), the
    kernel's only type there; the loop in fp32."""
    autocast = torch.is_autocast_enabled(xs.device.type)
    dtype = torch.get_autocast_dtype(xs.device.type) if autocast else xs.dtype
    if dtype != torch.bfloat16:
        return grouped_experts_loop(xs, counts, gate_up, down)
    return grouped_experts_mm(xs, counts, gate_up, down)  # (which casts as autocast would)


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def opaque_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """torch._grouped_mm as an op opaque to torch.compile, whose own shape function accepts only bf16:
    a [N, K] @ b [E, K, M] -> [N, M] with a's rows grouped, or a [K, N] @ b [N, M] -> [E, K, M] with the
    shared N grouped (the weight gradient)."""
    return torch._grouped_mm(a, b, offs=offs)


@opaque_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: Tensor) -> tuple:
    a, b, offs = ctx.saved_tensors  # only the rows-grouped form is ever differentiated
    grad_a = opaque_grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_b = opaque_grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


opaque_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
# Traced, the opaque op: whatever kernels a model was prepared with, torch.compile must be able to run it.
grouped_mm = when_compiled(opaque_grouped_mm, torch._grouped_mm) if GROUPED_MM_CPU else opaque_grouped_mm


# ---- every token's experts ---------------------------------------------------------------------------
def _by_expert(idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """(rows per expert [E], the (token, slot) pairs flattened and sorted by expert)."""
    flat = idx.reshape(-1)
    # not bincount: its output's shape depends on the data, which torch.compile cannot trace
    counts = flat.new_zeros(n_experts).index_add_(0, flat, torch.ones_like(flat))
    return counts, flat.argsort(stable=True)


def sorted_experts(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    gate_up: Tensor,
    down: Tensor,
    out: Tensor,
    grouped: Callable[..., Tensor] = grouped_experts_loop,
) -> Tensor:
    """Replaces `model.routed_experts` eagerly: each token's rows sorted by expert, every expert run once
    (`grouped`), the weighted rows added back in one scatter-add pass (one pass beats a gather, a product
    and a sum)."""
    counts, order = _by_expert(idx, gate_up.shape[0])
    token = order // idx.shape[1]
    xs = x.index_select(0, token)  # index_select, not x[token]: its backward is a cheap index_add
    ys = grouped(xs, counts, gate_up, down) * weights.reshape(-1).index_select(0, order)[:, None].to(xs.dtype)
    return out.index_add(0, token, ys)


class _GatherRows(torch.autograd.Function):
    """x[perm // k]: a permutation of x's rows each repeated k times. Its backward gathers too (by the
    inverse permutation, then sums each row's k copies), where index_select's backward would scatter-add:
    atomic adds in compiled CPU code."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, perm // k if k > 1 else perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        (inv,) = ctx.saved_tensors
        grad = grad.index_select(0, inv)
        return (grad.view(-1, ctx.k, grad.shape[-1]).sum(1) if ctx.k > 1 else grad), None, None, None


def gathered_sorted_experts(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    gate_up: Tensor,
    down: Tensor,
    out: Tensor,
    grouped: Callable[..., Tensor] = grouped_experts_loop,
) -> Tensor:
    """Replaces `model.routed_experts` in compiled graphs: as `sorted_experts`, but the rows go to expert
    order and back by gathers both ways (`_GatherRows`), since a compiled scatter-add is atomic."""
    t, k = idx.shape
    counts, order = _by_expert(idx, gate_up.shape[0])
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    xs = _GatherRows.apply(x, order, inverse, k)  # each token once per slot, by expert
    ys = _GatherRows.apply(grouped(xs, counts, gate_up, down), inverse, order, 1)  # back in token order
    return out + (ys.view(t, k, -1) * weights[..., None].to(ys.dtype)).sum(1)


def direct_experts(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    gate_up: Tensor,
    down: Tensor,
    out: Tensor,
    linear: Linear = F.linear,
) -> Tensor:
    """Replaces `model.routed_experts` for a token or two (a decode step): just each token's K experts, a
    matmul pair each, with no sort by expert and no scatter. Adds into `out` in place."""
    k = idx.shape[1]
    for i, (e, w) in enumerate(zip(idx.reshape(-1).tolist(), weights.reshape(-1).unbind(), strict=True)):
        t = i // k
        out[t : t + 1].addcmul_(swiglu(x[t : t + 1], gate_up[e], down[e], linear), w)
    return out


def gathered_experts(
    x: Tensor, weights: Tensor, idx: Tensor, gate_up: Tensor, down: Tensor, out: Tensor
) -> Tensor:
    """Replaces `model.routed_experts` for the few tokens of a decode step in a compiled CPU graph: inductor
    turns these one-row matmuls into a fused multiply-sum that reads the indexed weights in place, so the
    gathered [T, K, ...] weights are never materialised (on CUDA they would be)."""
    g, u = torch.einsum("td,tkid->tki", x, gate_up[idx]).chunk(2, dim=-1)
    y = torch.einsum("tki,tkdi->tkd", F.silu(g) * u, down[idx])
    return out + (y * weights[..., None].to(y.dtype)).sum(1)


def up_to(max_tokens: int, few: Callable[..., Tensor], many: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`few` for batches of up to max_tokens tokens, `many` for larger ones."""

    def routed_experts(x: Tensor, *args: Tensor) -> Tensor:
        return (few if x.shape[0] <= max_tokens else many)(x, *args)

    return routed_experts
