"""Rotary embedding as real (cos, sin) pairs, for compiled graphs: inductor generates no code for complex
tensors, so the model's complex multiply would leave the graph for a library call; these real ops fuse."""

from __future__ import annotations

import torch
from torch import Tensor


def real_rotations(angles: Tensor, magnitude: float) -> Tensor:
    """Replaces `model.rotations`: (real, imaginary) pairs [..., rope/2, 2] instead of complex numbers."""
    return torch.stack([angles.cos(), angles.sin()], dim=-1) * magnitude


def apply_real_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Replaces `model.apply_rope` for rotations from `real_rotations`: the complex product of each
    interleaved pair (x[2i], x[2i+1]) with its rotation, written out in real ops, in fp32."""
    (re, im), (cos, sin) = x.float().unflatten(-1, (-1, 2)).unbind(-1), freqs.unbind(-1)
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)
