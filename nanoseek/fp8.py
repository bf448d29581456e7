"""FP8 with DeepSeek-V3's fine-grained scaling (V3 report §3.3, REFERENCE §6).

Weights are quantised per 128x128 block, activations and gradients per 1x128 tile along the contraction
dimension, to float8_e4m3fn with scale = amax / 448; products accumulate in fp32. `FP8Linear` trains
with fp32 master weights and runs the three GEMMs of a linear layer (Fprop, Dgrad, Wgrad) on FP8 inputs.
On CPU the GEMM is emulated: the FP8 values are dequantised and multiplied in fp32, so the rounding is the
hardware's up to accumulation order. On CUDA `torch._scaled_mm` with block scales is used where the
installed torch supports it.

The scale tensors here are what checkpoints call `weight_scale_inv`: dequantised = fp8 value x scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DeepSeekV3, MoE

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
log = logging.getLogger("nanoseek.fp8")


@dataclass
class FP8Stats:
    """Non-finite activation/gradient values met while quantising (they saturate or stay NaN)."""

    nonfinite: int = 0


stats = FP8Stats()


def _scale(amax: Tensor, pow2: bool) -> Tensor:
    scale = amax.float() / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block: any finite scale
    return torch.exp2(torch.ceil(torch.log2(scale))) if pow2 else scale


def quantize_weight(w: Tensor, block: int = BLOCK, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """[out, in] -> (float8_e4m3fn [out, in], fp32 scales [ceil(out/block), ceil(in/block)]); ragged
    edges are padded with zeros for the amax and cut off again."""
    out_f, in_f = w.shape
    padded = F.pad(w.detach().float(), (0, -in_f % block, 0, -out_f % block))
    rows, cols = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.view(rows, block, cols, block)
    scale = _scale(blocks.abs().amax(dim=(1, 3)), pow2)
    q = (blocks / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.view(rows * block, cols * block)[:out_f, :in_f].contiguous(), scale


def dequantize_weight(q: Tensor, scale: Tensor, block: int = BLOCK) -> Tensor:
    out_f, in_f = q.shape
    full = scale.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return q.float() * full


def quantize_activation(x: Tensor, tile: int = BLOCK, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """[..., K] -> (float8_e4m3fn [..., K], fp32 scales [..., ceil(K/tile)]), one scale per 1 x tile.

    Infinities saturate to +-448 and NaNs stay NaN, both counted in `stats.nonfinite`; the scale comes
    from the finite values, so it stays finite. A tile with nothing but NaN is an error.
    """
    k = x.shape[-1]
    tiles = F.pad(x.detach().float(), (0, -k % tile)).view(*x.shape[:-1], -1, tile)
    finite = torch.isfinite(tiles)
    if not bool(finite.all()):
        real = torch.arange(tiles.shape[-2] * tile, device=x.device).view(-1, tile) < k  # not padding
        nan = torch.isnan(tiles)
        stats.nonfinite += int((~finite & real).sum())
        all_nan = (nan | ~real).all(-1)
        if bool(all_nan.any()):
            where = tuple(int(i) for i in all_nan.nonzero()[0])
            raise ValueError(
                f"FP8 quantisation: activation tile {where} (row index..., tile) is entirely NaN; "
                "the values feeding this layer have diverged"
            )
    scale = _scale(tiles.abs().masked_fill(~finite, 0).amax(-1), pow2)
    q = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.view(*x.shape[:-1], -1)[..., :k], scale


def dequantize_activation(q: Tensor, scale: Tensor, tile: int = BLOCK) -> Tensor:
    return q.float() * scale.float().repeat_interleave(tile, -1)[..., : q.shape[-1]]


# ---- the GEMM ----------------------------------------------------------------------------------------
_SCALED_MM: dict[str, bool] = {}  # per scaling of b ("block" / "tile"): does torch._scaled_mm take it here?


def fp8_mm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, b_blocks: bool) -> Tensor:
    """a @ b.T in fp32 for FP8 a [M,K] in 1x128 tiles along K and FP8 b [N,K] in 128x128 blocks
    (`b_blocks`) or in 1x128 tiles along K. On CUDA the tensor cores via `torch._scaled_mm` where this
    torch/GPU has block scaling; elsewhere the dequantised fp32 product."""
    out = _scaled_mm(a, a_scale, b, b_scale, "block" if b_blocks else "tile") if a.is_cuda else None
    if out is None:
        deq_b = dequantize_weight(b, b_scale) if b_blocks else dequantize_activation(b, b_scale)
        out = dequantize_activation(a, a_scale) @ deq_b.t()
    return out


def _scaled_mm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, kind: str) -> Tensor | None:
    if _SCALED_MM.get(kind) is False or not hasattr(torch, "_scaled_mm"):
        return None
    try:  # cuBLAS wants a row-major, b column-major, and both scale tensors outer-dimension-major
        out = torch._scaled_mm(
            a.contiguous(),
            b.contiguous().t(),
            scale_a=a_scale.t().contiguous().t(),
            scale_b=b_scale.contiguous().t(),
            out_dtype=torch.float32,
        )
        _SCALED_MM[kind] = True
        return out
    except (RuntimeError, TypeError, ValueError) as e:
        log.warning(
            "torch._scaled_mm takes no 1x128 x %s scaling here (%s); emulating that FP8 GEMM",
            "128x128" if kind == "block" else "1x128",
            str(e).splitlines()[0],
        )
        _SCALED_MM[kind] = False
        return None


def fp8_linear_forward(x: Tensor, w: Tensor, pow2: bool = False) -> tuple[Tensor, tuple]:
    """Fprop: y = x @ w.T with x in 1x128 tiles and w in 128x128 blocks; returns y (fp32) and what the
    backward needs (the input, to be quantised along the tokens for Wgrad, and the FP8 weight)."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_activation(x2, pow2=pow2)
    wq, ws = quantize_weight(w, pow2=pow2)
    y = fp8_mm(xq, xs, wq, ws, b_blocks=True)
    return y.view(*x.shape[:-1], w.shape[0]), (x2, wq, ws)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, pow2: bool) -> Tensor:
        y, saved = fp8_linear_forward(x, w, pow2)
        ctx.save_for_backward(*saved)
        ctx.pow2, ctx.x_shape, ctx.x_dtype = pow2, x.shape, x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, wq, ws = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        # Dgrad: dx = gy @ w, contraction over the output dim: gy in 1x128 tiles along it, w's blocks transposed
        gq, gs = quantize_activation(gy2, pow2=ctx.pow2)
        dx = fp8_mm(gq, gs, wq.t(), ws.t(), b_blocks=True)
        # Wgrad: dw = gy.T @ x, contraction over tokens: both operands in 1x128 tiles along the tokens
        gtq, gts = quantize_activation(gy2.t(), pow2=ctx.pow2)
        xtq, xts = quantize_activation(x2.t(), pow2=ctx.pow2)
        dw = fp8_mm(gtq, gts, xtq, xts, b_blocks=False)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), dw, None


def fp8_linear(x: Tensor, w: Tensor, pow2: bool = False) -> Tensor:
    """F.linear (no bias) with FP8 inputs in all three GEMMs; autocast is bypassed, accumulation is fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return _FP8LinearFn.apply(x, w.float(), pow2)


class FP8Linear(nn.Linear):
    """nn.Linear whose matmuls run in FP8 (fp32 master weight, same parameter names as nn.Linear)."""

    pow2: bool = False

    def forward(self, x: Tensor) -> Tensor:
        y = fp8_linear(x, self.weight, self.pow2)
        return y if self.bias is None else y + self.bias.to(y.dtype)


# Kept in higher precision, as in the report: embeddings, output head, router, norms, and the attention
# core (scores/softmax/values, which never go through an nn.Linear here).
KEEP_HIGH_PRECISION = ("embed_tokens", "lm_head", "gate")


def apply_fp8(model: DeepSeekV3, pow2: bool = False) -> int:
    """Switch every eligible linear layer (attention projections, dense MLPs, shared and routed experts)
    to FP8 in place, the routed experts by preparing the model's kernels again with the FP8 matmul; returns
    how many weight matrices now train in FP8."""
    count = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf not in KEEP_HIGH_PRECISION:
            module.__class__ = FP8Linear
            module.pow2 = pow2
            count += 1
        elif isinstance(module, MoE):  # routed experts: stacked weights, one matmul each
            count += module.n_experts * 2
    model.prepare(model.kernels.job, model.kernels.compiled, expert_linear=partial(fp8_linear, pow2=pow2))
    return count
