"""Per-row Python numbers as tensors, read whole from an array's buffer: torch.tensor parses a list item by
item, a cost of its own when every decode step turns a few hundred rows' values into tensors."""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import torch
from torch import Tensor


def int64s(values: Iterable[int]) -> Tensor:
    """A 1-D int64 tensor of `values`."""
    return _from_buffer(array("q", values), torch.int64)


def floats(values: Iterable[float], dtype: torch.dtype = torch.float32) -> Tensor:
    """A 1-D tensor of `values` in `dtype`, each rounded from Python's double as torch.tensor rounds it."""
    return _from_buffer(array("d", values), torch.float64).to(dtype)


def _from_buffer(data: array, dtype: torch.dtype) -> Tensor:
    """The array's items as a tensor that shares its buffer (frombuffer refuses an empty one)."""
    return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
