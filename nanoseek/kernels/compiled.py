"""torch.compile helpers: choosing a form while it traces, and freezing what its graphs leave on the heap."""

from __future__ import annotations

import gc
import sys
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


_graphs_at_freeze: int | None = None  # compiled graphs when the heap was frozen here (None: not frozen)


def freeze_after_compiling() -> None:
    """Once torch.compile has built graphs since the last call: collect the garbage compiling left, then
    freeze every object alive (`gc.freeze`). Compiled graphs keep hundreds of thousands of Python objects
    alive (guards, graph modules, symbolic shapes); unfrozen, every full collection walks them all again,
    in the middle of whichever training step or request it lands in. Frozen objects are still freed when
    their last reference goes, but a reference cycle among them is not, until `unfreeze_heap`: a job that
    freezes calls it when it ends."""
    global _graphs_at_freeze
    utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled
    graphs = utils.counters["stats"]["unique_graphs"] if utils is not None else 0
    if graphs and graphs != _graphs_at_freeze:
        _graphs_at_freeze = graphs
        gc.collect()
        gc.freeze()


def unfreeze_heap() -> None:
    """Hand what `freeze_after_compiling` froze back to the collector."""
    global _graphs_at_freeze
    if _graphs_at_freeze is not None:
        _graphs_at_freeze = None
        gc.unfreeze()
