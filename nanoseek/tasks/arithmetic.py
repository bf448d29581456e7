"""Multi-digit arithmetic (+, -, x); the number of digits is the difficulty."""

from __future__ import annotations

import random
import re

from .base import Problem, Task

_INTEGER = re.compile(r"-?[0-9]{1,40}")  # ASCII digits only: int() would also take "٣" or "1_0"


class Arithmetic(Task):
    name = "arithmetic"
    difficulties = (1, 2, 3, 4)
    ops = "+-*"

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        op = rng.choice(self.ops)
        (lo, hi), (flo, fhi) = _operands(difficulty)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "*":
            b = rng.randint(flo, fhi)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(f"What is {a} {op} {b}", value, difficulty, {"a": a, "b": b, "op": op})

    @property
    def size(self) -> int:
        """Distinct questions at these difficulties: `addition@1` has only 100."""
        total = 0
        for d in self.difficulties:
            (lo, hi), (flo, fhi) = _operands(d)
            total += sum((hi - lo + 1) * ((fhi - flo + 1) if op == "*" else (hi - lo + 1)) for op in self.ops)
        return total

    def check(self, problem: Problem, answer: str) -> float:
        text = answer.replace(",", "").replace(" ", "")
        if not _INTEGER.fullmatch(text):
            return 0.0
        return 1.0 if int(text) == problem.answer else 0.0

    def solution(self, problem: Problem, scratchpad: bool = True) -> str:
        a, b, op = problem.data["a"], problem.data["b"], problem.data["op"]
        return problem.completion(_steps(a, b, op) if scratchpad else "", str(problem.answer))


def _operands(difficulty: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The range of a d-digit operand, and of the second factor of a product (one or two digits, to keep
    products of manageable length)."""
    return (10 ** (difficulty - 1) if difficulty > 1 else 0, 10**difficulty - 1), (
        2,
        9 if difficulty < 3 else 99,
    )


def _steps(a: int, b: int, op: str) -> str:
    """Short column-arithmetic reasoning, least significant digit first."""
    if op == "+":
        da, db = str(a)[::-1], str(b)[::-1]
        carry, parts, digits = 0, [], []
        for i in range(max(len(da), len(db))):
            x = int(da[i]) if i < len(da) else 0
            y = int(db[i]) if i < len(db) else 0
            s = x + y + carry
            parts.append(f"{x}+{y}{'+1' if carry else ''}={s}")
            digits.append(s % 10)
            carry = s // 10
        if carry:
            digits.append(carry)
        return ", ".join(parts) + f", so {''.join(map(str, digits[::-1]))}"
    if op == "-":
        big, small, sign = (a, b, "") if a >= b else (b, a, "-")
        return f"{big} - {small} = {big - small}, so {sign}{big - small}"
    tens, ones = divmod(b, 10)
    if tens:
        return f"{a}*{ones}={a * ones}, {a}*{tens}0={a * tens * 10}, {a * ones}+{a * tens * 10}={a * b}"
    return f"{a}*{b}={a * b}"


class Addition(Arithmetic):
    """Column addition only: the scratchpad (digit by digit, with carries) is what makes long sums
    reliable, so this is the task where RL can discover that thinking pays (the demo's default)."""

    name = "addition"
    ops = "+"


class Multiplication(Arithmetic):
    """A d-digit number times a one-digit number (2-9). Answered at once, a product needs every digit's
    carry in a single step, which a small model gets wrong; the column scratchpad (least significant digit
    first, each partial product plus the carry) makes it reliable: the harder rung where RL has to find
    that thinking pays."""

    name = "multiplication"
    ops = "*"
    difficulties = (2, 3)
    levels = (1, 2, 3, 4)

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        (lo, hi), _ = _operands(difficulty)
        a, b = rng.randint(max(lo, 2), hi), rng.randint(2, 9)
        return Problem(f"What is {a} * {b}", a * b, difficulty, {"a": a, "b": b, "op": "*"})

    @property
    def size(self) -> int:
        return sum(8 * (hi - max(lo, 2) + 1) for (lo, hi), _ in map(_operands, self.difficulties))

    def solution(self, problem: Problem, scratchpad: bool = True) -> str:
        a, b = problem.data["a"], problem.data["b"]
        parts, carry = [], 0
        for digit in map(int, str(a)[::-1]):
            p = digit * b + carry
            parts.append(f"{digit}*{b}{f'+{carry}' if carry else ''}={p}")
            carry = p // 10
        steps = ", ".join(parts) + f", so {a * b}"
        return problem.completion(steps if scratchpad else "", str(a * b))
