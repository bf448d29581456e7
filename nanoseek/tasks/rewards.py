"""Rule-based rewards (R1-Zero: accuracy + format) and DAPO's soft overlong penalty (REFERENCE §8).

A reward function is any callable `(problem, completion) -> float`; `RewardSet` sums weighted rewards and
turns a function that raises or returns None/NaN into a zero reward, counting it, never a crash.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import Problem, Task, format_ok

RewardFn = Callable[[Problem, str], float]


def format_reward(problem: Problem, completion: str) -> float:
    """1.0 for exactly one <think>…</think> then one non-empty <answer>…</answer>, else 0."""
    return 1.0 if format_ok(problem.full_completion(completion)) else 0.0


_WORD = re.compile(r"[^\W\d_]+")


def language_consistency(problem: Problem, completion: str, script: str = "LATIN") -> float:
    """R1 stage 2: the share of words in the reasoning written in the expected script (Unicode name
    prefix: LATIN, CYRILLIC, CJK, ...). Numbers and symbols are neutral; no words at all counts as 1."""
    reasoning = problem.full_completion(completion).split("</think>")[0].replace("<think>", " ")
    words = _WORD.findall(reasoning)
    if not words:
        return 1.0
    ok = sum(all(unicodedata.name(c, "").startswith(script) for c in w) for w in words)
    return ok / len(words)


def overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO soft penalty: 0 up to max_len - cache tokens, then linear down to -1 at max_len, -1 beyond."""
    start = max_len - cache
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / cache)


@dataclass
class RewardSet:
    task: Task
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    extra: dict[str, RewardFn] = field(default_factory=dict)  # user rewards, weighted by `weights`
    errors: int = 0

    def functions(self) -> dict[str, RewardFn]:
        return {
            "accuracy": self.task.score,
            "format": format_reward,
            "consistency": language_consistency,
            **self.extra,
        }

    def __call__(self, problem: Problem, completion: str) -> tuple[float, dict[str, float]]:
        """Total reward and each component; failing components count as 0 and are tallied in `errors`."""
        parts = {}
        for name, fn in self.functions().items():
            w = self.weights.get(name, 1.0 if name in self.extra else 0.0)
            if w == 0:
                continue
            try:
                value = fn(problem, completion)
                value = float(value) if value is not None else math.nan
            except Exception:
                value = math.nan
            if not math.isfinite(value):
                self.errors += 1
                value = 0.0
            parts[name] = value
        return sum(self.weights.get(k, 1.0) * v for k, v in parts.items()), parts
