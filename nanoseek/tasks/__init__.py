"""Verifiable tasks: `get_task(name)` returns a Task with `.sample(rng)` and `.score(problem, completion)`."""

from __future__ import annotations

from .arithmetic import Arithmetic
from .base import R1_ZERO_TEMPLATE, Problem, Task, extract_answer, format_ok
from .countdown import Countdown
from .jsonl import JsonlTask

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "countdown": Countdown}


def get_task(name: str, template: str = "chat") -> Task:
    """A built-in task by name, or `jsonl:PATH` for a user task from a JSONL of {prompt, answer}."""
    if name.startswith("jsonl:"):
        return JsonlTask(name.removeprefix("jsonl:"), template)
    try:
        return TASKS[name](template)
    except KeyError:
        raise ValueError(f"task: unknown task {name!r}; choose from {sorted(TASKS)}") from None


__all__ = ["Task", "Problem", "get_task", "TASKS", "JsonlTask", "R1_ZERO_TEMPLATE", "extract_answer", "format_ok"]
