"""`nanoseek demo`: R1-Zero in miniature on a laptop CPU, built-in data only.

Train a tokenizer and a small DeepSeek-V3-style base (MLA, MoE, MTP), evaluate it, run GRPO with rule
rewards, evaluate again, and compare with an honest control: supervised training of the same base for the
same wall time. Writes runs/demo/report.md, summary.json, plots and sample completions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .atomic import atomic_write_text
from .config import option
from .data import held_out_problems
from .device import DEVICES
from .engine import LLM
from .eval import EvalResult, evaluate
from .tasks import Problem, get_task
from .tokenizer import load_tokenizer
from .train.distill import DistillConfig, SampleConfig, distill
from .train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig, GRPOTrainer
from .train.loop import TrainConfig
from .train.pretrain import PretrainConfig, pretrain


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "output directory (base, rl, sft_control, report.md)")
    task: str = option("addition@2", "a built-in task; NAME@LEVELS keeps those difficulty levels")
    pretrain_steps: int = option(500, "pretraining steps of the base")
    grpo_steps: int = option(40, "GRPO steps")
    eval_problems: int = option(100, "held-out problems evaluated (never trained on)")
    eval_k: int = option(4, "samples per held-out problem for pass@1 and cons@k")
    max_new_tokens: int = option(
        0, "completion length limit (0: 1.5x the task's longest worked solution, rounded up to 16 tokens)"
    )
    num_docs: int = option(40000, "worked examples in the pretraining corpus")
    seed: int = option(0, "random seed of every stage")
    think_share: float = option(0.3, "share of the base's unasked examples that think inside <think>")
    asked: float = option(0.3, "share of the base's examples that ask for the steps (and show them)")
    device: str = option("auto", f"where every stage runs: {DEVICES}")
    with_distill: bool = option(
        False, "also distil the RL model into a dense student, against GRPO on that student"
    )


def _base_data(cfg: DemoConfig, preset: str, **kw) -> PretrainConfig:
    """The base's corpus: worked examples of the task in short rows. 30% of them ask for the steps and show
    them; of the rest, unasked as the held-out problems are, 30% think step by step inside <think> and
    the others answer at once with an empty one. So the base learns the method from many examples but,
    asked plainly, answers at once on every seed, mostly wrong: the gap GRPO, rewarded for correct answers
    only, has to find. (With half the examples thinking and none asked, the seed decides whether the base
    already thinks when greedy; with fewer, whether it learns the method at all: docs/LOG.md.)"""
    return PretrainConfig(
        preset=preset,
        tasks=(cfg.task,),
        scratchpad=cfg.think_share,
        asked=cfg.asked,
        seq_len=128,
        bias_gamma=0.001,
        batch_size=16,
        num_docs=cfg.num_docs,
        eval_every=0,
        eval_problems=0,
        held_out=cfg.eval_problems,
        **kw,
    )


def completion_limit(task: str, problems: list[Problem], tokenizer: Path) -> int:
    """Room to think, not to ramble: 1.5x the longest worked solution (steps and answer) of the held-out
    problems in the base's tokens, rounded up to 16."""
    tok, solve = load_tokenizer(tokenizer), get_task(task).solution
    longest = max(len(tok.encode(solve(p)).ids) for p in problems)
    return math.ceil(1.5 * longest / 16) * 16


def _rl_schedule(cfg: DemoConfig, **kw) -> TrainConfig:
    """GRPO's optimiser: its defaults (see GRPO_TRAIN_DEFAULTS for why)."""
    return TrainConfig(**{**GRPO_TRAIN_DEFAULTS, "seed": cfg.seed, "device": cfg.device, **kw})


def _eval(path: Path, cfg: DemoConfig, problems) -> EvalResult:
    return evaluate(
        LLM(path, device=cfg.device), get_task(cfg.task), problems, cfg.max_new_tokens, cfg.eval_k
    )


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0 (0: from the task), got {cfg.max_new_tokens}")
    out = Path(cfg.out)
    t_start = time.perf_counter()
    problems = held_out_problems(cfg.task, cfg.eval_problems, cfg.seed)

    print(f"[1/5] pretraining the small DeepSeek-V3-style base ({cfg.pretrain_steps} steps)")
    teacher_base = pretrain(
        _base_data(cfg, "small"),
        TrainConfig(steps=cfg.pretrain_steps, lr=3e-3, warmup=20, seed=cfg.seed, device=cfg.device),
        out / "base",
    )
    if not cfg.max_new_tokens:
        cfg = replace(cfg, max_new_tokens=completion_limit(cfg.task, problems, out / "base"))
    print(f"[2/5] evaluating the base (completions up to {cfg.max_new_tokens} tokens)")
    base = _eval(out / "base", cfg, problems)

    print(f"[3/5] GRPO on {cfg.task} ({cfg.grpo_steps} steps, rule rewards only)")
    t = time.perf_counter()
    grpo_cfg = GRPOConfig(
        task=cfg.task,
        prompts_per_step=16,
        max_new_tokens=cfg.max_new_tokens,
        eval_every=max(1, cfg.grpo_steps // 8),
        eval_problems=cfg.eval_problems,  # the held-out problems GRPO never trains on, greedy only
        eval_k=0,
    )
    teacher_rl = GRPOTrainer(
        out / "base", grpo_cfg, _rl_schedule(cfg, steps=cfg.grpo_steps), out / "rl"
    ).train()
    rl_seconds = time.perf_counter() - t - teacher_rl["eval_seconds"]  # the control's budget: training only
    rl = _eval(out / "rl", cfg, problems)

    print(f"[4/5] control: supervised training of the same base for the same {rl_seconds:.0f}s")
    pretrain(
        _base_data(cfg, "small", init=str(out / "base")),
        TrainConfig(
            steps=10**6,
            lr=5e-4,
            warmup=5,
            min_lr_ratio=1.0,
            seed=cfg.seed + 1,
            max_seconds=rl_seconds,
            device=cfg.device,
        ),
        out / "sft_control",
    )
    sft = _eval(out / "sft_control", cfg, problems)

    extra = {}
    if cfg.with_distill:
        extra = _distillation(cfg, out, problems, replace(grpo_cfg, eval_every=0))
        extra["teacher"] = {
            "active_params": teacher_base["active_params"],
            "seconds": teacher_base["seconds"] + teacher_rl["seconds"],
            "flops": teacher_base["cost"]["flops"] + teacher_rl["flops"],
        }
    print("[5/5] writing the report")
    seconds = time.perf_counter() - t_start
    summary = {
        "task": cfg.task,
        "seconds": seconds,
        "grpo_seconds": rl_seconds,
        "base": _row(base),
        "rl": _row(rl),
        "sft_control": _row(sft),
        "curve": [
            {"step": r["step"], "greedy": r["eval_greedy"], "mean_len": r["eval_mean_len"]}
            for r in teacher_rl["evals"]
        ],
        **extra,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "report.md", _report(cfg, summary, base, rl, sft))
    _samples(out, base, rl)
    print(
        f"\ngreedy accuracy {base.greedy:.0%} -> {rl.greedy:.0%} after GRPO ({sft.greedy:.0%} for the SFT control); "
        f"mean length {base.mean_len:.1f} -> {rl.mean_len:.1f} tokens; {seconds / 60:.1f} min in all"
    )
    print(f"report: {out / 'report.md'}\nchat with it: nanoseek serve {out / 'rl'}")
    return summary


def _distillation(cfg: DemoConfig, out: Path, problems, grpo_cfg: GRPOConfig) -> dict:
    """R1 §4.1 in miniature: distil the RL teacher into a dense student half its size, against GRPO run
    directly on the same student base for the same wall time."""
    print("[4b] distillation: a dense student base, then SFT on verified teacher samples")
    student = pretrain(
        _base_data(cfg, "dense-small", tokenizer=str(out / "base")),
        TrainConfig(steps=cfg.pretrain_steps, lr=3e-3, warmup=20, seed=cfg.seed, device=cfg.device),
        out / "student_base",
    )
    t = time.perf_counter()
    try:
        d = distill(
            DistillConfig(
                teacher=str(out / "rl"),
                student_init=str(out / "student_base"),
                steps=200,
                batch_size=8,
                device=cfg.device,
                sample=SampleConfig(
                    task=cfg.task, problems=400, n=8, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed
                ),
            ),
            out / "student_distill",
            cfg.seed,
        )
    except ValueError as e:  # e.g. a teacher with no verified-correct sample: report it, keep the rest
        print(f"distillation skipped: {e}")
        return {"distill_error": str(e)}
    budget = time.perf_counter() - t
    print(f"[4c] GRPO directly on the student base for the same {budget:.0f}s")
    g = GRPOTrainer(
        out / "student_base", grpo_cfg, _rl_schedule(cfg, steps=10**6, max_seconds=budget), out / "student_rl"
    ).train()
    distilled, student_rl = (
        _eval(out / "student_distill", cfg, problems),
        _eval(out / "student_rl", cfg, problems),
    )
    flops = student["cost"]["flops"]
    return {
        "student_active_params": student["active_params"],
        "student_distill": {**_row(distilled), "seconds": budget, "flops": flops + d["flops"]},
        "student_rl": {**_row(student_rl), "seconds": g["seconds"], "flops": flops + g["flops"]},
    }


def _row(r: EvalResult) -> dict:
    return {"greedy": r.greedy, "pass@1": r.pass1, "cons@k": r.cons, "mean_len": r.mean_len}


def _report(cfg: DemoConfig, s: dict, base: EvalResult, rl: EvalResult, sft: EvalResult) -> str:
    lines = [
        "# nanoseek demo: R1-Zero in miniature",
        "",
        f"Task: `{cfg.task}`, {cfg.eval_problems} held-out problems; pass@1 and cons@{cfg.eval_k} from "
        f"{cfg.eval_k} samples at temperature 0.6, top-p 0.95. Total time {s['seconds'] / 60:.1f} min.",
        "",
        f"| model | greedy | pass@1 | cons@{cfg.eval_k} | mean tokens |",
        "|---|---|---|---|---|",
    ]
    rows = [
        ("base (pretrained)", "base"),
        ("GRPO (rule rewards only)", "rl"),
        ("control: SFT for the same wall time", "sft_control"),
    ]
    if "student_distill" in s:
        rows += [
            ("dense student, distilled from the GRPO teacher", "student_distill"),
            ("dense student, GRPO for the same time", "student_rl"),
        ]
    for name, key in rows:
        r = s[key]
        lines.append(
            f"| {name} | {r['greedy']:.1%} | {r['pass@1']:.1%} | {r['cons@k']:.1%} | {r['mean_len']:.1f} |"
        )
    if "distill_error" in s:
        lines += ["", f"Distillation could not run: {s['distill_error']}."]
    if "student_distill" in s:
        t = s["teacher"]
        lines += [
            "",
            f"Teacher: small MoE, {t['active_params'] / 1e6:.2f}M activated parameters, pretraining + GRPO "
            f"{t['seconds']:.0f} s, {t['flops']:.2e} FLOPs. "
            f"Student: dense-small, {s['student_active_params'] / 1e6:.2f}M activated parameters. Cost after "
            "the student's pretraining: "
            + "; ".join(
                f"{k.replace('student_', '')} {s[k]['seconds']:.0f} s, {s[k]['flops']:.2e} FLOPs"
                for k in ("student_distill", "student_rl")
            ),
        ]
    lines += [
        "",
        "## Held-out greedy accuracy and completion length against RL steps",
        "",
        "| RL step | greedy | mean tokens |",
        "|---|---|---|",
        *[f"| {c['step']} | {c['greedy']:.1%} | {c['mean_len']:.1f} |" for c in s["curve"]],
        "",
        "![pretraining loss](base/loss.png)",
        "![GRPO accuracy](rl/accuracy.png)",
        "![completion length](rl/length.png)",
        "",
        "## Greedy completions before and after GRPO",
        "",
    ]
    for b, r in list(zip(base.samples, rl.samples))[:3]:
        lines += [
            f"**{b['prompt']}**",
            "",
            f"- before: `{b['completion'].strip()}` ({'right' if b['correct'] else 'wrong'})",
            f"- after: `{r['completion'].strip()}` ({'right' if r['correct'] else 'wrong'})",
            "",
        ]
    sampled = {
        m: [x for x in res.samples if x["mode"] == "sample"] for m, res in (("base", base), ("rl", rl))
    }
    if sampled["base"] and sampled["rl"]:
        first_wrong = next((x for x in base.samples if not x["correct"]), base.samples[0])
        question = first_wrong["prompt"]
        lines += [f"## The same held-out problem, sampled (temperature 0.6): {question}", ""]
        for name, model in (("before", "base"), ("after", "rl")):
            lines += [f"{name}:", ""]
            lines += [
                f"- `{x['completion'].strip()}` ({'right' if x['correct'] else 'wrong'})"
                for x in [x for x in sampled[model] if x["prompt"] == question][:3]
            ]
            lines.append("")
    lines += [f"Chat with the result: `nanoseek serve {Path(cfg.out) / 'rl'}`", ""]
    return "\n".join(lines)


def _samples(out: Path, base: EvalResult, rl: EvalResult) -> None:
    rows = [{"model": "base", **x} for x in base.samples] + [{"model": "rl", **x} for x in rl.samples]
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
