"""Task evaluation through the engine: greedy accuracy, pass@1 from k samples, cons@k (REFERENCE §8)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .engine import LLM, SamplingParams
from .tasks import Problem, Task, extract_answer, full_marks


@dataclass
class EvalResult:
    greedy: float
    mean_len: float
    pass1: float | None = None
    cons: float | None = None
    samples: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {"greedy": self.greedy, "mean_len": self.mean_len}
        if self.pass1 is not None:
            d.update({"pass@1": self.pass1, "cons@k": self.cons})
        return d


def evaluate(
    llm: LLM,
    task: Task,
    problems: list[Problem],
    max_new_tokens: int = 96,
    k: int = 0,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int = 0,
) -> EvalResult:
    """Greedy accuracy (reward 1.0 counts as solved) and, with k > 0, pass@1 and majority-vote cons@k."""
    prompts = [p.prompt for p in problems]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new_tokens))
    solved = [full_marks(task.score, p, o.text) for p, o in zip(problems, greedy)]
    res = EvalResult(sum(solved) / len(problems), sum(len(o.token_ids) for o in greedy) / len(problems))
    res.samples = [
        {
            "prompt": p.question,
            "difficulty": p.difficulty,
            "completion": o.text,
            "correct": s,
            "mode": "greedy",
        }
        for p, o, s in zip(problems, greedy, solved)
    ]
    if k:
        sampled = llm.generate(
            prompts,
            SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed),
        )
        pass1 = cons = 0.0
        for p, out in zip(problems, sampled):
            scores = [full_marks(task.score, p, o.text) for o in out.outputs]
            pass1 += sum(scores) / k
            answers = [a for a in (extract_answer(o.text) for o in out.outputs) if a]
            if answers:
                top = Counter(answers).most_common(1)[0][0]
                cons += full_marks(task.check, p, top)
            res.samples += [
                {
                    "prompt": p.question,
                    "difficulty": p.difficulty,
                    "completion": o.text,
                    "correct": s,
                    "mode": "sample",
                }
                for o, s in zip(out.outputs, scores)
            ]
        res.pass1, res.cons = pass1 / len(problems), cons / len(problems)
    return res
