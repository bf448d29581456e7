"""The task protocol: seeded problems with difficulty levels, prompts, worked solutions, and verifiers.

A task is one small class: `sample(rng, difficulty)` makes a Problem, `score(problem, completion)` checks
a completion. Prompts use the R1-Zero template (REFERENCE §8) by default; the completion is expected as
`<think> ... </think> <answer> ... </answer>`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_FORMAT = re.compile(r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.S)


@dataclass
class Problem:
    question: str  # the user's question, without the template
    answer: Any  # what the verifier compares against
    difficulty: int = 1
    data: dict = field(default_factory=dict)  # task-specific (e.g. Countdown's numbers)
    template: str = R1_ZERO_TEMPLATE

    @property
    def prompt(self) -> str:
        return self.template.format(prompt=self.question)


def extract_answer(completion: str) -> str | None:
    """Text of the last <answer>...</answer>, stripped; None when there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def format_ok(completion: str) -> bool:
    """Exactly one <think>…</think> then one <answer>…</answer> with a non-empty answer, nothing else."""
    m = _FORMAT.match(completion)
    if not m or not m.group("answer").strip():
        return False
    return all(completion.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))


class Task:
    """Base class: override `make(rng, difficulty)`, `check(problem, answer_text)` and `solution(problem)`."""

    name = "task"
    difficulties: tuple[int, ...] = (1,)

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        return self.make(rng, rng.choice(self.difficulties) if difficulty is None else difficulty)

    def make(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def check(self, problem: Problem, answer: str) -> float:
        """Reward for a parsed answer text: 1.0 correct, task-specific partial credit, else 0."""
        raise NotImplementedError

    def solution(self, problem: Problem, scratchpad: bool = True) -> str:
        """A worked completion in the R1-Zero format (used to build the pretraining corpus)."""
        raise NotImplementedError

    def score(self, problem: Problem, completion: str) -> float:
        """Accuracy reward of a completion (the answer inside the last <answer> tag)."""
        answer = extract_answer(completion)
        return 0.0 if answer is None else self.check(problem, answer)
