"""Hugging Face-format checkpoints: safetensors (single or sharded), FP8 block scales, MTP layers.

The on-disk names are those of the public DeepSeek-V3 checkpoints (REFERENCE §6), so a directory written
here loads in transformers, vLLM and SGLang, and theirs load here. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_write, atomic_write_text
from .config import ModelConfig
from .fp8 import BLOCK, dequantize_weight, quantize_weight
from .model import DeepSeekV3, rope_inv_freq

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}
_ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn}
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main model's tensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor at fault."""


# ---- name mapping between nanoseek modules and the HF layout -------------------------------------
def to_hf_state_dict(model: DeepSeekV3) -> dict[str, Tensor]:
    """The model's tensors under public checkpoint names (experts unstacked, MTP at layer index L + k)."""
    cfg = model.config
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if m:
            name = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}"
        m = re.fullmatch(r"(.+)\.(gate_up_proj|fused_a_proj)\.(weight|bias)", name)
        if m:
            (a, b), sizes = _fused_parts(cfg, m.group(2), t.shape[0])
            ta, tb = t.split(sizes)
            out[f"{m.group(1)}.{a}.{m.group(3)}"], out[f"{m.group(1)}.{b}.{m.group(3)}"] = ta, tb
            continue
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(gate_up|down)", name)
        if m:
            prefix, inter = m.group(1), cfg.moe_intermediate_size
            for j in range(t.shape[0]):
                if m.group(2) == "gate_up":
                    out[f"{prefix}.{j}.gate_proj.weight"] = t[j, :inter]
                    out[f"{prefix}.{j}.up_proj.weight"] = t[j, inter:]
                else:
                    out[f"{prefix}.{j}.down_proj.weight"] = t[j]
            continue
        out[name] = t
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = model.model.embed_tokens.weight
        out[prefix + "shared_head.head.weight"] = model.lm_head.weight
    return out


def _fused_parts(cfg: ModelConfig, fused: str, rows: int = 0) -> tuple[tuple[str, str], list[int]]:
    """The two checkpoint tensors a fused nanoseek projection of `rows` rows stands for, and their rows."""
    if fused == "fused_a_proj":
        return ("q_a_proj", "kv_a_proj_with_mqa"), [cfg.q_lora_rank, cfg.latent_dim]
    return ("gate_proj", "up_proj"), [rows // 2, rows // 2]


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in to_hf_state_dict(DeepSeekV3(config)).items()}


def _from_hf(config: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `to_hf_state_dict`: restack experts, move MTP layers under `mtp.k`."""
    sd: dict[str, Tensor] = {}
    n = config.num_hidden_layers
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        sd[name] = t
    for prefix, per_expert in experts.items():
        ids = sorted(per_expert)
        sd[prefix + ".gate_up"] = torch.stack(
            [torch.cat([per_expert[j]["gate_proj"], per_expert[j]["up_proj"]]) for j in ids]
        )
        sd[prefix + ".down"] = torch.stack([per_expert[j]["down_proj"] for j in ids])
    second = re.compile(r"(.+)\.(up_proj|kv_a_proj_with_mqa)\.(weight|bias)")
    for m in [m for m in map(second.fullmatch, list(sd)) if m]:
        name = m.group(0)
        fused = "gate_up_proj" if m.group(2) == "up_proj" else "fused_a_proj"
        first = f"{m.group(1)}.{_fused_parts(config, fused)[0][0]}.{m.group(3)}"
        if first in sd:  # (kv_a_proj_with_mqa stands alone when q_lora_rank is null)
            sd[f"{m.group(1)}.{fused}.{m.group(3)}"] = torch.cat([sd.pop(first), sd.pop(name)])
    renamed = {}
    for name, t in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m and int(m.group(1)) >= n:
            if m.group(2) in _MTP_SHARED:
                continue
            name = f"mtp.{int(m.group(1)) - n}.{m.group(2)}"
        renamed[name] = t
    if config.tie_word_embeddings:
        renamed["lm_head.weight"] = renamed["model.embed_tokens.weight"]
    return renamed


# ---- FP8 ---------------------------------------------------------------------------------------
def dequantize_fp8(weight: Tensor, scale_inv: Tensor, name: str = "weight") -> Tensor:
    """float8_e4m3fn [out, in] with fp32 scale_inv [ceil(out/128), ceil(in/128)] -> fp32 (ragged edges ok)."""
    if weight.dim() != 2:
        raise CheckpointError(
            f"FP8 tensor {name} has shape {tuple(weight.shape)}; only 2-D weights are block-scaled"
        )
    out_f, in_f = weight.shape
    want = (math.ceil(out_f / BLOCK), math.ceil(in_f / BLOCK))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {want} "
            f"for FP8 weight {name} of shape {(out_f, in_f)}"
        )
    return dequantize_weight(weight, scale_inv)


def _fp8_eligible(name: str, t: Tensor) -> bool:
    """As in the public V3 checkpoints: 2-D projection weights in FP8; embeddings, head, router, norms not."""
    return t.dim() == 2 and not re.search(
        r"(embed_tokens|lm_head|shared_head\.head|mlp\.gate|norm)\.weight$", name
    )


# ---- reading ----------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single]


def _read_tensors(files: list[Path]) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    tensors[key] = st.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt, truncated or unsupported safetensors file ({e})") from None
    for key, t in tensors.items():
        if t.dtype not in _ALLOWED_DTYPES and not key.endswith("_scale_inv"):
            raise CheckpointError(f"tensor {key} has unsupported dtype {t.dtype}")
    return tensors


def _dequantize_all(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, t in tensors.items():
        if key.endswith("_scale_inv"):
            weight = tensors.get(key[: -len("_scale_inv")])
            if weight is None:
                raise CheckpointError(f"{key} has no matching weight {key[: -len('_scale_inv')]}")
            if weight.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"unexpected tensor {key}: its weight is {weight.dtype}, not FP8")
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = tensors.get(key + "_scale_inv")
            if scale is None:
                raise CheckpointError(f"FP8 tensor {key} has no {key}_scale_inv")
            t = dequantize_fp8(t, scale, key)
        out[key] = t
    return out


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
) -> DeepSeekV3:
    """Load a Hugging Face-format DeepSeek-V3 directory, or a Hub id `org/name[@revision]`; returns the
    model in eval mode.

    FP8 weights are dequantised; `dtype=None` keeps the stored dtype. A checkpoint without MTP weights
    (as transformers writes) loads as a model without MTP. Errors name the file or tensor at fault.
    """
    from .hub import resolve_checkpoint  # (hub imports this module)

    path = resolve_checkpoint(path)
    config = ModelConfig.from_json(path)
    tensors = _dequantize_all(_read_tensors(_weight_files(path)))
    n_mtp = config.num_nextn_predict_layers
    if n_mtp and not any(k.startswith(f"model.layers.{config.num_hidden_layers}.") for k in tensors):
        print(
            f"nanoseek: {path} has no MTP weights; loading without MTP (num_nextn_predict_layers 0)",
            file=sys.stderr,
        )
        config = config.replace(num_nextn_predict_layers=0)
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors: {_names(unexpected)}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointError(f"tensor {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
    state = _from_hf(config, {k: tensors[k] for k in expected})
    with torch.device("meta"):
        model = DeepSeekV3(config)
    if dtype is not None:  # the router stays at least fp32 (its bias moves in steps of 1e-3)
        router = torch.promote_types(dtype, torch.float32)
        state = {
            k: v.to(router if k.endswith(("gate.weight", "e_score_correction_bias")) else dtype)
            for k, v in state.items()
        }
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True gave the head a Parameter of its own
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)[0].to(device)
    return model.eval()


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---- writing -----------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])


def save_model(
    model: DeepSeekV3,
    path: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    fp8: bool = False,
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (sharded above max_shard_size), atomically.

    `fp8=True` stores projection weights as float8_e4m3fn with 128x128-block `weight_scale_inv` and a
    `quantization_config` in config.json, like the public DeepSeek-V3 checkpoints (the rest in `dtype`,
    bf16 by default).

    Every file is written under a temporary name and renamed into place, weights before config.json;
    shards of an earlier save that the new one does not use are removed afterwards.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if fp8 and dtype is None:
        dtype = torch.bfloat16
    tensors = {}
    for k, t in to_hf_state_dict(model).items():
        if fp8 and _fp8_eligible(k, t):
            q, scale = quantize_weight(t.detach().cpu())
            tensors[k], tensors[k + "_scale_inv"] = q, scale
            continue
        keep_fp32 = k.endswith("gate.weight") or k.endswith("e_score_correction_bias")
        t = t.detach().to("cpu", None if (dtype is None or keep_fp32) else dtype)
        tensors[k] = t.contiguous().clone()
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        atomic_write(
            path / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"})
        )
    index = path / "model.safetensors.index.json"
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(
            index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    elif index.exists():
        index.unlink()
    for stale in path.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    stored = dtype or next(iter(tensors.values())).dtype
    extra = {k: v for k, v in model.config.extra.items() if k != "quantization_config"}
    if fp8:
        extra["quantization_config"] = FP8_QUANTIZATION_CONFIG
    model.config.replace(extra=extra).save(path, dtype=str(stored).removeprefix("torch."))
    gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    atomic_write_text(path / "generation_config.json", json.dumps(gen, indent=2))
    return path
