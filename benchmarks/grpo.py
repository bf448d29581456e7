"""GRPO step time: nanoseek's GRPOTrainer against TRL's GRPOTrainer, side by side in one run.

    python benchmarks/grpo.py [--checkpoint runs/demo/base] [--task addition@2 arithmetic] [--steps 6] \
                              [--prompts 32] [--group 8] [--max-new-tokens 32]

Same exported checkpoint (TRL loads it with `transformers`), task, reward functions, group size G, prompts
per step, sampling temperature, completion length, learning rate and loss (DAPO token-level, group-scaled
advantages, beta = 0, one update per rollout batch). TRL is configured as a CPU user would: fp32
(`bf16=False`, the precision nanoseek trains in, so both sides do the same arithmetic; TRL's default is
bf16) and no gradient checkpointing (its default trades compute for memory this model does not need); the
configuration is printed. Both sides' mean completion lengths and rewards are printed, and the lengths
compared, since a faster step over shorter completions would be no faster at all. TRL trains in a process of
its own whose steps alternate with nanoseek's, one step each in turn (a pipe hands the CPU over), so that
both sides meet the same machine speed (it drifts by tens of percent within minutes on shared CPUs); each
nanoseek run (eager, then `--compile`) has a TRL run of its own alongside. Prints the median step seconds of
each pair and their ratio, nanoseek's rollout share of the step, and the step against a FLOP floor: 6 x
active parameters x trained tokens + 2 x active parameters x rollout tokens at this CPU's 1024x1024 fp32
matmul rate (`train_step.matmul_flops`, the reference of the MFU figures too; the median of timings before,
between and after the runs).
Needs the bench extra: `pip install -e .[bench]` (transformers, trl).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch
from train_step import matmul_flops  # benchmarks/: the MFU reference all benchmarks share

from nanoseek import ModelConfig
from nanoseek.tasks import get_task
from nanoseek.tasks.rewards import RewardSet
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer
from nanoseek.train.loop import TrainConfig


def run_nanoseek(
    args, out: Path, compile: bool = False, between_steps: Callable[[], None] | None = None
) -> list[dict]:
    """nanoseek's per-step records; `between_steps` runs after each step is timed and logged."""
    cfg = GRPOConfig(
        task=args.task,
        group_size=args.group,
        prompts_per_step=args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
    )
    trainer = GRPOTrainer(
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
    )
    if between_steps is not None:  # the training loop logs each record once its step is timed
        log = trainer.trainer.log

        def log_then_hand_over(record: dict) -> None:
            log(record)
            between_steps()

        trainer.trainer.log = log_then_hand_over
    trainer.train(progress=False)
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


def run_trl(args, out: Path, turn: Connection) -> tuple[list[float], list[float], list[float]]:
    """Step seconds, mean completion lengths and mean rewards of TRL's trainer (timed by a callback around
    each step). It says "ready" on `turn` once set up, then trains a step each time it is sent "go",
    answering "stepped"."""
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
    settings = ", ".join(f"{k}={getattr(config, k)}" for k in TRL_SETTINGS)
    print(f"TRL GRPOConfig: {settings}; {torch.get_num_threads()} threads")
    times: list[float] = []
    lengths: list[float] = []
    mean_rewards: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            turn.send("stepped")  # the other side's step, then this side's next
            turn.recv()

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
    turn.send("ready")
    turn.recv()
    trainer.train()
    return times, lengths, mean_rewards


def _trl_process(args, out: Path, turn: Connection) -> None:
    turn.send(run_trl(args, out, turn))


def alternating(args, out: Path, compile: bool) -> tuple[list[dict], tuple | None]:
    """nanoseek's records and TRL's (`run_trl`'s) results, their steps taken in turn: nanoseek's first,
    then TRL's, each measured while the other side waits."""
    if args.no_trl:
        return run_nanoseek(args, out / "nanoseek", compile), None
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with nanoseek's
    here, there = spawn.Pipe()
    trl = spawn.Process(target=_trl_process, args=(args, out / "trl", there))
    trl.start()
    results = None

    def trl_step() -> None:
        nonlocal results
        if results is None:
            here.send("go")
            message = here.recv()
            if message != "stepped":  # it trained its last step: this is its results
                results = message

    try:
        here.recv()  # "ready": TRL is set up before nanoseek starts
        records = run_nanoseek(args, out / "nanoseek", compile, between_steps=trl_step)
        while results is None:  # TRL's last steps, if it has more
            trl_step()
    except EOFError:
        raise SystemExit(f"the TRL process ended without its results (exit code {trl.exitcode})") from None
    finally:
        trl.join(timeout=60)
        if trl.is_alive():
            trl.kill()
    return records, results


def compare(args, task_name: str, rates: list[float]) -> None:
    """Both trainers on one task, then the side-by-side table."""
    args.task = task_name
    # each nanoseek run's records, how many first steps warm up allocators and caches (and compile), and
    # the TRL run alongside it
    runs: dict[str, tuple[list[dict], int, tuple | None]] = {}
    variants = [("nanoseek GRPOTrainer", False, 1)] + [("nanoseek, --compile", True, 2)] * args.compile
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, compiled, skip) in enumerate(variants):
            records, trl = alternating(args, Path(tmp) / str(i), compiled)
            runs[name] = records, skip, trl
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
    ratios = []
    for name, (records, skip, trl) in runs.items():
        step = statistics.median(r["step_seconds"] for r in records[skip:])
        rollout = statistics.median(r["rollout_seconds"] for r in records[skip:])
        length = statistics.mean(r["mean_len"] for r in records[skip:])
        reward = statistics.mean(r["reward_mean"] for r in records[skip:])
        # the floor: matmul FLOPs alone (activated parameters), at the rate of a plain 1024x1024 matmul;
        # the update forwards and backwards prompt and completion, rollouts prefill each prompt once
        trained = n * (prompt_len + length)
        rolled = n * length + args.prompts * prompt_len
        floor = (6 * active * trained + 2 * active * rolled) / statistics.median(rates)
        print(
            f"{name:<34}{step:>16.3f}{length:>17.1f}{reward:>13.3f}{rollout / step:>15.0%}"
            f"{step / floor:>13.2f}x"
        )
        if trl is None:
            continue
        # TRL's first step warms up: its time is left out, its length and reward kept where alone
        times, trl_lens, trl_rewards = trl
        trl_step, trl_len = statistics.median(times[1:]), statistics.mean(trl_lens[1:] or trl_lens)
        trl_reward = statistics.mean(trl_rewards[1:] or trl_rewards)
        print(f"{'  TRL (fp32, no ckpt), alongside':<34}{trl_step:>16.3f}{trl_len:>17.1f}{trl_reward:>13.3f}")
        same = abs(trl_len - length) <= 0.15 * max(trl_len, length)
        warning = (
            "" if same else "  (WARNING: mean completion lengths differ by more than 15%: not the same work)"
        )
        ratios.append(f"{name} is {trl_step / step:.2f}x faster per step than TRL alongside it{warning}")
    print("\n".join(ratios))


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
