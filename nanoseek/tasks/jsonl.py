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

# single-letter variables, never right after a number: Python reads 1e999999999 (mpmath then takes
# minutes), 1j or 0x1f as literals
_SYMBOLIC = re.compile(r"^(?:[0-9+\-*/^().\s]|sqrt|pi|(?<![a-z0-9.])[a-z](?![a-z]))+$")
# what Fraction reads, with exponents of at most three digits: Fraction("1e999999999") builds 10**999999999
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?(?:/[0-9]+)?")


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def _number(text: str) -> Fraction | None:
    text = text.replace(",", "").replace(" ", "")
    if len(text) > 100 or not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _small_powers(expr, budget: int = 1000) -> bool:
    """Whether every power has a rational exponent and the exponents multiplied along nested powers stay
    within `budget`: 9^9^9 or ((9^99)^99)^99 would take sympy minutes to evaluate."""
    from sympy import Pow

    if isinstance(expr, Pow):
        e = expr.exp
        if not e.is_Rational or e.q > 100 or abs(e.p) > budget:
            return False
        return _small_powers(expr.base, budget // max(abs(e.p), 1))
    return all(_small_powers(arg, budget) for arg in expr.args)


def _symbolic_equal(a: str, b: str) -> bool:
    if len(a) > 100 or len(b) > 100 or not (_SYMBOLIC.match(a) and _SYMBOLIC.match(b)):
        return False
    try:
        import sympy
        from sympy.parsing.sympy_parser import parse_expr

        x, y = (parse_expr(t.replace("^", "**"), evaluate=False) for t in (a, b))
        if not (_small_powers(x) and _small_powers(y)):
            return False
        return bool(sympy.simplify(x - y) == 0)
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

    @property
    def size(self) -> int:
        return len({r["prompt"] for r in self.records if int(r.get("difficulty", 1)) in self.difficulties})

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
