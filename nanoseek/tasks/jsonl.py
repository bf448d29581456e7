"""A user task from a local JSONL file of `{"prompt": ..., "answer": ...}` records (optional `difficulty`).

Answers are checked by exact match (case and whitespace aside), then as numbers (exact fractions:
`0.5` = `1/2`), then, where sympy is installed, as symbolic expressions — only for answers made of
digits, operators, parentheses, `sqrt`, `pi` and single-letter variables, since sympy's parser evaluates
Python. Use it as `--task jsonl:path/to/file.jsonl`.
"""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

from .base import Problem, Task

_SYMBOLIC = re.compile(r"^(?:[0-9+\-*/^().\s]|sqrt|pi|(?<![a-z])[a-z](?![a-z]))+$")


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _symbolic_equal(a: str, b: str) -> bool:
    if len(a) > 100 or len(b) > 100 or not (_SYMBOLIC.match(a) and _SYMBOLIC.match(b)):
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import parse_expr
        diff = parse_expr(a.replace("^", "**")) - parse_expr(b.replace("^", "**"))
        return bool(sympy.simplify(diff) == 0)
    except Exception:  # not installed, or not an expression sympy understands
        return False


class JsonlTask(Task):
    name = "jsonl"

    def __init__(self, path: str, template: str = "chat"):
        super().__init__(template)
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such task file")
        self.records = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or "answer" not in rec:
                raise ValueError(f"{self.path}:{number}: a record needs a `prompt` string and an `answer`")
            self.records.append(rec)
        if not self.records:
            raise ValueError(f"{self.path}: no records")
        self.difficulties = tuple(sorted({int(r.get("difficulty", 1)) for r in self.records}))

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        rec = rng.choice([r for r in self.records if int(r.get("difficulty", 1)) == difficulty])
        return Problem(rec["prompt"], str(rec["answer"]), difficulty)

    def check(self, problem: Problem, answer: str) -> float:
        expected = problem.answer
        if _normal(answer) == _normal(expected):
            return 1.0
        a, b = _number(answer), _number(expected)
        if a is not None and b is not None:
            return 1.0 if a == b else 0.0
        return 1.0 if _symbolic_equal(answer, expected) else 0.0
