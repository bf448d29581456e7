"""ModelConfig: the DeepSeek-V3 hyper-parameters under Hugging Face `DeepseekV3Config` field names.

The config round-trips through `config.json`: fields nanoseek does not use are kept in `extra` and written
back, and both spellings of the RoPE scaling block (`rope_scaling`, newer `rope_parameters`) are read.
Counting helpers (parameters, activated parameters, FLOPs per token) work from the shapes alone, so the
full `v3` preset can be counted without ever being instantiated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None) -> Any:
    """A dataclass field that is also a command-line flag: the command line builds its flags, defaults and
    help from these fields (`cli.add_options`), so a default is written once. `flag` overrides the name
    derived from the field (`--field-name`; `--no-field-name` for a field that defaults to True)."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters; defaults are the published V3 values (REFERENCE §1)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: c_kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def decompressed_cache_dim(self) -> int:
        """Values per token per layer of a cache holding decompressed K and V (as transformers does)."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    def is_moe_layer(self, i: int) -> bool:
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    @property
    def yarn(self) -> dict | None:
        """The YaRN block if RoPE scaling is YaRN, else None."""
        rs = self.rope_scaling
        if rs and (rs.get("rope_type") or rs.get("type")) == "yarn":
            return rs
        return None

    # ---- validation -----------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Type-check every field and the shape constraints; raise ValueError naming the field."""
        hints = typing.get_type_hints(ModelConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise ValueError(
                    f"config field '{f.name}' must be {_type_name(hints[f.name])}, "
                    f"got {type(value).__name__} {value!r}"
                )
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ]
        if self.n_routed_experts:
            positive += ["moe_intermediate_size", "n_group", "num_experts_per_tok"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        for name in [
            "num_nextn_predict_layers",
            "n_shared_experts",
            "n_routed_experts",
            "qk_nope_head_dim",
            "first_k_dense_replace",
        ]:
            if getattr(self, name) < 0:
                raise ValueError(f"config field '{name}' must be >= 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ValueError(f"config field 'q_lora_rank' must be > 0 or null, got {self.q_lora_rank}")
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")
            if kind not in ("yarn", "default"):  # anything else would be silently ignored: wrong positions
                raise ValueError(f"config field 'rope_scaling': only YaRN is supported, got type {kind!r}")
            factor = self.rope_scaling.get("factor")
            if kind == "yarn" and not (_matches(factor, float) and factor > 0):
                raise ValueError(
                    f"config field 'rope_scaling': YaRN needs a numeric factor > 0, got {factor!r}"
                )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"config field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"config field 'n_group' ({self.n_group}) must divide "
                    f"n_routed_experts ({self.n_routed_experts})"
                )
            if not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"config field 'topk_group' must be in [1, n_group], got {self.topk_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(
                    "config field 'num_experts_per_tok' exceeds the experts in topk_group groups"
                )
            if self.scoring_func != "sigmoid":
                raise ValueError(f"config field 'scoring_func' must be 'sigmoid', got {self.scoring_func!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"config field 'hidden_act' must be 'silu', got {self.hidden_act!r}")

    # ---- config.json ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict; unknown keys go to `extra`, `rope_parameters` is understood."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rope_params = d.pop("rope_parameters", None)
        if rope_params is not None:
            if not isinstance(rope_params, dict):
                raise ValueError("config field 'rope_parameters' must be a dict")
            rp = dict(rope_params)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if d.get("rope_scaling") is None:
                d["rope_scaling"] = None if kind == "default" else rp
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        for k in ("rope_theta", "routed_scaling_factor", "rms_norm_eps", "initializer_range"):
            if isinstance(kwargs.get(k), int) and not isinstance(kwargs[k], bool):
                kwargs[k] = float(kwargs[k])  # JSON writes 10000.0 as 10000
        for k in ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype"):
            d.pop(k, None)
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict[str, Any]:
        d = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "extra"
        }
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            kind = rs.pop("type", None) or rs.pop("rope_type", None)
            d["rope_scaling"] = {"type": kind, "rope_type": kind, **rs}
            rope_parameters = {"rope_type": kind, "rope_theta": self.rope_theta, **rs}
        out = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **self.extra,
            **d,
            "rope_parameters": rope_parameters,
        }
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: must hold a JSON object")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, directory: str | os.PathLike, dtype: str = "float32") -> None:
        d = self.to_dict()
        d["torch_dtype"] = dtype
        atomic_write_text(Path(directory) / "config.json", json.dumps(d, indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets --------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """`tiny` (tests), `small` (the demo MoE), `dense-small` (distillation student), `v3` (counting)."""
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None

    # ---- counting -------------------------------------------------------------------------------
    def _attn_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = (
            d * self.latent_dim
            + self.kv_lora_rank
            + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        )
        return q + kv + h * self.v_head_dim * d

    def _ffn_params(self, i: int) -> tuple[int, int]:
        """(total, activated) FFN parameters of layer i."""
        d = self.hidden_size
        if not self.is_moe_layer(i):
            n = 3 * d * self.intermediate_size
            return n, n
        expert = 3 * d * self.moe_intermediate_size
        gate = self.n_routed_experts * d + self.n_routed_experts
        total = (self.n_routed_experts + self.n_shared_experts) * expert + gate
        active = (self.num_experts_per_tok + self.n_shared_experts) * expert + gate
        return total, active

    def _layer_params(self, i: int) -> tuple[int, int]:
        ffn_total, ffn_active = self._ffn_params(i)
        base = self._attn_params() + 2 * self.hidden_size
        return base + ffn_total, base + ffn_active

    def _mtp_params(self) -> tuple[int, int]:
        """One MTP module without the embedding and head it shares with the main model."""
        d = self.hidden_size
        total, active = self._layer_params(self.num_hidden_layers)
        extra = 2 * d * d + 3 * d  # eh_proj, enorm, hnorm, shared_head.norm
        return total + extra, active + extra

    def _embed_head(self) -> int:
        n = self.vocab_size * self.hidden_size
        return n if self.tie_word_embeddings else 2 * n

    def num_params(self, mtp: bool = False) -> int:
        """Main-model parameters (embedding and head included); `mtp=True` adds the MTP modules."""
        n = (
            self._embed_head()
            + self.hidden_size
            + sum(self._layer_params(i)[0] for i in range(self.num_hidden_layers))
        )
        return n + (self.num_nextn_predict_layers * self._mtp_params()[0] if mtp else 0)

    def num_mtp_params(self) -> int:
        return self.num_nextn_predict_layers * self._mtp_params()[0]

    def num_active_params(self, embedding: bool = True) -> int:
        """Parameters a token touches in the main model (embedding row and head counted when asked)."""
        n = self.hidden_size + sum(self._layer_params(i)[1] for i in range(self.num_hidden_layers))
        v = self.vocab_size * self.hidden_size
        return n + (v + v if embedding else v)  # the head is a matmul: always active

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of QK^T and PV per token, averaged over a causal sequence of seq_len."""
        h = self.num_attention_heads
        return 2.0 * self.num_hidden_layers * h * (self.qk_head_dim + self.v_head_dim) * (seq_len + 1) / 2

    def train_flops_per_token(self, seq_len: int, mtp: bool = False) -> float:
        """6 x active matmul parameters + attention (forward + 2x backward), per trained token."""
        n = self.num_active_params(embedding=False) - self.hidden_size  # matmul weights (norms negligible)
        attn = self.attention_flops_per_token(seq_len)
        if mtp:
            n += self.num_nextn_predict_layers * (self._mtp_params()[1] + self.vocab_size * self.hidden_size)
            attn *= 1 + self.num_nextn_predict_layers / self.num_hidden_layers
        return 6.0 * n + 3.0 * attn

    def decode_flops_per_token(self, context_len: int) -> float:
        """Forward FLOPs of one decoded token against `context_len` cached tokens (absorbed MLA)."""
        n = self.num_active_params(embedding=False) - self.hidden_size
        h = self.num_attention_heads
        absorb = (
            2 * h * self.qk_nope_head_dim * self.kv_lora_rank + 2 * h * self.v_head_dim * self.kv_lora_rank
        )
        per_layer_attn = 2 * h * (self.latent_dim + self.kv_lora_rank) * context_len
        return 2.0 * n + self.num_hidden_layers * (per_layer_attn + absorb)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is not None:
        if not isinstance(value, origin):
            return False
        args = typing.get_args(hint)
        if origin is list and args:
            return all(_matches(v, args[0]) for v in value)
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_nextn_predict_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    rope_scaling=None,
)

_SMALL = dict(
    vocab_size=1024,
    hidden_size=192,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_nextn_predict_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.5,
    kv_lora_rank=64,
    q_lora_rank=96,
    qk_rope_head_dim=16,
    v_head_dim=32,
    qk_nope_head_dim=32,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=2048,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    rope_scaling=None,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    "small": _SMALL,
    # the distillation student: every layer dense, MLA kept, at most half the small preset's active params
    "dense-small": {
        **_SMALL,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 4,
        "intermediate_size": 256,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "n_routed_experts": 0,
        "n_shared_experts": 0,
        "num_nextn_predict_layers": 0,
        "n_group": 1,
        "topk_group": 1,
    },
    "v3": {},
}
