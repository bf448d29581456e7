"""PNG plots of training metrics (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_series(
    path: str | os.PathLike,
    title: str,
    series: dict[str, tuple[list[float], list[float]]],
    ylabel: str = "",
    logy: bool = False,
) -> None:
    """One figure with a line per named (x, y) series, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (x, y) in series.items():
        if x:
            ax.plot(x, y, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
