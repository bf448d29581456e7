"""Countdown (TinyZero rules): reach the target with each given number used once and + - * / ( ).

The answer is checked by walking its syntax tree with exact rational arithmetic — never `eval` — after
cheap guards (length, characters, nesting), so hostile answers are rejected in microseconds.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from fractions import Fraction

from .base import Problem, Task

MAX_CHARS, MAX_DEPTH, MAX_NODES = 200, 12, 64
_ALLOWED = set("0123456789+-*/() ")
_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class InvalidExpression(ValueError):
    pass


def evaluate(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses; InvalidExpression otherwise."""
    if len(expr) > MAX_CHARS or not set(expr) <= _ALLOWED:
        raise InvalidExpression("too long or characters outside 0-9 + - * / ( )")
    depth = 0
    for ch in expr:
        depth += (ch == "(") - (ch == ")")
        if depth > MAX_DEPTH or depth < 0:
            raise InvalidExpression("unbalanced or too deeply nested parentheses")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise InvalidExpression(str(e)) from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise InvalidExpression("expression too large")
    numbers: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        raise InvalidExpression(f"{type(node).__name__} is not allowed")

    return walk(tree), numbers


class Countdown(Task):
    name = "countdown"
    difficulties = (3, 4)  # how many numbers: TinyZero's
    levels = (2, 3, 4)  # `countdown@2`: two numbers, a rung below for small models

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        while True:
            nums = [rng.randint(1, 100) for _ in range(difficulty)]
            value, steps, expr = nums[0], [], str(nums[0])
            for n in nums[1:]:
                op = rng.choice("+-*/")
                if op == "/" and (n == 0 or value % n):
                    op = "+"
                if op == "-" and value - n <= 0:
                    op = "+"
                new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
                steps.append(f"{value}{op}{n}={new}")
                value, expr = new, f"({expr} {op} {n})"
            if 1 <= value <= 999:
                break
        shown = nums[:]
        rng.shuffle(shown)
        question = (
            f"Using the numbers {shown}, create an equation that equals {value}. You can use basic "
            f"arithmetic operations (+, -, *, /) and each number can only be used once"
        )
        return Problem(
            question,
            value,
            difficulty,
            {"numbers": shown, "steps": steps, "expression": expr[1:-1] if expr.startswith("(") else expr},
        )

    def check(self, problem: Problem, answer: str) -> float:
        """1.0 for a correct equation; 0.1 (TinyZero's format score) for any other answer written only in the
        equation alphabet (digits, + - * / ( ) and spaces), even one that does not parse; 0 otherwise."""
        expr = answer.split("=")[0].strip()
        try:
            value, used = evaluate(expr)
        except InvalidExpression:
            return 0.1 if set(expr) <= _ALLOWED and expr else 0.0
        if Counter(used) != Counter(problem.data["numbers"]):
            return 0.1
        return 1.0 if value == problem.answer else 0.1

    def solution(self, problem: Problem, scratchpad: bool = True) -> str:
        think = ", ".join(problem.data["steps"]) if scratchpad else ""
        return problem.completion(think, problem.data["expression"])
