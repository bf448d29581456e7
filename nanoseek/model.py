"""DeepSeek-V3 in the papers' notation: RMSNorm, RoPE with YaRN, MLA, DeepSeekMoE, multi-token prediction.

Module and parameter names follow the Hugging Face checkpoint layout (REFERENCE §6) so that loading is a
rename, except for two deliberate differences: routed experts are stacked into `[E, 2I, d]` / `[E, d, I]`
tensors (one matmul per active expert, no per-expert modules), and the MTP modules live in `mtp.k`
instead of `model.layers.{num_hidden_layers + k}`. `nanoseek.checkpoint` maps between the two.

The functions below are the reference computations. `DeepSeekV3.prepare(job, compiled)` swaps faster
forms of some of them in from `nanoseek.kernels`, once, for a job (training or decoding, compiled or not).
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
from .kernels import GroupedMask, Kernels, grouped_experts_loop, select
from .kernels.folded import FoldedMLA, fold_pays
from .latent_cache import LatentCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as the reference implementations do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # nothing to cast: the weight goes into the norm's own kernel
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


def rotations(angles: Tensor, magnitude: float) -> Tensor:
    """The rotations e^(i angle), scaled by the YaRN attention factor, as complex numbers."""
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by multiplying them, as complex numbers, with `freqs`
    (complex [..., S, 1, rope/2]), in fp32; x [..., S, H, rope]."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


# ---- attention and the routed experts, as references ----------------------------------------------
def attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """softmax(q k^T * scale + mask) v for each head: q [B,H,S,d], k [B,H,T,d], v [B,H,T,dv]; mask
    [B|1,1,S,T] (bool, True = attend; or added to the scores), or `causal` (S == T) instead."""
    pad = q.shape[-1] - v.shape[-1]  # the fused kernels want equal q/k/v head dims
    o = F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask, is_causal=causal, scale=scale
    )
    return o[..., : v.shape[-1]]


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | GroupedMask | None = None
) -> Tensor:
    """Queries attending to their own sequence (S == T): each to its position and those before it, and
    with `mask` [B|1,1,S,S] (bool, True = attend, or added to the scores; causal itself) only where it
    allows, e.g. within a packed document, or within the groups of a `GroupedMask`."""
    if isinstance(mask, GroupedMask):
        mask = mask.dense()
    return attention(q, k, v, scale, mask, causal=mask is None)


def latent_attention(q: Tensor, context: Tensor, bias: Tensor | None, rank: int) -> Tensor:
    """Absorbed attention in the latent space (REFERENCE §2): softmax(q C^T + bias) C[..., :rank] for the
    queries q [B, S*H, rank+rope] (laid out (position, head), scaled) over the context C [B, T, rank+rope];
    bias [B|1, S, T] or None -> the attended latents [B, S*H, rank]."""
    # as (C q^T)^T: the cached rows are read in the layout they are stored in, where q C^T would have a
    # compiled graph copy the whole context into its transpose first
    scores = torch.bmm(context, q.transpose(1, 2)).transpose(1, 2).float()  # [B, S*H, T]
    if bias is not None:
        b, s = q.shape[0], bias.shape[1]
        scores.view(b, s, -1, scores.shape[-1]).add_(bias[:, :, None])
    return torch.bmm(scores.softmax(dim=-1).to(q.dtype), context[..., :rank])


def routed_experts(
    x: Tensor,
    weights: Tensor,
    idx: Tensor,
    gate_up: Tensor,
    down: Tensor,
    out: Tensor,
    linear: Callable[[Tensor, Tensor], Tensor] = F.linear,
) -> Tensor:
    """out + sum_k w_k Expert_{idx_k}(x) for tokens x [T, d] (weights, idx [T, K] from the gate), expert
    by expert as in DeepSeek's code; the experts' weights are stacked, gate_up [E, 2I, d], down [E, d, I]."""
    for e, n in enumerate(torch.bincount(idx.reshape(-1), minlength=gate_up.shape[0]).tolist()):
        if n:
            token, slot = torch.where(idx == e)
            g, u = linear(x[token], gate_up[e]).chunk(2, dim=-1)
            y = linear(F.silu(g) * u, down[e])
            out = out.index_add(0, token, y * weights[token, slot, None].to(x.dtype))
    return out


REFERENCE = Kernels(
    job="reference",
    compiled=False,
    linear=F.linear,
    rotations=rotations,
    apply_rope=apply_rope,
    causal_attention=causal_attention,
    expert_linear=F.linear,
    routed_experts=routed_experts,
    grouped_experts=grouped_experts_loop,
    latent_attention=latent_attention,
    paged_context=False,
    fold_absorbed=False,
)


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint names) through the prepared `kernels.linear`."""

    kernels = REFERENCE

    def forward(self, x: Tensor) -> Tensor:
        return self.kernels.linear(x, self.weight, self.bias)


# ---- the latent KV cache protocol ------------------------------------------------------------------
class LatentCacheLike(Protocol):
    """What MLA needs from a cache: append this layer's latents, get back the visible context.

    `update(layer, latent)` takes latent [B, S, kv_lora_rank + rope] of the new tokens and returns the
    context [B, T, kv_lora_rank + rope] including them (when the cache keeps them is its own business);
    where the model's kernels have `paged_context`, a cache may instead hand back, for one query a row, a
    context left where it is stored, which only those kernels' `latent_attention` reads.
    `bias` [B or 1, S, T] is added to the attention scores (0 where attention is allowed, -inf where not),
    or None when every query sees all T keys; the same for every layer of a forward, read only where
    needed. `causal`: every row's new tokens start at position 0 with no padding (T == S, plain causal:
    the fused kernel then skips the masked half of the work).
    """

    causal: bool
    bias: Tensor | None

    def update(self, layer: int, latent: Tensor) -> Tensor: ...


# ---- Multi-head Latent Attention (V3 report §2.1.1) ----------------------------------------------
class MLA(nn.Module):
    """Multi-head latent attention with low-rank q, low-rank kv and a decoupled rope key shared by all heads.

    Two forms: `decompressed` (training and prefill: k and v decompressed for every head) and `absorbed`
    (decoding: the queries move into the latent space and attend over the cached latents themselves).
    """

    kernels = REFERENCE
    # The absorbed form reads every cached latent for each query: cheapest for the few queries of a decode
    # step (and its drafts); a longer prefill chunk pays for decompressing its context once.
    absorb_max_queries = 48

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = (
            c.num_attention_heads,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
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
        # decoding's absorb_query / absorb_output with W_UK and W_UV folded in, where DeepSeekV3.prepare
        # chooses them
        self.folded: FoldedMLA | None = None

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        cache: LatentCacheLike | None = None,
        mask: Tensor | GroupedMask | None = None,
    ) -> Tensor:
        """`mask` [B, 1, S, S] (True = attend) narrows the causal mask, e.g. to keep packed documents
        apart, or is a `GroupedMask`."""
        q_in, latent = self._project(x, freqs)
        if cache is None:  # training and scoring: the queries attend causally to their own sequence
            q, k, v = self.decompressed(q_in, freqs, latent)
            return self._output(self.kernels.causal_attention(q, k, v, self.scale, mask))
        context = cache.update(self.layer_idx, latent)
        if x.shape[1] <= self.absorb_max_queries:
            return self.absorbed(q_in, freqs, context, cache.bias)
        q, k, v = self.decompressed(q_in, freqs, context)  # a prefill chunk
        bias = None if cache.causal or cache.bias is None else cache.bias.unsqueeze(1).to(q.dtype)
        return self._output(attention(q, k, v, self.scale, bias, causal=cache.causal))

    def _project(self, x: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
        """(query input [B,S,q_lora_rank] (q_a normed; x without q lora), latent [B,S,rank+rope])."""
        if self.q_lora_rank:
            q_a, kv_a = self.fused_a_proj(x).split([self.q_lora_rank, self.kv_rank + self.rope], dim=-1)
            return self.q_a_layernorm(q_a), self._latent(kv_a, freqs)
        return x, self._latent(self.kv_a_proj_with_mqa(x), freqs)

    def _latent(self, kv_a: Tensor, freqs: Tensor) -> Tensor:
        """What the cache stores, from the kv down-projection: [c_kv (normed) | rotated k_pe]."""
        c_kv, k_pe = kv_a.split([self.kv_rank, self.rope], dim=-1)
        k_pe = self.kernels.apply_rope(k_pe.unsqueeze(-2), freqs).squeeze(-2)
        return torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)

    def q_up(self) -> nn.Linear:
        return self.q_b_proj if self.q_lora_rank else self.q_proj

    def store_latents(self, x: Tensor, freqs: Tensor, cache: LatentCacheLike) -> None:
        """Only hand the latents of x's positions to the cache, for positions no query is needed at."""
        if self.q_lora_rank:
            kv_a = self.fused_a_proj(x)[..., self.q_lora_rank :]
        else:
            kv_a = self.kv_a_proj_with_mqa(x)
        cache.update(self.layer_idx, self._latent(kv_a, freqs))

    def decompressed(self, q_in: Tensor, freqs: Tensor, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every head's q [B,H,S,nope+rope], and k [B,H,T,nope+rope], v [B,H,T,v] decompressed from the
        latent [B,T,rank+rope] (REFERENCE §2): k = [c_kv W_UK | k_pe], v = c_kv W_UV."""
        b, s, _ = q_in.shape
        h, t = self.n_heads, latent.shape[1]
        q = self.q_up()(q_in).view(b, s, h, self.nope + self.rope)
        q = torch.cat([q[..., : self.nope], self.kernels.apply_rope(q[..., self.nope :], freqs)], dim=-1)
        c_kv, k_pe = latent.split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, t, h, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, t, h, self.rope)], dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _output(self, o: Tensor) -> Tensor:
        """o_proj over the heads' outputs o [B,H,S,v] -> [B,S,d]."""
        return self.o_proj(o.transpose(1, 2).flatten(2))

    def absorb_query(self, q_in: Tensor) -> tuple[Tensor, Tensor]:
        """Each head's query moved into the latent space, scaled: (q_nope W_UK [B,S,H,rank], q_pe
        [B,S,H,rope]) for q_in [B,S,q_in]."""
        b, s, _ = q_in.shape
        w_uk = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)[:, : self.nope]
        q = self.q_up()(q_in).view(b, s, self.n_heads, self.nope + self.rope) * self.scale
        return torch.einsum("bshn,hnr->bshr", q[..., : self.nope], w_uk), q[..., self.nope :]

    def absorb_output(self, o_lat: Tensor) -> Tensor:
        """Each head's attended latent o_lat [B,S,H,rank] mapped back by W_UV, then o_proj -> [B,S,d]."""
        w_uv = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)[:, self.nope :]
        return self.o_proj(torch.einsum("bshr,hvr->bshv", o_lat, w_uv).flatten(2))

    def absorbed(self, q_in: Tensor, freqs: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        """Attention computed in the latent space, for a few queries per row against a cache (REFERENCE §2).

        Each head's query becomes [q_nope W_UK | q_pe] (scaled), so scores are one matmul with the cached
        [c_kv | k_pe] rows (`latent_attention`), and W_UV maps the attended latent back before o_proj.
        q_in [B,S,q_in], context [B,T,rank+rope], bias [B|1,S,T] or None -> [B,S,d].
        """
        b, s, _ = q_in.shape
        h, r = self.n_heads, self.kv_rank
        # the folded form has the same two methods; the model keeps it while prepared for other jobs
        absorb = self.folded if self.kernels.fold_absorbed and self.folded is not None else self
        q_lat, q_pe = absorb.absorb_query(q_in)
        q = torch.cat([q_lat, self.kernels.apply_rope(q_pe, freqs)], dim=-1).view(b, s * h, r + self.rope)
        o_lat = self.kernels.latent_attention(q, context, bias, r)  # [B, S*H, rank]
        return absorb.absorb_output(o_lat.view(b, s, h, r))


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

    def record(self, scores: Tensor, idx: Tensor) -> None:
        """Adds a layer's load and balance loss sum_i f_i P_i, averaged over sequences (alpha applied by the
        trainer), from its scores [B, S, E] and choices [B, S, K]."""
        b, s, e = scores.shape
        flat = idx.reshape(b, -1)
        self.load.append(flat.new_zeros(e).index_add_(0, flat.reshape(-1), torch.ones_like(flat.reshape(-1))))
        ones = torch.ones_like(flat, dtype=torch.float)
        counts = torch.zeros(b, e, device=scores.device).scatter_add_(1, flat, ones)
        f = counts * (e / (idx.shape[-1] * s))
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        self.balance_loss.append((f * p).sum(-1).mean())


class Gate(nn.Module):
    """Sigmoid router with group-limited top-k; the correction bias steers selection, never the weights."""

    kernels = REFERENCE

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.n_group = config.num_experts_per_tok, config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, d] -> (weights [T, K], expert ids [T, K], sigmoid scores [T, E]); routing in fp32."""
        device = x.device.type  # entering autocast costs more than a decode step's routing: only if it is on
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            scores = self.kernels.linear(x.float(), self.weight.float()).sigmoid()
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


class MoE(nn.Module):
    """DeepSeekMoE: shared experts for every token plus top-k of many fine-grained routed experts."""

    kernels = REFERENCE

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, inter, e = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
        self.n_experts, self.top_k = e, config.num_experts_per_tok
        self.gate = Gate(config)
        self.experts = nn.Module()  # keeps the checkpoint prefix `mlp.experts.`
        self.experts.gate_up = nn.Parameter(torch.empty(e, 2 * inter, d))
        self.experts.down = nn.Parameter(torch.empty(e, d, inter))
        self.shared_experts = MLP(d, inter * config.n_shared_experts) if config.n_shared_experts else None
        # Expert-parallel training (train.expert_parallel) sets this: then this module holds only its rank's
        # experts, and `dispatcher(self, x, weights, idx, scores, out)` adds the routed experts' outputs
        # from the ranks that hold them, in place of `kernels.routed_experts`.
        self.dispatcher: Callable[..., Tensor] | None = None

    def forward(self, x: Tensor, stats: RouterStats | None = None) -> Tensor:
        b, s, d = x.shape
        u = x.reshape(-1, d)
        weights, idx, scores = self.gate(u)
        out = self.shared_experts(u).to(u.dtype) if self.shared_experts is not None else torch.zeros_like(u)
        if self.dispatcher is not None:
            out = self.dispatcher(self, u, weights, idx, scores, out)
        else:
            out = self.kernels.routed_experts(u, weights, idx, self.experts.gate_up, self.experts.down, out)
        if stats is not None:
            stats.record(scores.view(b, s, -1), idx.view(b, s, -1))
        return out.view(b, s, d)


# ---- decoder layer, MTP module, full model ------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: Tensor,
        freqs: Tensor,
        cache: LatentCacheLike | None = None,
        stats: RouterStats | None = None,
        mask: Tensor | GroupedMask | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), freqs, cache, mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, stats) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The MTP module's output norm (the head itself is the main model's lm_head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module k (V3 report §2.2):
    h' = Layer(eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        h: Tensor,
        next_emb: Tensor,
        freqs: Tensor,  # type: ignore[override]
        cache: LatentCacheLike | None = None,
        stats: RouterStats | None = None,
        mask: Tensor | GroupedMask | None = None,
    ) -> Tensor:
        return super().forward(self.combine(h, next_emb), freqs, cache, stats, mask)

    def combine(self, h: Tensor, next_emb: Tensor) -> Tensor:
        """The layer's input from h_i and the embedding of t_{i+k}."""
        return self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h)], dim=-1))


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
    """DeepSeek-V3: `model(input_ids)` -> logits [B, S, V]; `mtp`/`router_stats` give a ModelOutput."""

    kernels = REFERENCE

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

    def prepare(
        self,
        job: str,
        compiled: bool = False,
        expert_linear: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> DeepSeekV3:
        """Choose, once for a job, the functions every module computes with (`nanoseek.kernels.select`):
        "reference" (this file's), "train" or "decode"; `compiled` if torch.compile will run the model.
        Call it on the model's final device. `expert_linear` replaces the routed experts' matmul (FP8).
        Preparing again replaces the job's choice but keeps the FP8 matmul, and `compiled` once set (for
        graphs compiled before); every choice computes the same sums, only at different speeds."""
        chosen = select(
            REFERENCE,
            job,
            self.device,
            compiled or self.kernels.compiled,
            expert_linear or self.kernels.expert_linear,
        )
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = chosen
            if isinstance(module, MLA) and chosen.fold_absorbed and fold_pays(module):
                if module.folded is None:
                    module.folded = FoldedMLA(module)
                else:  # the same tensors, which compiled graphs read, folded from the parameters as they are
                    module.folded.refold()
        return self

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
        """The rotations (magnitude: the YaRN attention factor) of integer positions [S] or [B, S], in the
        form `kernels.apply_rope` takes ([.., S, 1, rope/2] complex for the reference)."""
        angles = positions.float()[..., None, None] * self.inv_freq
        return self.kernels.rotations(angles, self.rope_attn_factor)

    def hidden_states(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: LatentCacheLike | None = None,
        stats: RouterStats | None = None,
        segments: Tensor | None = None,
        mask: Tensor | GroupedMask | None = None,
    ) -> Tensor:
        """Final-normed hidden states [B, S, d]; the engine applies `lm_head` only where it needs logits.

        positions ([S] or [B, S]) default to 0..S-1, offset by a LatentCache's committed length.
        `segments` [B, S] (ids of packed documents) keeps attention within each document and restarts
        positions at each document's first token, so a packed row trains like separate sequences.
        `mask` [B, 1, S, S] (bool, True = attend; within the causal mask), with `positions`, is any other
        packing; a `GroupedMask`, for one row [1, T] of groups packed without padding, e.g. GRPO's
        completions sharing their prompt.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if segments is not None and mask is not None:
            raise ValueError("segments and mask: pass one (segments make their own mask)")
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

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        cache: LatentCacheLike | None = None,
        *,
        mtp: bool = False,
        router_stats: bool = False,
        segments: Tensor | None = None,
        mask: Tensor | GroupedMask | None = None,
    ) -> Tensor | ModelOutput:
        """Logits for input_ids [B, S]; with a cache the absorbed MLA path attends over cached latents.
        `segments` or `mask`: packed rows (`hidden_states`)."""
        if mtp and mask is not None:
            raise ValueError("mask: the MTP loss takes packed rows as segments only")
        stats = RouterStats() if router_stats else None
        hidden = self.hidden_states(input_ids, positions, cache, stats, segments, mask)
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
                h = module(
                    h[:, : s - k],
                    emb,
                    self.rope(pos[..., : s - k]),
                    None,
                    stats,
                    None if mask is None else mask[..., : s - k, : s - k],
                )
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
