"""Rejection sampling and distillation (R1 §2.3.3 and §2.4): verified teacher samples become SFT data for
a smaller dense student.

    nanoseek sample --model runs/demo/rl --task arithmetic --n 8 --out data.jsonl
    nanoseek distill --teacher runs/demo/rl --student-preset dense-small --task arithmetic --out runs/student
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..checkpoint import save_model
from ..config import PRESETS, ModelConfig, option
from ..data import held_out_problems, training_problems
from ..device import DEVICES
from ..engine import LLM, SamplingParams
from ..hub import resolve_checkpoint
from ..model import DeepSeekV3
from ..tasks import Problem, Task, full_marks, get_task
from ..tasks.rewards import RewardSet
from ..tokenizer import END_THINK, copy_tokenizer, load_tokenizer
from .loop import TrainConfig
from .sft import SFTConfig, sft


@dataclass
class SampleConfig:
    task: str = option("arithmetic", "the task whose problems are sampled")
    problems: int = option(400, "problems to sample (none of the held-out ones)")
    n: int = option(8, "samples per problem")
    keep: int = option(1, "verified samples kept per problem")
    select: str = option(
        "shortest",
        "which verified samples to keep: the shortest, or by reward (accuracy + format) then shortest",
        choices=("shortest", "reward"),
    )
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling")
    max_new_tokens: int = option(96, "completion length limit")
    seed: int = option(0, "random seed (problems and sampling)")

    def validate(self) -> None:
        if self.select not in ("shortest", "reward"):
            raise ValueError(f"select: must be 'shortest' or 'reward', got {self.select!r}")
        for name in ("problems", "n", "keep", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def distill_problems(task: Task, name: str, n: int, seed: int) -> list[Problem]:
    """The problems rejection sampling draws: fresh ones, none of the 200 held out for evaluation."""
    held_out = {p.question for p in held_out_problems(name, 200, seed)}
    return training_problems(task, random.Random(seed * 7 + 13), n, held_out)


def split_reasoning(text: str) -> tuple[str, str]:
    """The raw text before and after `</think>`; rendering them back gives the exact sample."""
    reasoning, _, content = text.partition(END_THINK)
    return reasoning, content


def rejection_sample(llm: LLM, cfg: SampleConfig) -> tuple[list[dict], dict]:
    """K samples per problem; keep distinct, verified-correct, untruncated ones as chat SFT records.
    Returns the records and accept rates per difficulty."""
    cfg.validate()
    task = get_task(cfg.task)
    problems = distill_problems(task, cfg.task, cfg.problems, cfg.seed)
    rewards = RewardSet(task)
    outs = llm.generate(
        [p.prompt for p in problems],
        SamplingParams(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
        ),
    )
    records = []
    tally = defaultdict(lambda: {"problems": 0, "solved": 0, "samples": 0, "correct": 0, "tokens": 0})
    for p, out in zip(problems, outs):
        t = tally[p.difficulty]
        t["problems"] += 1
        t["samples"] += cfg.n
        verified: dict[str, tuple[float, int]] = {}
        for o in out.outputs:
            t["tokens"] += len(o.token_ids)
            if o.finish_reason != "stop" or END_THINK not in o.text or not full_marks(task.score, p, o.text):
                continue  # truncated, no reasoning/answer split, or wrong
            t["correct"] += 1
            verified.setdefault(o.text, (rewards(p, o.text)[0], len(o.token_ids)))
        if verified:
            t["solved"] += 1
        key = (lambda kv: kv[1][1]) if cfg.select == "shortest" else (lambda kv: (-kv[1][0], kv[1][1]))
        for text, (reward, length) in sorted(verified.items(), key=key)[: cfg.keep]:
            reasoning, content = split_reasoning(text)
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": p.question},
                        {"role": "assistant", "content": content, "reasoning_content": reasoning},
                    ],
                    "task": cfg.task,
                    "difficulty": p.difficulty,
                    "reward": reward,
                    "tokens": length,
                }
            )
    rates = {
        str(d): {**t, "accept_rate": t["correct"] / t["samples"], "solved_rate": t["solved"] / t["problems"]}
        for d, t in sorted(tally.items())
    }
    return records, rates


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def print_rates(rates: dict, kept: int) -> None:
    print(f"{'difficulty':>10}{'problems':>10}{'solved':>9}{'samples':>9}{'correct':>9}{'accept':>8}")
    for d, t in rates.items():
        print(
            f"{d:>10}{t['problems']:>10}{t['solved']:>9}{t['samples']:>9}{t['correct']:>9}{t['accept_rate']:>8.1%}"
        )
    print(f"kept {kept} verified samples")


@dataclass
class DistillConfig:
    teacher: str = option(
        dataclasses.MISSING, "the teacher checkpoint directory or Hub id org/name[@revision]"
    )
    student_preset: str = option(
        "dense-small", "the student's size when trained from scratch", choices=tuple(PRESETS)
    )
    student_init: str | None = option(
        None, "a student base checkpoint (same tokenizer) or Hub id; default: from scratch"
    )
    sample: SampleConfig | None = None
    steps: int = option(300, "the student's SFT steps")
    lr: float = option(2e-3, "the student's peak learning rate")
    batch_size: int = option(16, "rows per step")
    seq_len: int = option(256, "tokens per packed row")
    report_to: str = option(
        "none", "the student's SFT metrics also to: none, tensorboard, wandb, all, or a comma list"
    )
    device: str = option("auto", f"where the teacher samples and the student trains: {DEVICES}")


def check_same_tokenizer(teacher: str | os.PathLike, student: str | os.PathLike) -> None:
    a, b = load_tokenizer(teacher), load_tokenizer(student)
    if a is None or b is None:
        raise ValueError(f"tokenizer: {teacher if a is None else student} has no tokenizer.json")
    if a.get_vocab() != b.get_vocab():
        raise ValueError(
            f"tokenizer: the student {student} and the teacher {teacher} use different tokenizers "
            f"({b.get_vocab_size()} vs {a.get_vocab_size()} tokens); distillation through text "
            "needs one vocabulary"
        )


def distill(cfg: DistillConfig, out: str | os.PathLike, seed: int = 0) -> dict:
    """Rejection-sample the teacher, then SFT the student on the verified samples into `out`."""
    out = Path(out)
    sc = cfg.sample or SampleConfig(seed=seed)
    teacher_dir = resolve_checkpoint(cfg.teacher)  # either may be a Hub id: fetched once
    student_dir = resolve_checkpoint(cfg.student_init) if cfg.student_init else None
    if student_dir:
        check_same_tokenizer(teacher_dir, student_dir)
    t0 = time.perf_counter()
    teacher = LLM(teacher_dir, device=cfg.device)
    records, rates = rejection_sample(teacher, sc)
    sample_seconds = time.perf_counter() - t0
    if not records:
        raise ValueError("the teacher produced no verified-correct samples; nothing to distill")
    write_jsonl(out / "distill_data.jsonl", records)
    print_rates(rates, len(records))
    init = str(student_dir) if student_dir else None
    if init is None:  # from scratch: a random student speaking the teacher's vocabulary
        init = str(out / "student_init")
        t = teacher.config
        config = ModelConfig.preset(cfg.student_preset).replace(
            vocab_size=t.vocab_size, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id
        )
        torch.manual_seed(seed)
        save_model(DeepSeekV3(config), init)
        copy_tokenizer(teacher_dir, init)
    t1 = time.perf_counter()
    summary = sft(
        SFTConfig(
            init=init,
            data=str(out / "distill_data.jsonl"),
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
            eval_every=0,
            eval_problems=0,
        ),
        TrainConfig(
            steps=cfg.steps,
            lr=cfg.lr,
            warmup=min(20, cfg.steps // 10 + 1),
            seed=seed,
            report_to=cfg.report_to,
            device=cfg.device,
        ),
        out,
    )
    sample_flops = sum(t["tokens"] for t in rates.values()) * teacher.config.decode_flops_per_token(
        sc.max_new_tokens
    )
    summary.update(
        {
            "sample_seconds": sample_seconds,
            "sft_seconds": time.perf_counter() - t1,
            "flops": sample_flops + summary["cost"]["flops"],
            "records": len(records),
            "accept_rates": rates,
            "sample_config": asdict(sc),
        }
    )
    atomic_write_text(out / "distill_summary.json", json.dumps(summary, indent=2))
    return summary
