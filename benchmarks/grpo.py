"""GRPO step time: nanoseek's GRPOTrainer against TRL's GRPOTrainer, side by side in one run.

    python benchmarks/grpo.py [--checkpoint runs/demo/base] [--task addition@2 arithmetic] [--steps 6] \
                              [--prompts 32] [--group 8] [--max-new-tokens 32]

Same exported checkpoint (TRL loads it with `transformers`), task, reward functions, group size G,
prompts per step, sampling temperature, completion length, learning rate and loss (DAPO token-level,
group-scaled advantages, beta = 0, one update per rollout batch). TRL is configured as its documentation
advises for a CPU: fp32 (`bf16=False`; TRL's default bf16 is emulated on CPUs without bf16 units) and no
gradient checkpointing (its default trades compute for memory this model does not need); the
configuration is printed. Both sides' mean completion lengths and rewards are printed, and the lengths
compared, since a faster step over shorter completions would be no faster at all. TRL runs before
nanoseek and again after it, its steps pooled, so that a drift in the machine's speed (large on shared
CPUs) weighs on both sides. Prints median step seconds of each and
their ratio, nanoseek's rollout share of the step, and the step against a FLOP floor: 6 x active
parameters x trained tokens + 2 x active parameters x rollout tokens at this CPU's 1024x1024 fp32 matmul rate
(`train_step.matmul_flops`, the reference of the MFU figures too; the median of timings before, between
and after the runs).
Needs the bench extra: `pip install -e .[bench]` (transformers, trl).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_step import matmul_flops  # benchmarks/: the MFU reference all benchmarks share

from nanoseek import ModelConfig
from nanoseek.tasks import get_task
from nanoseek.tasks.rewards import RewardSet
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer
from nanoseek.train.loop import TrainConfig


def run_nanoseek(args, out: Path, compile: bool = False) -> list[dict]:
    cfg = GRPOConfig(
        task=args.task,
        group_size=args.group,
        prompts_per_step=args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
    )
    GRPOTrainer(
        args.checkpoint,
        cfg,
        TrainConfig(
            steps=args.steps,
            lr=args.lr,
            warmup=0,
            min_lr_ratio=1.0,
            weight_decay=0.0,
            seed=0,
            compile=compile,
        ),
        out,
    ).train(progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TRL_SETTINGS = (
    "bf16",
    "gradient_checkpointing",
    "per_device_train_batch_size",
    "num_generations",
    "max_completion_length",
    "temperature",
    "learning_rate",
    "beta",
    "loss_type",
    "scale_rewards",
    "num_iterations",
    "steps_per_generation",
    "use_cpu",
)


def run_trl(args, out: Path) -> tuple[list[float], list[float], list[float]]:
    """Step seconds, mean completion lengths and mean rewards of TRL's trainer (timed by a callback around
    each step)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    task = get_task(args.task)
    rewards = RewardSet(task, {"accuracy": 1.0, "format": 0.1})
    rng = random.Random(0)
    problems = [task.sample(rng) for _ in range(args.prompts * (args.steps + 1))]
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # TRL's completion text is decoded with skip_special_tokens, which drops the reasoning and answer tags
    # (added tokens) and would score every completion 0: the rewards read the text nanoseek's engine shows,
    # the completion's ids decoded as they are, less a final EOS
    ns_tok = load_tokenizer(args.checkpoint)
    eos = ns_tok.token_to_id(tok.eos_token)

    def reward(prompts, completions, completion_ids, index, **_) -> list[float]:
        texts = [
            ns_tok.decode(ids[:-1] if ids and ids[-1] == eos else ids, skip_special_tokens=False)
            for ids in completion_ids
        ]
        return [rewards(problems[i], text)[0] for i, text in zip(index, texts)]

    hf_logging.set_verbosity_error()  # the MTP layer's weights are "unexpected" to transformers: by design
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": [p.prompt for p in problems], "index": list(range(len(problems)))})
    config = TRLConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        steps_per_generation=1,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
    )
    print("TRL GRPOConfig: " + ", ".join(f"{k}={getattr(config, k)}" for k in TRL_SETTINGS))
    times: list[float] = []
    lengths: list[float] = []
    mean_rewards: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                mean_rewards.append(logs["reward"])

    trainer = TRLTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()
    return times, lengths, mean_rewards


def compare(args, task_name: str, rates: list[float]) -> None:
    """Both trainers on one task, then the side-by-side table."""
    args.task = task_name
    # each run's records, and how many first steps warm up allocators and caches (and compile)
    runs: dict[str, tuple[list[dict], int]] = {}
    trl_runs = []  # TRL before nanoseek and after it: a drift in the machine's speed shows on both sides
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_trl:
            trl_runs.append(run_trl(args, Path(tmp) / "trl-before"))
        runs["nanoseek GRPOTrainer"] = run_nanoseek(args, Path(tmp) / "nanoseek"), 1
        rates.append(matmul_flops())
        if args.compile:
            runs["nanoseek, --compile"] = run_nanoseek(args, Path(tmp) / "compiled", compile=True), 2
            rates.append(matmul_flops())
        if not args.no_trl:
            trl_runs.append(run_trl(args, Path(tmp) / "trl-after"))
    # each TRL run's first step warms up: its times are left out, its lengths and rewards kept where alone
    trl_times = [t for times, _, _ in trl_runs for t in times[1:]]
    trl_lens = [x for _, lens, _ in trl_runs for x in (lens[1:] or lens)]
    trl_rewards = [x for _, _, rewards in trl_runs for x in (rewards[1:] or rewards)]
    rates.append(matmul_flops())
    n = args.prompts * args.group
    c = ModelConfig.from_json(Path(args.checkpoint) / "config.json")
    tok, task, rng = load_tokenizer(args.checkpoint), get_task(task_name), random.Random(0)
    prompt_len = statistics.mean(
        len(tok.encode(task.sample(rng).prompt, add_special_tokens=False).ids) for _ in range(100)
    )
    active = c.num_active_params(embedding=False)
    print(
        f"\ncheckpoint {args.checkpoint} ({c.num_params() / 1e6:.2f}M params), task {task_name}, "
        f"{args.prompts} prompts x G={args.group}, up to {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'':<34}{'step s (median)':>16}{'mean completion':>17}{'mean reward':>13}{'rollout share':>15}"
        f"{'x FLOP floor':>14}"
    )
    steps, lens = {}, {}
    for name, (records, skip) in runs.items():
        steps[name] = statistics.median(r["step_seconds"] for r in records[skip:])
        rollout = statistics.median(r["rollout_seconds"] for r in records[skip:])
        lens[name] = statistics.mean(r["mean_len"] for r in records[skip:])
        reward = statistics.mean(r["reward_mean"] for r in records[skip:])
        # the floor: matmul FLOPs alone (activated parameters), at the rate of a plain 1024x1024 matmul;
        # the update forwards and backwards prompt and completion, rollouts prefill each prompt once
        trained = n * (prompt_len + lens[name])
        rolled = n * lens[name] + args.prompts * prompt_len
        floor = (6 * active * trained + 2 * active * rolled) / statistics.median(rates)
        print(
            f"{name:<34}{steps[name]:>16.3f}{lens[name]:>17.1f}{reward:>13.3f}{rollout / steps[name]:>15.0%}"
            f"{steps[name] / floor:>13.2f}x"
        )
    if trl_times:
        trl, trl_len = statistics.median(trl_times), statistics.mean(trl_lens)
        trl_reward = statistics.mean(trl_rewards)
        print(f"{'TRL GRPOTrainer (fp32, no ckpt)':<34}{trl:>16.3f}{trl_len:>17.1f}{trl_reward:>13.3f}")
        for name, step in steps.items():
            same = abs(trl_len - lens[name]) <= 0.15 * max(trl_len, lens[name])
            warning = (
                ""
                if same
                else "  (WARNING: mean completion lengths differ by more than 15%: not the same work)"
            )
            print(f"{name} is {trl / step:.2f}x faster per step than TRL{warning}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo/base")
    ap.add_argument("--task", nargs="+", default=["addition@2", "arithmetic"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-trl", action="store_true", help="time nanoseek alone")
    ap.add_argument(
        "--compile", action="store_true", help="also nanoseek with the update compiled (grpo --compile)"
    )
    args = ap.parse_args()
    if not (Path(args.checkpoint) / "config.json").exists():
        raise SystemExit(
            f"--checkpoint: {args.checkpoint} is not a checkpoint directory (run `nanoseek demo` first)"
        )
    rates = [matmul_flops()]  # the floor's reference, timed around each run: a shared CPU drifts
    for task in args.task:
        compare(args, task, rates)


if __name__ == "__main__":
    main()
