"""Verifiable tasks: `get_task(name)` returns a Task with `.sample(rng)` and `.score(problem, completion)`."""

from __future__ import annotations

import re

from .arithmetic import Addition, Arithmetic, Multiplication
from .base import R1_ZERO_TEMPLATE, Problem, Task, extract_answer, format_ok, full_marks
from .countdown import Countdown
from .jsonl import JsonlTask

TASKS: dict[str, type[Task]] = {
    "arithmetic": Arithmetic,
    "addition": Addition,
    "multiplication": Multiplication,
    "countdown": Countdown,
}


_LEVELS = re.compile(r"@(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")


def get_task(name: str, template: str = "chat") -> Task:
    """A built-in task by name, or `jsonl:PATH` for a user task from a JSONL of {prompt, answer}.

    A suffix `@LEVELS` keeps only those difficulty levels, e.g. `arithmetic@1-2` or `countdown@3,4`:
    the same spelling then fixes what pretraining, GRPO, sampling and evaluation draw."""
    spec, levels = name, None
    if m := _LEVELS.search(name):
        spec, levels = name[: m.start()], parse_ranges(m.group(1))
    if spec.startswith("jsonl:"):
        task = JsonlTask(spec.removeprefix("jsonl:"), template)
    elif spec in TASKS:
        task = TASKS[spec](template)
    else:
        raise ValueError(f"task: unknown task {spec!r}; choose from {sorted(TASKS)} or jsonl:PATH")
    if levels is not None:
        known = task.levels or task.difficulties
        unknown = sorted(set(levels) - set(known))
        if unknown:
            raise ValueError(f"task: {spec} has no difficulty level {unknown[0]}; its levels are {known}")
        task.difficulties = levels
    return task


def parse_ranges(text: str) -> tuple[int, ...]:
    """'1-2,4' -> (1, 2, 4): the integers a comma list of numbers and ranges names, sorted, once each."""
    levels: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        levels.update(range(int(lo), int(hi or lo) + 1))
    return tuple(sorted(levels))


__all__ = [
    "Task",
    "Problem",
    "get_task",
    "TASKS",
    "JsonlTask",
    "R1_ZERO_TEMPLATE",
    "extract_answer",
    "format_ok",
    "full_marks",
]
