"""Choosing a form while torch.compile traces."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.compiler import is_compiling


def when_compiled(compiled: Callable[..., Tensor], eager: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`compiled` while torch.compile traces, `eager` otherwise. A job prepared as compiled still runs some
    forwards of the same modules eagerly (the engine's prefill chunks and its head over sampled rows beside
    the compiled decode steps; evaluation beside compiled training), where the compiled forms would be
    slower. The choice is made while tracing, so a compiled graph holds no branch."""

    def kernel(*args, **kwargs) -> Tensor:
        return (compiled if is_compiling() else eager)(*args, **kwargs)

    return kernel
