"""Which device a command runs on: `--device auto|cpu|cuda|cuda:N`, and the precision that suits it."""

from __future__ import annotations

import torch

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto': this process's GPU (`local_rank` under torchrun) when CUDA is available, else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {name!r} is not a device; expected {DEVICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device: {name!r} is not supported; expected {DEVICES}")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {name!r}, but this torch build sees no CUDA GPU; use --device cpu")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r}, but there are {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def default_dtype(device: torch.device) -> torch.dtype:
    """What a model is served in: bf16 on a GPU (its tensor cores' type), fp32 on a CPU, where bf16 is
    often emulated and the engine's parity with recomputation is exact."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
