"""FLOPs, GPU-hours and dollars of training, and the DeepSeek-V3 reference row (REFERENCE §7)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

# dense BF16 peak FLOP/s per GPU (vendor figures)
GPU_PEAK = {"h800": 989.5e12, "h100": 989.5e12, "h200": 989.5e12, "a100": 312e12, "b200": 2250e12}
PRICE_PER_GPU_HOUR = 2.0  # the V3 report's rental assumption
V3_TOKENS, V3_PRETRAIN_GPU_HOURS = 14.8e12, 2664e3
V3_SEQ_LEN = 4096


@dataclass
class Cost:
    flops: float
    gpu_hours: float
    dollars: float

    def line(self) -> str:
        return f"{self.flops:.3e} FLOPs, {self.gpu_hours:,.1f} GPU-hours, ${self.dollars:,.2f}"


def training_cost(
    config: ModelConfig,
    tokens: float,
    gpu: str = "h800",
    mfu: float | None = None,
    seq_len: int = V3_SEQ_LEN,
    price: float = PRICE_PER_GPU_HOUR,
) -> Cost:
    """Cost of training `tokens` tokens; `mfu` defaults to V3's implied utilisation."""
    if gpu not in GPU_PEAK:
        raise ValueError(f"gpu: unknown GPU {gpu!r}; choose from {sorted(GPU_PEAK)}")
    mfu = v3_implied_mfu() if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu: must be in (0, 1], got {mfu}")
    flops = tokens * config.train_flops_per_token(seq_len, mtp=True)
    hours = flops / (GPU_PEAK[gpu] * mfu) / 3600
    return Cost(flops, hours, hours * price)


def v3_implied_mfu() -> float:
    """Utilisation of H800 BF16 peak implied by V3's 2664K GPU-hours for 14.8T tokens (about 0.40),
    rounded to two digits so that reproducing the row is a check, not an identity."""
    v3 = ModelConfig.preset("v3")
    flops = V3_TOKENS * v3.train_flops_per_token(V3_SEQ_LEN, mtp=True)
    return round(flops / (V3_PRETRAIN_GPU_HOURS * 3600 * GPU_PEAK["h800"]), 2)
