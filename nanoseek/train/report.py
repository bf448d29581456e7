"""Experiment trackers (`--report-to`, in TRL's and transformers' vocabulary): every scalar of a metrics.jsonl
record also goes to TensorBoard and/or Weights & Biases, from rank 0; tables (GRPO's sampled completions)
too. The training loop owns one `Tracker`; with `none` it does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

TARGETS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def parse_report_to(value: str | None) -> tuple[str, ...]:
    """`none`, `tensorboard`, `wandb`, a comma list of them, or `all` (every installed one) -> the targets."""
    names = [n.strip().lower() for n in (value or "none").split(",") if n.strip()]
    if not names or names == ["none"]:
        return ()
    if names == ["all"]:
        return tuple(t for t in TARGETS if _installed(t))
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ValueError(
            f"report_to: unknown tracker(s) {unknown}; choose none, all, or a comma list of "
            f"{', '.join(TARGETS)}"
        )
    return tuple(dict.fromkeys(names))


def check_available(targets: tuple[str, ...]) -> None:
    """Fail before training, not at the first log, when a tracker's package is missing."""
    for name in targets:
        if not _installed(name):
            raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table (TensorBoard's text panel renders it); cells on one line each."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: object) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


class Tracker:
    """Sends metric records and tables to the chosen trackers; a no-op unless `enabled` (rank 0)."""

    def __init__(
        self, report_to: str | None, out: str | os.PathLike, config: dict | None = None, enabled: bool = True
    ):
        self.targets = parse_report_to(report_to)
        check_available(self.targets)  # on every rank: all fail alike, none waits for the others
        self.enabled = enabled and bool(self.targets)
        self.out, self.config = Path(out), config or {}
        self._tb = None
        self._wandb = None

    def _open(self, step: int) -> None:
        """Opened at the first record, whose step then starts the logs: TensorBoard discards what an
        earlier run (or the part of a resumed run after its checkpoint) wrote from that step on, as
        metrics.jsonl does."""
        if "tensorboard" in self.targets and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / TENSORBOARD_DIR), purge_step=step)
        if "wandb" in self.targets and self._wandb is None:
            import wandb

            self._wandb = wandb.init(
                mode=os.environ.get("WANDB_MODE"),
                project=os.environ.get("WANDB_PROJECT", "nanoseek"),
                name=os.environ.get("WANDB_NAME", self.out.name),
                dir=str(self.out),
                config=json.loads(json.dumps(self.config, default=str)),
            )

    def log(self, record: dict) -> None:
        """Every finite scalar of a metrics record, under its metrics.jsonl name, at record["step"]."""
        if not self.enabled:
            return
        step = int(record["step"])
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        self._open(step)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        """A table of rows (dicts with the same keys): TensorBoard text as markdown, a wandb.Table."""
        if not (self.enabled and rows):
            return
        self._open(step)
        if self._tb is not None:
            self._tb.add_text(name, markdown_table(rows), step)
        if self._wandb is not None:
            import wandb

            columns = list(dict.fromkeys(k for r in rows for k in r))
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            self._wandb.log({name: table}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
