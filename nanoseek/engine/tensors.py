"""Per-row Python numbers as tensors, read whole from an array's buffer: torch.tensor parses a list item by
item, a cost of its own when every decode step turns a few hundred rows' values into tensors."""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import torch
from torch import Tensor


def int64s(values: Iterable[int]) -> Tensor:
    """A 1-D int64 tensor of `values`."""
    data = array("q", values)
    return torch.frombuffer(data, dtype=torch.int64) if data else torch.empty(0, dtype=torch.int64)


def floats(values: Iterable[float], dtype: torch.dtype = torch.float32) -> Tensor:
    """A 1-D tensor of `values` in `dtype`, each rounded from Python's double as torch.tensor rounds it."""
    data = array("d", values)
    return (torch.frombuffer(data, dtype=torch.float64) if data else torch.empty(0, dtype=torch.float64)).to(
        dtype
    )
