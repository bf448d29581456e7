"""The DeepSeek-V3 architecture: MLA attention, DeepSeekMoE feed-forward, multi-token prediction.

Module and parameter names follow the Hugging Face checkpoint layout (REFERENCE §6) so that loading is a
rename, except for two deliberate differences: routed experts are stacked into `[E, 2I, d]` / `[E, d, I]`
tensors (one matmul per active expert, no per-expert modules), and the MTP modules live in `mtp.k`
instead of `model.layers.{num_hidden_layers + k}`. `nanoseek.checkpoint` maps between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig


# A compiled CPU graph calls an external matmul for every F.linear. For the few rows of a decode step a
# multiply-sum is cheaper: inductor fuses it into the kernel of the ops around it, with no library call (decode
# steps of 1 to 4 rows 1.2-1.5x faster); at 6 to 8 rows the two were even, at 32 the library wins. The fused
# loops are split across threads by row, so a one-row step leaves the other threads idle in them.
FUSED_LINEAR_MAX_ROWS = 4


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, as a multiply-sum for a few rows in a compiled CPU inference graph."""
    if (torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.numel() <= FUSED_LINEAR_MAX_ROWS * x.shape[-1]):
        y = (x.unsqueeze(-2) * weight).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) through `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return (self.weight * y).to(x.dtype)


# ---- rotary position embedding with YaRN (REFERENCE §3) -------------------------------------------
def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(config: ModelConfig) -> tuple[float, float]:
    """(low, high) rope-dim indices of the YaRN ramp: dims that complete beta_fast / beta_slow rotations
    over the original context (V3: 10 and 23)."""
    yarn, dim, theta = config.yarn, config.qk_rope_head_dim, config.rope_theta
    orig = yarn.get("original_max_position_embeddings") or config.max_position_embeddings

    def corr(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(yarn.get("beta_fast") or 32), corr(yarn.get("beta_slow") or 1)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def rope_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies of the rope dims and the factor applied to the rotations (1.0 for V3).

    YaRN blends interpolated (freq / factor) and original frequencies with a linear ramp over the
    correction range; the attention temperature goes into `softmax_scale`, not here.
    """
    dim = config.qk_rope_head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    yarn = config.yarn
    if yarn is None:
        return inv_freq, 1.0
    factor = float(yarn["factor"])
    low, high = yarn_correction_range(config)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if yarn.get("attention_factor") is not None:
        attn_factor = float(yarn["attention_factor"])
    elif mscale and mscale_all_dim:
        attn_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(factor)
    return inv_freq, attn_factor


def softmax_scale(config: ModelConfig) -> float:
    """(nope + rope)^-0.5, times mscale^2 with YaRN (the attention temperature; V3: mscale 1.135234)."""
    scale = config.qk_head_dim**-0.5
    yarn = config.yarn
    if yarn and yarn.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"])) ** 2
    return scale


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by multiplying them, as complex numbers, with `freqs`.

    Eagerly one complex multiply instead of a dozen real ops (as DeepSeek's reference does); inside a
    compiled graph, which inductor cannot generate complex code for, the real ops, which it fuses. In
    fp32. x: [..., S, H, rope]; freqs from `DeepSeekV3.rope`: complex [..., S, 1, rope/2], or their
    (real, imaginary) pairs [..., S, 1, rope/2, 2] when compiling.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if freqs.is_complex():
        return torch.view_as_real(torch.view_as_complex(pairs) * freqs).flatten(-2).to(x.dtype)
    (re, im), (cos, sin) = pairs.unbind(-1), freqs.unbind(-1)
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)


def blocked_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None,
                             block: int = 64) -> Tensor:
    """Causal attention [B, H, S, d] as matmuls, each block of queries against the keys up to its own end
    only, for compiled CPU training: fused, it skips the masked upper triangle that the CPU fused kernel
    computes anyway, and v needs no padding to q's head size. The kernel's backward is the slow part: one
    layer of the `small` preset at 8 x 256 tokens, forward + backward, 8.7 vs 12.6 ms (forward alone about
    equal, so inference keeps the kernel). `mask` [B|1, 1, S, S] (bool, True = attend) narrows the causal
    mask, e.g. to packed documents. Keeps every block's probabilities for the backward (S^2 / 2 per head),
    where the kernel keeps one value per query; under bf16 autocast the scores are rounded to bf16 before
    the float softmax, as in eager attention."""
    s = q.shape[-2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # than strided views: a `small` step 1.03-1.06x faster
    out = []
    for start in range(0, s, block):
        end = min(start + block, s)
        scores = (q[..., start:end, :] @ k[..., :end, :].transpose(-1, -2)).float() * scale
        hide = torch.arange(end, device=q.device) > torch.arange(start, end, device=q.device)[:, None]
        if mask is not None:
            hide = hide | ~mask[..., start:end, :end]
        out.append(scores.masked_fill(hide, float("-inf")).softmax(-1).to(v.dtype) @ v[..., :end, :])
    return torch.cat(out, dim=-2)


# ---- the latent KV cache protocol ------------------------------------------------------------------
class LatentCacheLike(Protocol):
    """What absorbed MLA needs from a cache: append this layer's latents, get back the visible context.

    `update(layer, latent)` takes latent [B, S, kv_lora_rank + rope] of the new tokens and returns the
    context [B, T, kv_lora_rank + rope] including them; when the cache keeps them is its own business (the
    engine's paged cache at its `commit()` after the forward, this module's `LatentCache` at once).
    `bias` [B or 1, S, T] is added to the attention scores (0 where attention is allowed, -inf where not),
    or None when every query sees all T keys; it is the same for every layer of a forward, and is only read
    where needed. `causal` is True when every row's new tokens start at position 0 with no padding (then
    T == S and the bias is plain causal: the fused kernel then skips the masked half of the work, and never
    needs the bias).
    """

    causal: bool
    bias: Tensor | None

    def update(self, layer: int, latent: Tensor) -> Tensor: ...


class LatentCache:
    """A simple contiguous cache of the MLA latent: only kv_lora_rank + rope values per token per layer.

    The paged engine cache implements the same `update`; this one serves tests and simple generation.
    Call `advance(S)` after each forward (the model does it) to commit the new tokens.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
        self.data = torch.zeros(n_layers, batch, max_len, config.latent_dim, dtype=dtype, device=device)
        self.length = 0
        self._new = 0  # tokens of the forward in progress
        self._bias: Tensor | None = None  # their attention bias, once built

    def update(self, layer: int, latent: Tensor) -> Tensor:
        s = latent.shape[1]
        end = self.length + s
        if end > self.data.shape[2]:
            raise ValueError(f"LatentCache full: {end} tokens > max_len {self.data.shape[2]}")
        self.data[layer, :, self.length:end] = latent
        self._new = s
        return self.data[layer, :, :end].to(latent.dtype)  # (a no-op unless the cache's dtype differs)

    @property
    def bias(self) -> Tensor | None:
        """Causal over the tokens of the forward in progress (a single query sees everything); built once
        per forward, on first use."""
        if self._bias is None and self._new > 1:
            k = torch.arange(self.length + self._new, device=self.data.device)
            hidden = k[self.length:, None] < k[None, :]
            self._bias = torch.zeros(1, *hidden.shape, device=self.data.device).masked_fill_(hidden, float("-inf"))
        return self._bias

    @property
    def causal(self) -> bool:
        return self.length == 0

    def advance(self, n: int) -> None:
        self.length += n
        self._bias = None

    def nbytes_per_token(self) -> int:
        return self.data.shape[0] * self.data.shape[-1] * self.data.element_size()


# ---- Multi-head Latent Attention (V3 report §2.1.1) ----------------------------------------------
class MLA(nn.Module):
    """Multi-head latent attention with low-rank q, low-rank kv and a decoupled shared rope key."""

    # Folding W_UK / W_UV into the projections (decoding) trades FLOPs for fewer operations: worth it while
    # the folded weights stay small (`small`: 1.34x the weights they replace), not for V3 (3.39x; 36B
    # parameters more over its 62 layers).
    fold_max_growth = 1.5

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = (
            c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
        self.kv_rank = c.kv_lora_rank
        self.scale = softmax_scale(c)
        qk = c.qk_head_dim
        if c.q_lora_rank:  # q_a_proj and kv_a_proj_with_mqa both read x: one fused matmul
            self.fused_a_proj = Linear(c.hidden_size, c.q_lora_rank + c.latent_dim, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = Linear(c.hidden_size, self.n_heads * qk, bias=False)
            self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.latent_dim, bias=c.attention_bias)
        self.q_lora_rank = c.q_lora_rank
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        h, r, q_in = self.n_heads, self.kv_rank, c.q_lora_rank or c.hidden_size
        plain = h * qk * q_in + c.hidden_size * h * self.v_dim + h * (self.nope + self.v_dim) * r
        self.fold = h * (r + self.rope) * q_in + c.hidden_size * h * r <= self.fold_max_growth * plain
        self._folded: tuple | None = None  # (source weights, (wq, wo))

    def _project(self, x: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """(query input [B,S,q_lora_rank] (q_a normed; x without q lora), latent [B,S,rank+rope])."""
        if self.q_lora_rank:
            q_a, kv_a = self.fused_a_proj(x).split([self.q_lora_rank, self.kv_rank + self.rope], dim=-1)
            return self.q_a_layernorm(q_a), self._latent(kv_a, freqs)
        return x, self._latent(self.kv_a_proj_with_mqa(x), freqs)

    def _latent(self, kv_a: Tensor, freqs: Tensor) -> Tensor:
        """What the cache stores, from the kv down-projection: [c_kv (normed) | rotated k_pe]."""
        c_kv, k_pe = kv_a.split([self.kv_rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(-2), freqs).squeeze(-2)
        return torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)

    def _q_up(self) -> nn.Linear:
        return self.q_b_proj if self.q_lora_rank else self.q_proj

    # Absorbed attention works on every cached latent per query: the cheapest for decoding and drafts, but
    # for more queries than this it pays to decompress the context once and use the fused kernel.
    absorb_max_queries = 48  # measured on CPU: below it absorbed wins at any context length

    def forward(self, x: Tensor, freqs: Tensor, cache: LatentCacheLike | None = None,
                mask: Tensor | None = None) -> Tensor:
        """`mask` [B, 1, S, S] (True = attend) narrows the causal mask, e.g. to keep packed documents apart."""
        q_in, latent = self._project(x, freqs)
        if cache is None:
            return self.o_proj(self._decompressed(q_in, freqs, latent, mask, causal=mask is None, uncached=True))
        context = cache.update(self.layer_idx, latent)
        if x.shape[1] > self.absorb_max_queries:  # a prefill chunk: decompressing the context once is cheaper
            if cache.causal:  # plain causal: the kernel skips half the work
                return self.o_proj(self._decompressed(q_in, freqs, context, None, causal=True))
            bias = cache.bias
            return self.o_proj(self._decompressed(q_in, freqs, context, None if bias is None else bias.unsqueeze(1),
                                                  causal=False))
        return self._absorbed(q_in, freqs, context, cache.bias)

    def store_latents(self, x: Tensor, freqs: Tensor, cache: LatentCacheLike) -> None:
        """Only hand the latents of x's positions to the cache, for positions no query is needed at."""
        kv_a = self.fused_a_proj(x)[..., self.q_lora_rank:] if self.q_lora_rank else self.kv_a_proj_with_mqa(x)
        cache.update(self.layer_idx, self._latent(kv_a, freqs))

    def _decompressed(self, q_in: Tensor, freqs: Tensor, latent: Tensor, mask: Tensor | None,
                      causal: bool, uncached: bool = False) -> Tensor:
        """The ordinary path: k and v decompressed for every head from latent [B, T, rank+rope], then the
        fused kernel (or, compiled CPU training, `blocked_causal_attention`); mask [B|1, 1, S, T] (bool, True =
        attend; or an additive bias) or None, or `causal` (S == T); `uncached`: the queries attend to their
        own positions, causally (a mask, e.g. packed documents, is causal too), which the blocked path needs.
        -> [B, S, H * v]."""
        b, s, _ = q_in.shape
        h, t = self.n_heads, latent.shape[1]
        q = self._q_up()(q_in).view(b, s, h, self.nope + self.rope)
        q = torch.cat([q[..., : self.nope], apply_rope(q[..., self.nope:], freqs)], dim=-1).transpose(1, 2)
        c_kv, k_pe = latent.split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, t, h, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, t, h, self.rope)], dim=-1).transpose(1, 2)
        if uncached and self._blocked(q):
            o = blocked_causal_attention(q, k, v.transpose(1, 2), self.scale, mask)
            return o.transpose(1, 2).reshape(b, s, -1)
        pad = q.shape[-1] - self.v_dim  # the fused CPU/GPU kernels want equal q/k/v head dims
        v = F.pad(v, (0, pad)) if pad > 0 else v
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # a no-op unless the cache's dtype differs from the compute dtype
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, is_causal=causal,
                                           scale=self.scale)
        return o[..., : self.v_dim].transpose(1, 2).reshape(b, s, -1)

    # Compiled CPU training runs causal attention as blocked matmuls up to this length (memory: every
    # block's probabilities are kept for the backward).
    blocked_max_len = 1024

    def _blocked(self, q: Tensor) -> bool:
        return (torch.compiler.is_compiling() and torch.is_grad_enabled() and q.device.type == "cpu"
                and q.shape[-2] <= self.blocked_max_len)

    def _absorbed(self, q_in: Tensor, freqs: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        """Attention computed in the latent space (REFERENCE §2), for a few queries per row against a cache.

        Each head's query becomes [q_nope W_UK | q_pe] (scaled), so scores are one matmul with the cached
        [c_kv | k_pe] rows, and W_UV maps the attended latent back before o_proj. Small models fold W_UK
        into the query projection and W_UV into o_proj (`folded_weights`). Queries are laid out
        (position, head), so no transposes are needed. q_in [B,S,q_in], context [B,T,rank+rope], bias
        [B|1,S,T] or None -> [B,S,d].
        """
        b, s, _ = q_in.shape
        h, r = self.n_heads, self.kv_rank
        folded = self.folded_weights()
        if folded is not None:
            q = linear(q_in, folded[0]).view(b, s, h, r + self.rope)
            q_lat, q_pe = q[..., :r], q[..., r:]
        else:
            w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, r)
            q = self._q_up()(q_in).view(b, s, h, self.nope + self.rope) * self.scale
            q_lat, q_pe = torch.einsum("bshn,hnr->bshr", q[..., : self.nope], w[:, : self.nope]), q[..., self.nope:]
        q = torch.cat([q_lat, apply_rope(q_pe, freqs)], dim=-1).view(b, s * h, r + self.rope)
        scores = torch.bmm(q, context.transpose(1, 2)).float()  # [B, S*H, T]
        if bias is not None:
            scores.view(b, s, h, -1).add_(bias[:, :, None])
        o_lat = torch.bmm(scores.softmax(dim=-1).to(q.dtype), context[..., :r])  # [B, S*H, rank]
        if folded is not None:
            return linear(o_lat.view(b, s, h * r), folded[1], self.o_proj.bias)
        return self.o_proj(torch.einsum("bshr,hvr->bshv", o_lat.view(b, s, h, r), w[:, self.nope:]).flatten(2))

    def folded_weights(self) -> tuple[Tensor, Tensor] | None:
        """(query weight [H*(rank+rope), q_in] with W_UK and the softmax scale folded in, output weight
        [d, H*rank] with W_UV folded in), or None where folding would grow the weights too much.

        Derived once, then again only at `refold()` (whoever changes the parameters in place calls it: the
        engine's runner, when told the weights changed), or when a source weight is replaced or changes
        dtype or device. A compiled graph reads the cached tensors as they are, so they stay graph inputs
        instead of being refolded every step. For inference: no gradient flows through them."""
        if not self.fold:
            return None
        sources = (self._q_up().weight, self.kv_b_proj.weight, self.o_proj.weight)
        if torch.compiler.is_compiling():
            return self._folded[1] if self._folded is not None else self._fold(*sources)
        cached = self._folded
        if (cached is None or any(a is not w for a, w in zip(cached[0], sources))
                or (cached[1][0].dtype, cached[1][0].device) != (sources[0].dtype, sources[0].device)):
            self._folded = (sources, self._fold(*sources))
        return self._folded[1]

    def refold(self) -> None:
        """Fold the parameters as they are now, into the tensors `folded_weights` hands out (which compiled
        graphs read): call after changing the parameters in place."""
        if self.folded_weights() is None:  # (which folds afresh if it never did, or a weight was replaced)
            return
        sources, folded = self._folded
        with torch.inference_mode(False), torch.no_grad():
            for dst, src in zip(folded, self._fold(*sources)):
                dst.copy_(src)

    def _fold(self, q_w: Tensor, kv_w: Tensor, o_w: Tensor) -> tuple[Tensor, Tensor]:
        h, nope, rope, v, r = self.n_heads, self.nope, self.rope, self.v_dim, self.kv_rank
        # plain fp32 tensors, usable in and out of inference mode, whatever autocast is doing
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(q_w.device.type, enabled=False):
            kv, q = kv_w.float().view(h, nope + v, r), q_w.float().view(h, nope + rope, -1)
            q_lat = kv[:, :nope].transpose(1, 2) @ q[:, :nope]  # [H, rank, q_in]: q_in -> q_nope W_UK
            wq = torch.cat([q_lat, q[:, nope:]], dim=1).reshape(h * (r + rope), -1) * self.scale
            wo = (o_w.float().view(-1, h, v).transpose(0, 1) @ kv[:, nope:]).transpose(0, 1).reshape(-1, h * r)
        return wq.to(q_w.dtype), wo.to(o_w.dtype)


# ---- feed-forward: dense SwiGLU and DeepSeekMoE (V3 report §2.1.2) ------------------------------
class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); gate and up are one fused [2I, d] matmul
    (the checkpoint stores them as gate_proj and up_proj)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class RouterStats:
    """Per MoE layer: tokens routed to each expert, and the sequence-wise balance loss (REFERENCE §4)."""

    load: list[Tensor] = field(default_factory=list)
    balance_loss: list[Tensor] = field(default_factory=list)


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k; the correction bias steers selection, never the weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, d] -> (weights [T, K], expert ids [T, K], sigmoid scores [T, E]); routing in fp32."""
        device = x.device.type  # entering autocast costs ~9 µs, a tenth of a decode step's routing: only if on
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            scores = linear(x.float(), self.weight.float()).sigmoid()
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            t, e = biased.shape
            grouped = biased.view(t, self.n_group, e // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            drop = torch.ones_like(group_score, dtype=torch.bool)
            drop.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, False)
            biased = grouped.masked_fill(drop[..., None], float("-inf")).view(t, e)
        idx = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, idx, scores


def _probe_grouped_mm() -> bool:
    """torch._grouped_mm runs every expert's matmul in one call; older torch builds lack it (or its CPU
    kernel), and then the experts run one matmul each."""
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(2, 8, 8), offs=torch.tensor([1, 2], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


GROUPED_MM_CPU = _probe_grouped_mm()


def grouped_linear(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """x [N, in] with rows grouped by expert, w [E, out, in], offs [E] int32 end row of each group -> [N, out]."""
    if torch.is_autocast_enabled(x.device.type):  # autocast does not know this op: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    mm = _opaque_grouped_mm if torch.compiler.is_compiling() else torch._grouped_mm
    return mm(x, w.transpose(1, 2), offs=offs)


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def _opaque_grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """torch._grouped_mm as an op opaque to torch.compile, whose own shape function accepts only bf16:
    a [N, K] @ b [E, K, M] -> [N, M] with a's rows grouped, or a [K, N] @ b [N, M] -> [E, K, M] with the
    shared N grouped (the weight gradient)."""
    return torch._grouped_mm(a, b, offs=offs)


@_opaque_grouped_mm.register_fake
def _(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: Tensor) -> tuple:
    a, b, offs = ctx.saved_tensors  # only the rows-grouped form is ever differentiated
    grad_a = _opaque_grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_b = _opaque_grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_opaque_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class _GatherRows(torch.autograd.Function):
    """x[perm // k]: a permutation of x's rows each repeated k times. Its backward gathers too (by the
    inverse permutation, then sums each row's k copies), where index_select's backward would scatter-add:
    atomic adds in compiled CPU code, about 4 ms a MoE layer in a `small` training step."""

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


class MoE(nn.Module):
    """DeepSeekMoE: shared experts for every token plus top-k of many fine-grained routed experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, inter, e = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
        self.n_experts, self.top_k = e, config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = nn.Module()  # keeps the checkpoint prefix `mlp.experts.`
        self.experts.gate_up = nn.Parameter(torch.empty(e, 2 * inter, d))
        self.experts.down = nn.Parameter(torch.empty(e, d, inter))
        self.shared_experts = MLP(d, inter * config.n_shared_experts) if config.n_shared_experts else None
        self.expert_linear = F.linear  # fp8.apply_fp8 swaps in the FP8 matmul
        # Expert-parallel training (train.expert_parallel) sets this: then this module holds only its rank's
        # experts, and `dispatcher(self, flat, weights, idx, scores, out)` adds the routed experts' outputs
        # from the ranks that hold them, in place of the local expert path below.
        self.dispatcher: Callable[..., Tensor] | None = None

    # A decode step routes a few tokens: running just their K experts beats grouping rows by expert (a
    # sort, a grouped matmul over every expert, a scatter). Eagerly that is a matmul per (token, expert),
    # worth it up to 2 tokens on CPU; compiled on CPU, the gathered experts fuse into one kernel, which beat
    # grouping by 1.1-1.4x a decode step at 4 to 128 rows (measured no further).
    direct_max_tokens = 2
    compiled_direct_max_tokens = 128

    def forward(self, x: Tensor, stats: RouterStats | None = None) -> Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        weights, idx, scores = self.gate(flat)
        out = self.shared_experts(flat).to(flat.dtype) if self.shared_experts is not None else torch.zeros_like(flat)
        if self.dispatcher is None and stats is None and not torch.is_grad_enabled():
            gathered = torch.compiler.is_compiling() and self.expert_linear is F.linear
            fused = gathered and flat.device.type == "cpu"
            if flat.shape[0] <= (self.compiled_direct_max_tokens if fused else self.direct_max_tokens):
                return (self._gathered if gathered else self._direct)(flat, weights, idx, out).view(b, s, d)
        flat_idx = idx.reshape(-1)
        # not bincount: its output's shape depends on the data, which torch.compile cannot trace
        counts = flat_idx.new_zeros(self.n_experts).index_add_(0, flat_idx, torch.ones_like(flat_idx))
        order = flat_idx.argsort(stable=True)  # the (token, slot) pairs grouped by expert
        if self.dispatcher is not None:
            out = self.dispatcher(self, flat, weights, idx, scores, out)
        elif torch.compiler.is_compiling():  # gathers both ways: a compiled scatter-add is atomic (_GatherRows)
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
            xs = _GatherRows.apply(flat, order, inverse, self.top_k)  # each token once per slot, by expert
            ys = _GatherRows.apply(self._experts(xs, counts), inverse, order, 1)  # back in token order
            out = self._weighted_sum(out, ys.view(b * s, self.top_k, d), weights)
        else:  # eagerly one scatter-add pass beats a gather, a product and a sum (0.6 vs 0.95 ms of ops, 1000 tokens)
            token = order // self.top_k
            xs = flat.index_select(0, token)  # index_select, not flat[token]: its backward is a cheap index_add
            ys = self._experts(xs, counts) * weights.reshape(-1).index_select(0, order)[:, None].to(xs.dtype)
            out = out.index_add(0, token, ys)
        if stats is not None:
            stats.load.append(counts)
            stats.balance_loss.append(self._balance_loss(scores.view(b, s, -1), idx.view(b, s, -1)))
        return out.view(b, s, d)

    def _gathered(self, flat: Tensor, weights: Tensor, idx: Tensor, out: Tensor) -> Tensor:
        """out + each token's K experts, compiled for CPU: inductor turns these one-row matmuls into a fused
        multiply-sum that reads the indexed weights in place, so the gathered [T, K, ...] weights are never
        materialised (on CUDA they would be, so there only for a token or two)."""
        g, u = torch.einsum("td,tkid->tki", flat, self.experts.gate_up[idx]).chunk(2, dim=-1)
        y = torch.einsum("tki,tkdi->tkd", F.silu(g) * u, self.experts.down[idx])
        return self._weighted_sum(out, y, weights)

    @staticmethod
    def _weighted_sum(out: Tensor, y: Tensor, weights: Tensor) -> Tensor:
        """out + each token's K expert outputs y [T, K, d] weighted by the router weights [T, K]."""
        return out + (y * weights[..., None].to(y.dtype)).sum(1)

    def _direct(self, flat: Tensor, weights: Tensor, idx: Tensor, out: Tensor) -> Tensor:
        """out + each token's K experts, for a token or two at inference (no grouping by expert)."""
        for t, (ws, es) in enumerate(zip(weights.tolist(), idx.tolist())):  # plain float weights
            for w, e in zip(ws, es):
                out[t:t + 1].add_(self._expert(flat[t:t + 1], self.experts.gate_up[e], self.experts.down[e]), alpha=w)
        return out

    def _expert(self, x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        """One routed expert's SwiGLU over rows x."""
        g, u = self.expert_linear(x, gate_up).chunk(2, dim=-1)
        return self.expert_linear(F.silu(g) * u, down)

    def _experts(self, xs: Tensor, counts: Tensor) -> Tensor:
        """Every routed expert's SwiGLU over its rows of xs (grouped by expert, counts [E] rows each)."""
        gate_up, down = self.experts.gate_up, self.experts.down
        if GROUPED_MM_CPU and xs.device.type == "cpu" and self.expert_linear is F.linear:
            offs = counts.cumsum(0).to(torch.int32)
            g, u = grouped_linear(xs, gate_up, offs).chunk(2, dim=-1)
            return grouped_linear(F.silu(g) * u, down, offs)
        # one matmul per active expert; split/unbind, not slicing: their backward is one concatenation
        # instead of a full-size zero gradient per expert
        return torch.cat([self._expert(chunk, gu, dn) for chunk, gu, dn in
                          zip(xs.split(counts.tolist()), gate_up.unbind(0), down.unbind(0)) if chunk.shape[0]])

    def _balance_loss(self, scores: Tensor, idx: Tensor) -> Tensor:
        """Sequence-wise balance loss sum_i f_i P_i, averaged over sequences (alpha applied by the trainer)."""
        b, s, e = scores.shape
        counts = torch.zeros(b, e, device=scores.device).scatter_add_(
            1, idx.reshape(b, -1), torch.ones(b, idx.shape[1] * idx.shape[2], device=scores.device))
        f = counts * (e / (self.top_k * s))
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * p).sum(-1).mean()


# ---- decoder layer, MTP module, full model ------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, freqs: Tensor, cache: LatentCacheLike | None = None,
                stats: RouterStats | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), freqs, cache, mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, stats) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's output norm (the head itself is the main model's lm_head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module k (V3 report §2.2): h' = Layer(eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h: Tensor, next_emb: Tensor, freqs: Tensor,  # type: ignore[override]
                cache: LatentCacheLike | None = None, stats: RouterStats | None = None,
                mask: Tensor | None = None) -> Tensor:
        return self.block(self.combine(h, next_emb), freqs, cache, stats, mask)

    def combine(self, h: Tensor, next_emb: Tensor) -> Tensor:
        """The layer's input from h_i and the embedding of t_{i+k}."""
        return self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))

    def block(self, x: Tensor, freqs: Tensor, cache: LatentCacheLike | None = None,
              stats: RouterStats | None = None, mask: Tensor | None = None) -> Tensor:
        """The decoder layer over an already combined input."""
        return super().forward(x, freqs, cache, stats, mask)


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm (the checkpoint's `model.` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: Tensor
    hidden: Tensor  # final-normed hidden states of the main model
    mtp_logits: list[Tensor] = field(default_factory=list)  # depth k: [B, S-k, V], slot i predicts t_{i+k+1}
    expert_load: Tensor | None = None  # [n_moe_layers (+ MTP), E] tokens routed per expert
    balance_loss: Tensor | None = None  # sum over MoE layers of the sequence-wise balance loss


def segment_positions_and_mask(segments: Tensor) -> tuple[Tensor, Tensor]:
    """For packed rows with document ids [B, S]: positions restarting at each document, and the
    [B, 1, S, S] mask that is causal within a document and closed across documents."""
    b, s = segments.shape
    idx = torch.arange(s, device=segments.device).expand(b, s)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    positions = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    return positions, (same & causal)[:, None]


class DeepSeekV3(nn.Module):
    """DeepSeek-V3: `model(input_ids)` -> logits [B, S, V]; ask for `mtp`/`router_stats` to get a ModelOutput."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers))
        inv_freq, self.rope_attn_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
        for m in self.modules():
            if isinstance(m, Gate):
                m.e_score_correction_bias.zero_()

    def rope(self, positions: Tensor) -> Tensor:
        """Complex rotations [.., S, 1, rope/2] (magnitude: the YaRN attention factor) for integer
        positions [S] or [B, S]; when compiling, as real pairs [.., S, 1, rope/2, 2] (see `apply_rope`)."""
        angles = positions.float()[..., None, None] * self.inv_freq
        if torch.compiler.is_compiling():
            return torch.stack([angles.cos(), angles.sin()], dim=-1) * self.rope_attn_factor
        return torch.polar(torch.full_like(angles, self.rope_attn_factor), angles)

    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None,
                      cache: LatentCacheLike | None = None, stats: RouterStats | None = None,
                      segments: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, S, d]; the engine applies `lm_head` only where it needs logits.

        positions ([S] or [B, S]) default to 0..S-1, offset by a LatentCache's committed length.
        `segments` [B, S] (ids of packed documents) keeps attention within each document and restarts
        positions at each document's first token, so a packed row trains like separate sequences.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        mask = None
        if segments is not None:
            positions, mask = segment_positions_and_mask(segments)
        elif positions is None:
            start = cache.length if isinstance(cache, LatentCache) else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        freqs = self.rope(positions)
        for layer in self.model.layers:
            x = layer(x, freqs, cache, stats, mask)
        if isinstance(cache, LatentCache):
            cache.advance(input_ids.shape[1])
        return self.model.norm(x)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: LatentCacheLike | None = None,
                *, mtp: bool = False, router_stats: bool = False, segments: Tensor | None = None
                ) -> Tensor | ModelOutput:
        """Logits for input_ids [B, S]; with a cache the absorbed MLA path attends over cached latents."""
        stats = RouterStats() if router_stats else None
        hidden = self.hidden_states(input_ids, positions, cache, stats, segments)
        logits = self.lm_head(hidden)
        if not (mtp or router_stats):
            return logits
        out = ModelOutput(logits=logits, hidden=hidden)
        if mtp:
            s = input_ids.shape[1]
            mask = None
            if segments is not None:
                pos, mask = segment_positions_and_mask(segments)
            else:
                pos = torch.arange(s, device=input_ids.device)
            h = hidden
            for k, module in enumerate(self.mtp, start=1):
                if s - k <= 0:
                    break
                emb = self.model.embed_tokens(input_ids[:, k:])
                h = module(h[:, : s - k], emb, self.rope(pos[..., : s - k]), None, stats,
                           None if mask is None else mask[..., : s - k, : s - k])
                out.mtp_logits.append(self.lm_head(module.shared_head.norm(h)))
        if stats is not None and stats.load:
            out.expert_load = torch.stack(stats.load)
            out.balance_loss = torch.stack(stats.balance_loss).sum()
        return out

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
