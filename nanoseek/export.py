"""Export a checkpoint in the shape another engine needs, computing the same function.

`--for vllm`: vLLM's MLA kernels take a latent head (kv_lora_rank + qk_rope_head_dim) of 320, 512 or 576
values only, and its CPU backend 576 = 512 + 64 only, so every export that is not already 512 + 64 is
widened to it, exactly:

- The latent c_kv is zero-padded from R to 512 values. RMSNorm divides by the root mean square over all
  values, so the real part is scaled by s = sqrt(512 / R) (the mean square, eps included, is then the
  same) and kv_a_layernorm's weight divided by s; kv_b_proj gets zero columns for the padding.
- RoPE rotates pair j of a width-d head by theta^(-2j/d) = theta^(-2kj/(kd)): pair k*j of the width-64
  head, k = 64 / d. The rope rows of q and k_pe move to those pairs (rows are interleaved pairs, as in
  the public checkpoints); the other pairs are zero and add nothing to the scores. YaRN's ramp is a
  function of the pair index, so its correction range is re-targeted to k*low .. k*high through
  beta_fast / beta_slow; the frequencies are then checked pair by pair.
- The softmax scale (nope + rope)^-0.5 (times YaRN's mscale^2) changes with the rope width: the query
  weights absorb the ratio of the old scale to the new one.

The same holds for the MTP layers. Anything this cannot preserve is refused with the reason, and the
widened model is checked against the source on a few tokens before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from .atomic import atomic_write_text
from .checkpoint import CheckpointError, load_model, save_model
from .config import ModelConfig
from .hub import resolve_checkpoint
from .model import DeepSeekV3, rope_inv_freq, softmax_scale, yarn_correction_range
from .tokenizer import load_chat_template, load_tokenizer, save_tokenizer

TARGETS = ("vllm",)
VLLM_KV_LORA_RANK, VLLM_ROPE_DIM = 512, 64  # the 576-wide latent of vLLM's CPU MLA backend (and V3's own)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """A checkpoint the export cannot reshape without changing what it computes; the message says why."""


# ---- the new shape -------------------------------------------------------------------------------
def check_vllm_shape(config: ModelConfig) -> None:
    """Raise ExportError when `config` cannot be widened to vLLM's 512 + 64 latent exactly."""
    r, d = config.kv_lora_rank, config.qk_rope_head_dim
    width = f"kv_lora_rank {r} + qk_rope_head_dim {d} = {r + d}"
    if r > VLLM_KV_LORA_RANK:
        raise ExportError(
            f"{width}: kv_lora_rank above {VLLM_KV_LORA_RANK} cannot be reduced to vLLM's "
            f"{VLLM_KV_LORA_RANK} + {VLLM_ROPE_DIM} latent without changing the model"
        )
    if d > VLLM_ROPE_DIM:
        raise ExportError(
            f"{width}: qk_rope_head_dim above {VLLM_ROPE_DIM} cannot be reduced to vLLM's "
            f"{VLLM_KV_LORA_RANK} + {VLLM_ROPE_DIM} latent without changing the model"
        )
    if VLLM_ROPE_DIM % d:
        raise ExportError(
            f"{width}: qk_rope_head_dim must divide {VLLM_ROPE_DIM}, so that its rope "
            f"frequencies are among those of a {VLLM_ROPE_DIM}-wide head"
        )
    if not config.rope_interleave:
        raise ExportError("rope_interleave false: nanoseek reads rope rows as interleaved pairs only")
    kind = config.rope_scaling and (config.rope_scaling.get("rope_type") or config.rope_scaling.get("type"))
    if kind not in (None, "default", "yarn"):
        raise ExportError(f"rope_scaling type {kind!r}: only YaRN (or none) can be carried over")


def _yarn_beta(config: ModelConfig, dim: int, corr: float) -> float:
    """The number of rotations whose YaRN correction dimension, for a rope head of `dim`, is `corr`."""
    orig = config.yarn.get("original_max_position_embeddings") or config.max_position_embeddings
    return orig / (2 * math.pi) * math.exp(-2 * math.log(config.rope_theta) * corr / dim)


def widened_config(
    config: ModelConfig, rank: int = VLLM_KV_LORA_RANK, rope: int = VLLM_ROPE_DIM
) -> ModelConfig:
    """`config` with kv_lora_rank `rank` and qk_rope_head_dim `rope`, its YaRN ramp re-targeted so that pair
    k*j of the new head has pair j's frequency (k = rope / old rope). Raises ExportError when they differ."""
    old = config.qk_rope_head_dim
    k = rope // old
    extra = dict(config.extra)
    if "head_dim" in extra:  # transformers' name for the rope width
        extra["head_dim"] = rope
    if "qk_head_dim" in extra:
        extra["qk_head_dim"] = config.qk_nope_head_dim + rope
    new = config.replace(kv_lora_rank=rank, qk_rope_head_dim=rope, extra=extra)
    if config.yarn is not None:
        low, high = yarn_correction_range(config)
        if yarn_correction_range(new) != (k * low, k * high):
            # floor/ceil and the clamps are taken at the new width: aim inside the integer we need
            trunc = config.yarn.get("truncate", True)
            lo, hi = (k * low + 0.5, k * high - 0.5) if trunc else (k * low, k * high)
            scaling = {
                **config.rope_scaling,
                "beta_fast": _yarn_beta(new, rope, lo),
                "beta_slow": _yarn_beta(new, rope, hi),
            }
            new = new.replace(rope_scaling=scaling)
    (f_old, a_old), (f_new, a_new) = rope_inv_freq(config), rope_inv_freq(new)
    same = torch.allclose(f_new[::k], f_old, rtol=1e-6, atol=0) and math.isclose(a_new, a_old, rel_tol=1e-9)
    if not same:
        raise ExportError(
            f"rope_scaling {config.rope_scaling}: the frequencies of a {old}-wide rope head "
            f"do not map onto a {rope}-wide one"
        )
    return new


# ---- the tensors -----------------------------------------------------------------------------------
def _spread_pairs(t: Tensor, dim: int, k: int) -> Tensor:
    """Rows (along `dim`) of a rope part as interleaved pairs: pair j goes to pair k*j, the rest are zero."""
    t = t.movedim(dim, 0)
    pairs = t.unflatten(0, (-1, 2))
    out = pairs.new_zeros(pairs.shape[0] * k, *pairs.shape[1:])
    out[::k] = pairs
    return out.flatten(0, 1).movedim(0, dim)


def _widen_kv_a(t: Tensor, old: ModelConfig, new: ModelConfig) -> Tensor:
    """kv_a_proj_with_mqa rows (or its bias) [R + d, ...] -> [R' + D, ...]: c_kv scaled and zero-padded,
    k_pe spread."""
    c_kv, k_pe = t.split([old.kv_lora_rank, old.qk_rope_head_dim])
    s = math.sqrt(new.kv_lora_rank / old.kv_lora_rank)
    pad = c_kv.new_zeros(new.kv_lora_rank - old.kv_lora_rank, *c_kv.shape[1:])
    k = new.qk_rope_head_dim // old.qk_rope_head_dim
    return torch.cat([c_kv * s, pad, _spread_pairs(k_pe, 0, k)])


def _widen_q(w: Tensor, old: ModelConfig, new: ModelConfig) -> Tensor:
    """q_b_proj / q_proj [H*(nope+d), in] -> [H*(nope+D), in], times the ratio of the softmax scales."""
    h, nope = old.num_attention_heads, old.qk_nope_head_dim
    per_head = w.unflatten(0, (h, nope + old.qk_rope_head_dim))
    q_nope, q_pe = per_head.split([nope, old.qk_rope_head_dim], dim=1)
    q_pe = _spread_pairs(q_pe, 1, new.qk_rope_head_dim // old.qk_rope_head_dim)
    ratio = softmax_scale(old) / softmax_scale(new)
    return (torch.cat([q_nope, q_pe], dim=1) * ratio).flatten(0, 1)


def _widen_tensor(name: str, t: Tensor, old: ModelConfig, new: ModelConfig) -> Tensor:
    m = re.fullmatch(r".*\.self_attn\.(\w+)\.(weight|bias)", name)
    if m is None:
        return t
    part, extra_rows = m.group(1), new.kv_lora_rank - old.kv_lora_rank
    if part == "fused_a_proj":  # [q_a rows | kv_a rows]
        q_a, kv_a = t.split([old.q_lora_rank, old.latent_dim])
        return torch.cat([q_a, _widen_kv_a(kv_a, old, new)])
    if part == "kv_a_proj_with_mqa":
        return _widen_kv_a(t, old, new)
    if part in ("q_b_proj", "q_proj"):
        return _widen_q(t, old, new)
    if part == "kv_a_layernorm":  # the padded values are zero whatever their weight: 0 keeps them zero
        s = math.sqrt(new.kv_lora_rank / old.kv_lora_rank)
        return torch.cat([t / s, t.new_zeros(extra_rows)])
    if part == "kv_b_proj":  # [H*(nope+v), R]: the padded latent values meet zero columns
        return torch.cat([t, t.new_zeros(t.shape[0], extra_rows)], dim=1)
    return t


def widen_model(model: DeepSeekV3, config: ModelConfig) -> DeepSeekV3:
    """A new model of `config` (from `widened_config`) computing what `model` computes, in float32."""
    old = model.config
    state = {
        name: _widen_tensor(name, t.detach().float() if t.is_floating_point() else t, old, config)
        for name, t in model.state_dict().items()
    }
    with torch.device("meta"):
        new = DeepSeekV3(config)
    new.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True gave the head a Parameter of its own
        new.lm_head.weight = new.model.embed_tokens.weight
    new.inv_freq = rope_inv_freq(config)[0]
    return new.eval()


@torch.no_grad()
def _check_same_function(src: DeepSeekV3, dst: DeepSeekV3, tokens: int = 24, rtol: float = 1e-3) -> None:
    """Compare main and MTP logits on a few random tokens; raise ExportError when they differ."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, src.config.vocab_size, (1, tokens), generator=gen)
    a = src(ids, mtp=bool(src.mtp))
    b = dst(ids, mtp=bool(dst.mtp))
    pairs = [(a.logits, b.logits), *zip(a.mtp_logits, b.mtp_logits)] if src.mtp else [(a, b)]
    for want, got in pairs:
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not err < rtol:
            raise ExportError(
                f"the widened model's logits differ from the source's (relative error {err:.2e})"
            )


# ---- the directory ---------------------------------------------------------------------------------
def _source_dtype(src: Path) -> torch.dtype:
    """The dtype the source stores its weights in (FP8 ones come out as bfloat16)."""
    raw = json.loads((src / "config.json").read_text())
    if raw.get("quantization_config"):
        return torch.bfloat16
    return _DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or "float32"), torch.float32)


def _write_tokenizer(src: Path, out: Path) -> bool:
    tok = load_tokenizer(src)
    if tok is None:
        return False
    max_length = 2048
    f = src / "tokenizer_config.json"
    if f.is_file():
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{f}: not valid JSON ({e})") from None
        if isinstance(cfg, dict) and isinstance(cfg.get("model_max_length"), int):
            max_length = cfg["model_max_length"]
    # re-saved rather than copied, so the export carries R1's added-token conventions; the template is kept
    save_tokenizer(tok, out, model_max_length=max_length, chat_template=load_chat_template(src))
    return True


def export(
    src: str | os.PathLike,
    out: str | os.PathLike,
    target: str = "vllm",
    dtype: str | None = None,
    check: bool = True,
) -> Path:
    """Write `src` (a checkpoint directory or Hub id) to `out` in the shape `target` needs; returns `out`.

    dtype: "float32", "bfloat16" or "float16" (default: the source's; FP8 sources as bfloat16).
    check: compare the exported model's logits with the source's on a few tokens before writing.
    """
    if target not in TARGETS:
        raise ExportError(f"target {target!r}: choose from {list(TARGETS)}")
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose from {sorted(_DTYPES)}")
    src, out = resolve_checkpoint(src), Path(out)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: not a checkpoint directory (no config.json)")
    if out.exists() and out.resolve() == src.resolve():
        raise ExportError(f"{out}: the export must not overwrite its source")
    config = ModelConfig.from_json(src)
    check_vllm_shape(config)
    model = load_model(src)  # float32: the rescaling is exact there
    config = model.config  # (without MTP if the checkpoint has no MTP weights)
    if (config.kv_lora_rank, config.qk_rope_head_dim) == (VLLM_KV_LORA_RANK, VLLM_ROPE_DIM):
        wide = model
    else:
        wide = widen_model(model, widened_config(config))
        if check:
            _check_same_function(model, wide)
    save_model(wide, out, dtype=_DTYPES[dtype] if dtype else _source_dtype(src))
    gen = src / "generation_config.json"
    if gen.is_file():  # the source's may say more than save_model's ids
        atomic_write_text(out / gen.name, gen.read_text())
    if not _write_tokenizer(src, out):
        print(
            f"nanoseek: {src} has no tokenizer.json; {out} has none either (engines need one)",
            file=sys.stderr,
        )
    return out
