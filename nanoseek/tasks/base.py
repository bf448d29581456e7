"""The task protocol: seeded problems with difficulty levels, prompts, worked solutions, and verifiers.

A task is one small class: `sample(rng, difficulty)` makes a Problem, `score(problem, completion)` checks
a completion. Prompts use the R1-Zero template (REFERENCE §8) by default; the completion is expected as
`<think> ... </think> <answer> ... </answer>`.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..tokenizer import render_chat

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

_FORMAT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.S)


@dataclass
class Problem:
    """One problem. With the chat template (the default) the prompt ends inside `<think>` (R1 style), so
    completions start with the reasoning; with the R1-Zero template they open `<think>` themselves."""

    question: str  # the user's question, without the template
    answer: Any  # what the verifier compares against
    difficulty: int = 1
    data: dict = field(default_factory=dict)  # task-specific (e.g. Countdown's numbers)
    template: str = "chat"  # or "r1zero"

    @property
    def prompt(self) -> str:
        if self.template == "r1zero":
            return R1_ZERO_TEMPLATE.format(prompt=self.question)
        return render_chat([{"role": "user", "content": self.question}])

    def full_completion(self, completion: str) -> str:
        """The completion with the `<think>` the chat prompt already opened, for format checks."""
        return completion if self.template == "r1zero" else "<think>" + completion

    def completion(self, think: str, answer: str) -> str:
        """A well-formed completion for this problem's template."""
        body = f"{think} </think> <answer> {answer} </answer>"
        return body if self.template == "chat" else " <think> " + body


def extract_answer(completion: str) -> str | None:
    """Text of the last <answer>...</answer> pair (pairs read left to right), stripped; None when there is
    none. One pass with str.find: a regex rescans the rest of the text from every unclosed tag."""
    found, pos = None, 0
    while (start := completion.find("<answer>", pos)) >= 0:
        end = completion.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        found, pos = completion[start + len("<answer>") : end], end + len("</answer>")
    return None if found is None else found.strip()


def full_marks(verify: Callable[..., float], *args: Any) -> bool:
    """Whether `verify(*args)` (a task's score or check) gives 1.0. A verifier that raises on odd model
    output counts it as wrong, with a warning, rather than losing the evaluation it is part of."""
    try:
        return verify(*args) >= 1.0
    except Exception as e:
        warnings.warn(
            f"{getattr(verify, '__qualname__', verify)} raised {type(e).__name__}: {e}; counted as wrong",
            stacklevel=2,
        )
        return False


def format_ok(completion: str) -> bool:
    """Exactly one <think>…</think> then one <answer>…</answer> with a non-empty answer, nothing else.
    Tags are counted first: with one of each, the pattern cannot backtrack (quadratic time otherwise)."""
    if any(completion.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    m = _FORMAT.match(completion)
    return bool(m and m.group("answer").strip())


class Task:
    """Base class: override `make(rng, difficulty)`, `check(problem, answer_text)` and `solution(problem)`."""

    name = "task"
    difficulties: tuple[int, ...] = (1,)  # what the bare task name draws
    levels: tuple[int, ...] | None = None  # every level `make` supports, if more than that (`name@LEVELS`)
    size: int | None = None  # distinct questions at these difficulties, if known (caps the held-out share)

    def __init__(self, template: str = "chat"):
        if template not in ("chat", "r1zero"):
            raise ValueError(f"template: must be 'chat' or 'r1zero', got {template!r}")
        self.template = template

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        problem = self.make(rng, rng.choice(self.difficulties) if difficulty is None else difficulty)
        problem.template = self.template
        return problem

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> float:
        """Reward for a parsed answer text: 1.0 correct, task-specific partial credit, else 0."""
        raise NotImplementedError

    def solution(self, problem: Problem, scratchpad: bool = True) -> str:
        """A worked completion (used to build the pretraining corpus): with `scratchpad` the steps inside
        `<think>`, without it an empty `<think> </think>` and the answer, as a model that does not think."""
        raise NotImplementedError

    def score(self, problem: Problem, completion: str) -> float:
        """Accuracy reward of a completion (the answer inside the last <answer> tag)."""
        answer = extract_answer(completion)
        return 0.0 if answer is None else self.check(problem, answer)
