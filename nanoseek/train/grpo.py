"""GRPO (DeepSeekMath §4; R1 §2.2) with the DAPO and Dr. GRPO variants, on the shared training loop.

Each rollout step samples prompts, generates G completions per prompt with the inference engine (which
holds the live policy, so updated weights are used at once), scores them with rule-based rewards, and
turns group-relative advantages into a clipped policy-gradient loss with an optional k3 KL penalty
against a frozen reference. One rollout batch feeds `mu` optimizer updates with stored old log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_write_text
from ..checkpoint import load_model
from ..config import ModelConfig, option
from ..data import held_out_problems, training_problems
from ..engine import LLM, RequestOutput, SamplingParams
from ..eval import evaluate
from ..hub import resolve_checkpoint
from ..kernels import GroupedMask
from ..plots import plot_series
from ..tasks import Problem, get_task
from ..tasks.rewards import RewardSet, overlong_penalty
from ..tokenizer import load_tokenizer
from .expert_parallel import check_expert_parallel
from .loop import TrainConfig, Trainer, setup_distributed

COMPLETIONS_FILE = "completions.jsonl"


# The optimiser settings GRPO runs with unless told otherwise (the command line's defaults and the demo's):
# a constant small rate after a short warm-up, no weight decay. Larger rates also learn to use the scratchpad
# but their noisy updates break the arithmetic the base already knows.
GRPO_TRAIN_DEFAULTS = {"steps": 100, "lr": 1e-4, "warmup": 5, "min_lr_ratio": 1.0, "weight_decay": 0.0}


@dataclass
class GRPOConfig:
    task: str = option(
        "arithmetic", "a built-in task (NAME@LEVELS keeps those difficulty levels) or jsonl:PATH"
    )
    group_size: int = option(8, "completions sampled per prompt (G)")
    prompts_per_step: int = option(16, "prompts per rollout batch (global, across ranks)")
    # below 1, fewer sampled scratchpads misread a digit, which would blur the reward's case for thinking
    temperature: float = option(0.7, "rollout sampling temperature (the log-probs are taken at it)")
    top_p: float = option(1.0, "rollout nucleus sampling")
    max_new_tokens: int = option(48, "completion length limit")
    epsilon_low: float = option(0.2, "lower clip of the importance ratio")
    epsilon_high: float = option(0.28, "upper clip of the importance ratio (DAPO's clip-higher)")
    beta: float = option(
        0.0, "k3 KL weight against the frozen reference (R1-Zero: 0.001; Dr. GRPO / DAPO: 0)"
    )
    ref_reset_every: int = option(0, "reset the KL reference to the policy every N steps (0: never)")
    scale_rewards: str = option(
        "group",
        "divide advantages by the group's std, the batch's, or not at all",
        choices=("group", "batch", "none"),
    )
    loss_type: str = option(
        "dapo",
        "grpo: per-sequence mean; dapo: token-level mean; dr_grpo: constant normaliser",
        choices=("grpo", "dapo", "dr_grpo"),
    )
    mu: int = option(1, "optimizer updates per rollout batch")
    micro_batch_size: int = option(
        64, "sequences per forward/backward; an update accumulates over the rollout"
    )
    shared_prompts: bool = option(
        True,
        "the update computes each group's prompt once, its completions packed after it (where "
        "micro_batch_size is a multiple of group_size; otherwise every completion carries its prompt)",
    )
    dynamic_sampling: bool = option(
        False, "DAPO: drop groups whose rewards are all equal, resample to refill"
    )
    mask_truncated: bool = option(False, "DAPO: no loss on completions cut off at --max-new-tokens")
    format_weight: float = option(0.1, "weight of the format reward (<think>...</think> then the answer)")
    consistency_weight: float = option(
        0.0, "R1 language-consistency reward: share of reasoning words in Latin script"
    )
    overlong_cache: int = option(0, "DAPO soft overlong penalty over the last N tokens of the limit (0: off)")
    eval_every: int = option(
        0, "held-out evaluation before the first step, every N steps and after the last (0: none)"
    )
    eval_problems: int = option(100, "held-out problems evaluated (never rolled out)")
    eval_k: int = option(4, "samples per held-out problem for pass@1 and cons@k")
    template: str = option(
        "chat", "prompt format: the chat template, or R1-Zero's plain template", choices=("chat", "r1zero")
    )
    log_completions_every: int = option(
        10,
        "every K steps, a rollout batch's completions with each reward and "
        "advantage to OUT/completions.jsonl and the trackers (0: never)",
    )

    def validate(self, world: int) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size: GRPO needs at least 2 samples per prompt, got {self.group_size}")
        if self.prompts_per_step < 1 or self.prompts_per_step % world:
            raise ValueError(
                f"prompts_per_step: {self.prompts_per_step} does not divide across {world} ranks"
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards: must be group, batch or none, got {self.scale_rewards!r}")
        if self.loss_type not in ("grpo", "dapo", "dr_grpo"):
            raise ValueError(f"loss_type: must be grpo, dapo or dr_grpo, got {self.loss_type!r}")
        if self.mu < 1 or self.micro_batch_size < 1:
            raise ValueError("mu and micro_batch_size must be >= 1")
        # log-probs are taken at the rollout temperature: 0 would divide the logits by zero (a NaN loss), and
        # below 1e-5 the engine decodes greedily (every group's samples alike: no advantage)
        if not (self.temperature >= 1e-5 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: rollouts must sample (>= 1e-5), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(
                f"epsilon_low / epsilon_high: need 0 <= low < 1 and high >= 0, got "
                f"{self.epsilon_low} / {self.epsilon_high}"
            )
        if self.max_new_tokens < 1 or not 0 <= self.overlong_cache <= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens / overlong_cache: need max_new_tokens >= 1 and an overlong buffer "
                f"within it, got {self.max_new_tokens} / {self.overlong_cache}"
            )
        if self.beta < 0:
            raise ValueError(f"beta: the KL weight must be >= 0, got {self.beta}")
        if self.log_completions_every < 0:
            raise ValueError(
                f"log_completions_every: must be >= 0 (0: never), got {self.log_completions_every}"
            )
        get_task(self.task)  # unknown task: error before any training


def advantages(
    rewards: Tensor, group_size: int, scale: str, eps: float = 1e-4, batch_std: Tensor | None = None
) -> Tensor:
    """A_i = r_i - mean(group), divided by the group's std, the batch's std (`batch_std`: the whole
    batch's, when ranks hold parts of it), or nothing (Dr. GRPO)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / ((rewards.std() if batch_std is None else batch_std) + eps)
    return adv.reshape(-1)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    cfg: GRPOConfig,
    batch: tuple[int, int, int] | None = None,
) -> tuple[Tensor, dict]:
    """Clipped surrogate minus beta x k3 KL, aggregated per `loss_type`; tensors are [N, T] (adv [N]).

    `batch` = (rows, completion tokens, parts) of the whole rollout batch when these tensors are one of
    its `parts` micro-batches: the loss is then normalised by the whole batch, so that the micro-batches'
    losses, each divided by `parts` (as gradient accumulation does), add up to the whole batch's exactly.
    The stats (KL, clip fractions) are per-token means whatever the loss type, each micro-batch reporting
    its share of the whole batch's, so that their mean over the micro-batches is the whole batch's.
    """
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token = -torch.minimum(ratio * a, clipped * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and cfg.beta:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.beta * kl
    mask = mask.to(logp.dtype)
    rows, tokens, parts = batch or (mask.shape[0], int(mask.sum()), 1)
    if cfg.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() * parts / rows
    elif cfg.loss_type == "dapo":
        loss = (per_token * mask).sum() * parts / max(tokens, 1)
    else:
        loss = (per_token * mask).sum() * parts / (rows * cfg.max_new_tokens)
    with torch.no_grad():
        stats = {
            "kl": token_mean(kl, mask, tokens, parts),
            "clip_low_frac": token_mean((ratio < 1 - cfg.epsilon_low) & (a < 0), mask, tokens, parts),
            "clip_high_frac": token_mean((ratio > 1 + cfg.epsilon_high) & (a > 0), mask, tokens, parts),
        }
    return loss, stats


def token_mean(x: Tensor, mask: Tensor, tokens: int, parts: int) -> float:
    """x's sum over the mask as this micro-batch's share of a per-token mean over `tokens` in `parts` parts."""
    return float((x * mask).sum()) * parts / max(tokens, 1)


Group = tuple[Problem, RequestOutput, list[float], list[dict]]  # a prompt, its samples, rewards, components


@dataclass
class Rollout:
    ids: Tensor  # [N, P + T] prompt + completion, right-padded
    prompt_lens: Tensor  # [N]
    lens: Tensor  # [N] prompt + completion
    mask: Tensor  # [N, T] completion tokens that count in the loss
    adv: Tensor  # [N]
    total: tuple[int, int] = (0, 0)  # rows and loss tokens of the whole batch, over all ranks
    old_logp: Tensor | None = None  # [N, T]
    ref_logp: Tensor | None = None
    metrics: dict = field(default_factory=dict)
    group_adv: Tensor | None = None  # [N] advantages in sampled order (group after group), `adv` unsorted
    group_size: int = 0  # rows are whole groups in order, whose prompt the update computes once (0: not)
    samples: list[dict] = field(default_factory=list)  # completion table rows, when asked for


def token_logprobs(
    model: Callable[..., Tensor],
    rollout: Rollout,
    rows: slice,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs [n, T] of each completion token under `model` (temperature-scaled, as sampled), and with
    `with_entropy` the entropies [n, T] of the distributions they were drawn from (no gradient)."""
    # a copy of its own: a compiled model would otherwise see each micro-batch at another offset into the
    # rollout's storage, and compile again for it
    ids = rollout.ids[rows, : int(rollout.lens[rows].max())].clone()
    plens = rollout.prompt_lens[rows]
    t = rollout.mask.shape[1]
    # the positions that predict completion tokens: prompt_len - 1 + j for j < T
    pos = (plens[:, None] - 1 + torch.arange(t, device=ids.device)[None, :]).clamp(max=ids.shape[1] - 2)
    targets = ids.gather(1, (pos + 1))
    g = rollout.group_size
    if g and rows.start % g == 0 and (rows.stop - rows.start) % g == 0:
        packed, positions, mask, at = shared_prompt_rows(rollout, rows, g)
        logits = model(packed, positions, mask=mask)
        row, col = 0, at  # where each completion token's logits are
    else:  # the positions before the first completion token predict nothing the loss reads
        first = int(plens.min()) - 1
        logits = model(ids[:, :-1])[:, first:]
        row, col = torch.arange(ids.shape[0], device=ids.device)[:, None], pos - first
    # normalised where the logits were computed, then read at [n, T]: gathering [n, T, V] logits first would
    # copy them, and scatter their gradient back
    logp_all = F.log_softmax(logits.float() / temperature, -1)
    logp = logp_all[row, col, targets]
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, -(logp_all.exp() * logp_all).sum(-1)[row, col]


def shared_prompt_rows(rollout: Rollout, rows: slice, g: int) -> tuple[Tensor, Tensor, GroupedMask, Tensor]:
    """The rows (whole groups of g: one prompt, g completions) packed into one row, group after group, no
    padding between them: the prompt once, then each completion at the positions it has in its own row,
    attending to the prompt and to itself only. Every completion's tokens see exactly what they see in
    their own row, so the log-probs are the same, for the prompt's share of the compute once a group
    instead of g times. A completion's last token is left out: it predicts nothing the loss reads, and no
    other token attends to it. Returns the packed ids [1, N], positions [1, N], their `GroupedMask` and,
    for each row, the packed positions [n, T] whose logits predict its completion tokens (past a
    completion's end: any)."""
    ids = rollout.ids[rows].tolist()
    plens, lens = rollout.prompt_lens[rows].tolist(), rollout.lens[rows].tolist()
    t = rollout.mask.shape[1]
    tokens, positions, segments, at = [], [], [], []  # tokens and positions over the packed row
    for r0 in range(0, len(ids), g):
        p, last = plens[r0], len(tokens) + plens[r0] - 1  # the prompt's last position predicts token 0
        tokens += ids[r0][:p]
        positions += range(p)
        seg = [0] * p
        for j in range(g):
            c, start = lens[r0 + j] - p, len(tokens)
            tokens += ids[r0 + j][p : p + c - 1]
            positions += range(p, p + c - 1)
            seg += [j + 1] * (c - 1)
            # token k (k > 0) is predicted by the completion's token k - 1
            at.append([last] + [start + k - 1 if k < c else last for k in range(1, t)])
        segments.append(seg)
    width = max(map(len, segments))
    device = rollout.ids.device
    # padding attends to the prompt and to itself, and nothing attends to it
    seg = torch.tensor([x + [-1] * (width - len(x)) for x in segments], device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = causal & ((seg[:, None, :] == seg[:, :, None]) | (seg[:, None, :] == 0))
    return (
        torch.tensor([tokens], device=device),
        torch.tensor([positions], device=device),
        GroupedMask.of(mask[:, None], list(map(len, segments))),
        torch.tensor(at, device=device),
    )


class GRPOTrainer:
    def __init__(
        self,
        init: str | os.PathLike,
        cfg: GRPOConfig,
        tc: TrainConfig,
        out: str | os.PathLike,
        rewards: RewardSet | None = None,
    ):
        self.d = setup_distributed(tc.device)
        cfg.validate(self.d.world)
        self.cfg, self.tc, self.out = cfg, tc, Path(out)
        init = resolve_checkpoint(init)
        self.tokenizer = load_tokenizer(init)
        if self.tokenizer is None:
            raise ValueError(f"init: {init} has no tokenizer.json")
        if tc.expert_parallel > 1:
            check_expert_parallel(tc.expert_parallel, self.d.world, ModelConfig.from_json(init), tc.fsdp)
        torch.manual_seed(tc.seed)
        self.model = load_model(init).train()
        # the loss reads only the main model's logits: MTP gets no gradient, and DDP must not wait for one
        self.model.mtp.requires_grad_(False)
        self.task = get_task(cfg.task, cfg.template)
        self.rewards = rewards or RewardSet(
            self.task, {"accuracy": 1.0, "format": cfg.format_weight, "consistency": cfg.consistency_weight}
        )
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.beta else None
        # what rollouts decode with: the training model itself, or under expert parallelism (where each rank
        # holds some experts, and ranks decode different prompts for different lengths) a whole copy that
        # shares every other parameter with it and gathers the experts before each rollout
        self.policy = copy.deepcopy(self.model).eval() if tc.expert_parallel > 1 else self.model
        rows = cfg.prompts_per_step // self.d.world * cfg.group_size  # rollout sequences on this rank
        tc.grad_accum = -(-rows // cfg.micro_batch_size)  # micro-batches per update
        run_config = {
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("eval_every", "eval_problems", "eval_k", "log_completions_every")
        }
        # a rollout batch's later updates need its stored old log-probs: checkpoints fall between batches
        self.trainer = Trainer(
            self.model,
            tc,
            out,
            tokenizer_dir=init,
            run_config=run_config,
            every=cfg.mu,
            extra_state=self._reference_state if self.ref is not None and cfg.ref_reset_every else None,
        )
        self.ep = self.trainer.ep
        if self.ref is not None:  # where the trainer moved the policy, with that device's kernels
            self.ref.to(self.trainer.dist.device).prepare("train")
        if self.ep is not None:
            self.ep.share_dense(self.policy.to(self.trainer.dist.device), self.model)
        # every rollout of a step decodes in one batch; --compile compiles its decode steps too
        self.llm = LLM(
            self.policy,
            self.tokenizer,
            max_num_seqs=max(128, cfg.prompts_per_step * cfg.group_size),
            compile=tc.compile,
        )
        self.rollout: Rollout | None = None
        # the held-out problems pretraining kept out of its corpus (same seed): evaluated on, never trained on
        self.eval_problems = held_out_problems(cfg.task, cfg.eval_problems, tc.seed, cfg.template)
        self.eval_seconds = 0.0
        self._held_out = {p.question for p in self.eval_problems}

    def _reference_state(self) -> dict[str, Tensor]:
        """The reference since its last reset is no longer the initial model: checkpoints keep it."""
        return {f"ref.{k}": v for k, v in self.ref.state_dict().items()}

    # ---- rollouts -------------------------------------------------------------------------------
    def sample_prompts(self, step: int, count: int, attempt: int = 0) -> list[tuple[int, Problem]]:
        """This rank's share of the step's prompts, with their index in the whole batch."""
        rng = random.Random(hash((self.tc.seed, step, attempt)) & 0xFFFFFFFF)
        problems = training_problems(self.task, rng, count, self._held_out)
        return list(enumerate(problems))[self.d.rank :: self.d.world]

    @torch.no_grad()
    def make_rollout(self, step: int, keep_samples: bool = False) -> Rollout:
        """One rollout batch; `keep_samples` also keeps its completions as table rows (`Rollout.samples`)."""
        t0 = time.perf_counter()
        with self._decoding():
            groups, all_rewards = self._sample_groups(step)
        rollout_seconds = time.perf_counter() - t0
        rollout = self._pack(groups, all_rewards, rollout_seconds)
        if keep_samples:
            adv = rollout.group_adv.tolist()
            rows = [
                (p, o, r, part) for p, out, rs, parts in groups for o, r, part in zip(out.outputs, rs, parts)
            ]
            rollout.samples = [
                {"prompt": p.prompt, "completion": o.text, **part, "reward": r, "advantage": a}
                for (p, o, r, part), a in zip(rows, adv)
            ]
        return rollout

    def _sample_groups(self, step: int) -> tuple[list[Group], list[float]]:
        """This rank's groups of the step (with dynamic sampling, those whose rewards differ), and every
        sampled reward."""
        cfg, g = self.cfg, self.cfg.group_size
        want = cfg.prompts_per_step // self.d.world
        groups: list[Group] = []
        all_rewards: list[float] = []
        attempts = 0
        while len(groups) < want and attempts < (4 if cfg.dynamic_sampling else 1):
            indexed = self.sample_prompts(step, cfg.prompts_per_step, attempts)
            problems = [p for _, p in indexed]
            # seeded by the prompt's place in the whole batch: the same samples however many ranks share it
            params = [
                SamplingParams(
                    n=g,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    max_tokens=cfg.max_new_tokens,
                    seed=hash((self.tc.seed, step, attempts, i)) & 0xFFFFFFFF,
                )
                for i, _ in indexed
            ]
            outs = self.llm.generate([p.prompt for p in problems], params)
            for p, out in zip(problems, outs):
                scored = [self.rewards(p, o.text) for o in out.outputs]
                rs = [r for r, _ in scored]
                parts = [dict(parts) for _, parts in scored]
                for o in out.outputs:
                    if cfg.overlong_cache:  # a component of its own (weight 1), logged beside the others
                        penalty = overlong_penalty(len(o.token_ids), cfg.max_new_tokens, cfg.overlong_cache)
                        rs[o.index] += penalty
                        parts[o.index]["overlong"] = penalty
                all_rewards += rs
                last = (p, out, rs, parts)
                if not (cfg.dynamic_sampling and max(rs) == min(rs)):
                    groups.append(last)
            attempts += 1
        return groups[:want] or [last], all_rewards  # all groups dropped: one zero-advantage group, no crash

    def _pack(self, groups, all_rewards: list[float], rollout_seconds: float) -> Rollout:
        cfg = self.cfg
        seqs, plens, comps, rewards, accs, fmts, truncated, components = [], [], [], [], [], [], [], []
        for _, out, rs, parts in groups:
            for o, r, part in zip(out.outputs, rs, parts):
                components.append(part)
                seqs.append(out.prompt_token_ids + o.token_ids)
                plens.append(len(out.prompt_token_ids))
                comps.append(len(o.token_ids))
                rewards.append(r)
                accs.append(float(part.get("accuracy", 0.0) >= 1.0))
                fmts.append(part.get("format", 0.0))
                truncated.append(o.finish_reason == "length")
        n, t = len(seqs), max(comps)
        rw = torch.tensor(rewards)
        g = cfg.group_size
        shared = cfg.shared_prompts and cfg.micro_batch_size % g == 0
        if shared:  # whole groups, by packed length: a micro-batch's packed rows differ little in length
            packed = [plens[i] + sum(comps[i : i + g]) for i in range(0, n, g)]
            order = [q * g + j for q in sorted(range(n // g), key=packed.__getitem__) for j in range(g)]
        else:  # rows by length: each micro-batch is then cut to its own longest row, with little padding
            order = sorted(range(n), key=lambda i: len(seqs[i]))
        ids = torch.zeros(n, max(len(s) for s in seqs), dtype=torch.long)
        mask = torch.zeros(n, t, dtype=torch.bool)
        for row, i in enumerate(order):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            if not (cfg.mask_truncated and truncated[i]):
                mask[row, : comps[i]] = True
        # sums over all ranks: the loss is normalised by the whole batch, and `batch` scaling uses its std
        total_rows, total_tokens, r_sum, r_sq = self.d.all_reduce(
            torch.tensor([n, float(mask.sum()), float(rw.sum()), float((rw**2).sum())], dtype=torch.float64)
        ).tolist()
        batch_std = torch.tensor(max(r_sq - r_sum**2 / total_rows, 0.0) / max(total_rows - 1, 1)).sqrt()
        adv = advantages(
            rw, cfg.group_size, cfg.scale_rewards, batch_std=batch_std
        )  # per group: in sampled order
        # over every group sampled: with dynamic sampling, the share it dropped
        zero_std = float((torch.tensor(all_rewards).view(-1, cfg.group_size).std(-1) == 0).float().mean())
        tokens = sum(comps)
        metrics = {
            "reward_mean": float(rw.mean()),
            "reward_std": float(rw.std()),
            "accuracy": sum(accs) / n,
            "format_rate": sum(fmts) / n,
            "zero_std_frac": zero_std,
            "mean_len": tokens / n,
            "max_len": float(max(comps)),
            "truncation_rate": sum(truncated) / n,
            "rollout_seconds": rollout_seconds,
            "rollout_tokens_per_s": tokens / rollout_seconds,
            "reward_errors": float(self.rewards.errors),
            "sampled_reward_mean": sum(all_rewards) / len(all_rewards),
        }
        # each reward function's mean, unweighted: reward_mean is their sum weighted as RewardSet weighs them
        for name in dict.fromkeys(k for part in components for k in part):
            metrics[f"reward/{name}"] = sum(part.get(name, 0.0) for part in components) / n
        device = self.d.device  # where the update runs
        return Rollout(
            ids.to(device),
            torch.tensor([plens[i] for i in order], device=device),
            torch.tensor([len(seqs[i]) for i in order], device=device),
            mask.to(device),
            adv[order].to(device),
            (int(total_rows), int(total_tokens)),
            metrics=metrics,
            group_adv=adv,
            group_size=g if shared else 0,
        )

    # ---- the update ------------------------------------------------------------------------------
    def loss_fn(self, step: int, micro: int) -> tuple[Tensor, dict]:
        cfg = self.cfg
        if micro == 0 and step % cfg.mu == 0:
            keep = self.d.main and self._logs_completions(step)
            self.rollout = self.make_rollout(step // cfg.mu, keep_samples=keep)
            if keep:
                self._log_completions(step + 1, self.rollout.samples)
            if cfg.mu > 1:  # stored old log-probs for the later updates on this batch
                self.rollout.old_logp = self._logprobs(
                    self.policy
                )  # the same weights (synced for the rollout)
            if self.ref is not None:
                self.rollout.ref_logp = self._logprobs(self.ref)
        r = self.rollout
        t0 = time.perf_counter()
        n, size = r.ids.shape[0], cfg.micro_batch_size
        empty = micro * size >= n  # dynamic sampling kept fewer groups: this micro-batch counts for nothing
        rows = slice(n - 1, n) if empty else slice(micro * size, min((micro + 1) * size, n))
        logp, entropy = token_logprobs(self.trainer.wrapped, r, rows, cfg.temperature, with_entropy=True)
        old = r.old_logp[rows] if r.old_logp is not None else logp.detach()
        ref = r.ref_logp[rows] if r.ref_logp is not None else None
        batch = (*r.total, self.tc.grad_accum)
        loss, stats = policy_loss(logp, old, ref, r.adv[rows], r.mask[rows], cfg, batch)
        stats["entropy"] = token_mean(entropy, r.mask[rows], r.total[1], self.tc.grad_accum)
        # both normalised by the whole batch: times the ranks, over which DDP averages the gradients and the
        # loop the stats, they are the whole batch's
        stats = {k: 0.0 if empty else v * self.d.world for k, v in stats.items()}
        loss = loss * 0 if empty else loss * self.d.world
        stats["update_seconds"] = time.perf_counter() - t0
        # rollout metrics are per rollout batch: report them on every micro-batch so averages hold
        return loss, {**r.metrics, **stats}

    def _logs_completions(self, step: int) -> bool:
        """Whether the rollout batch made at (0-based) `step` goes in the completion table: the first, and
        those whose updates include a step that is a multiple of K."""
        k = self.cfg.log_completions_every
        return bool(k) and (step == 0 or any((step + j) % k == 0 for j in range(1, self.cfg.mu + 1)))

    def _log_completions(self, step: int, rows: list[dict]) -> None:
        """Rank 0's share of a rollout batch: appended to completions.jsonl and sent to the trackers."""
        rows = [{"step": step, **r} for r in rows]
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / COMPLETIONS_FILE, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        self.trainer.tracker.log_table("completions", rows, step)

    @torch.no_grad()
    def _logprobs(self, model) -> Tensor:
        """The rollout's log-probs under `model`, in the update's micro-batches (one forward over the whole
        rollout would hold its [rows, length, vocab] logits at once)."""
        r, size = self.rollout, self.cfg.micro_batch_size
        return torch.cat(
            [
                token_logprobs(model, r, slice(i, i + size), self.cfg.temperature)[0]
                for i in range(0, r.ids.shape[0], size)
            ]
        )

    def after_step(self, step: int, record: dict) -> None:
        self.llm.update_weights()  # the optimizer changed the policy the engine holds, in place
        if self.ref is not None and self.cfg.ref_reset_every and (step + 1) % self.cfg.ref_reset_every == 0:
            state = self.model.state_dict()
            self.ref.load_state_dict(state if self.ep is None else self.ep.full_state(state))

    def _sync_policy(self) -> None:
        """Under expert parallelism, gather the trained experts into the rollout copy (every rank calls it):
        the engine holds that copy, so it is told its weights changed."""
        if self.ep is not None:
            self.ep.gather_experts_into(self.policy, self.model)
            self.llm.update_weights()

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """The engine generates from the policy prepared for decoding; the update then runs the model
        prepared for training. When they are one model, preparing switches its kernels, each job's the same
        objects every time, so neither the compiled decode steps nor the compiled update recompile."""
        self._sync_policy()
        was_training = self.model.training
        self.model.eval()
        self.policy.prepare("decode")
        try:
            yield
        finally:
            self.model.train(was_training).prepare("train")

    def evaluate(self, step: int) -> dict:
        t0 = time.perf_counter()
        with self._decoding():
            res = evaluate(self.llm, self.task, self.eval_problems, self.cfg.max_new_tokens, self.cfg.eval_k)
        self.eval_seconds += time.perf_counter() - t0
        return {f"eval_{k}": v for k, v in res.as_dict().items()}

    def train(self, resume: bool = False, progress: bool = True) -> dict:
        completions = self.out / COMPLETIONS_FILE
        if resume and self.trainer.resume():
            ref = {k[len("ref.") :]: v for k, v in self.trainer.resumed_extra.items() if k.startswith("ref.")}
            if ref:
                self.ref.load_state_dict(ref)
            self.llm.update_weights()  # the checkpoint's weights were loaded into the policy in place
            if completions.exists() and self.d.main:  # as metrics.jsonl: rows past the checkpoint are redone
                keep = [
                    x
                    for x in completions.read_text(encoding="utf-8").splitlines()
                    if x.strip() and json.loads(x).get("step", 0) <= self.trainer.step
                ]
                atomic_write_text(completions, "".join(x + "\n" for x in keep))
        elif self.d.main:
            self.trainer.metrics_path.unlink(missing_ok=True)
            completions.unlink(missing_ok=True)
        t0 = time.perf_counter()
        if self.cfg.eval_every and self.trainer.step == 0:  # where the accuracy curve starts: the base
            self.trainer.log({"step": 0, **self.evaluate(0)})
        self.trainer.train(
            self.loss_fn,
            self.after_step,
            self.evaluate if self.cfg.eval_every else None,
            self.cfg.eval_every,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        if self.trainer.interrupted:
            return {"interrupted": True}
        self.trainer.finish()
        # metrics.jsonl: a row per step (resumed runs' earlier steps included), and with eval_every a step-0
        # row holding only the base's evaluation
        rows = [json.loads(x) for x in self.trainer.metrics_path.read_text().splitlines() if x.strip()]
        steps = [r for r in rows if r["step"] > 0]
        evals = [r for r in rows if "eval_greedy" in r]
        if self.d.main:
            self._plots(steps, evals)
        return {
            "seconds": seconds,
            "eval_seconds": self.eval_seconds,
            "evals": evals,  # the held-out evaluations by step, from step 0 (the base) with eval_every
            "steps": self.trainer.step,
            "flops": self._flops(steps),
        }

    def _flops(self, records: list[dict]) -> float:
        """≈ FLOPs spent: generating the rollouts, plus forward+backward over them on each of the mu updates."""
        c, cfg = self.model.config, self.cfg
        tokens = sum(r["mean_len"] for r in records) * cfg.prompts_per_step * cfg.group_size / cfg.mu
        return tokens * (
            c.decode_flops_per_token(cfg.max_new_tokens)
            + cfg.mu * c.train_flops_per_token(cfg.max_new_tokens)
        )

    def _plots(self, train: list[dict], evals: list[dict]) -> None:
        """The R1-Zero picture: accuracy and mean completion length against RL steps, on the rollouts and,
        with eval_every, on the held-out problems (from step 0, the base)."""

        def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
            return [r["step"] for r in records], [r[key] for r in records]

        acc = {"rollouts": series(train, "accuracy")}
        length = {"rollouts": series(train, "mean_len")}
        if evals:
            acc["held-out greedy"] = series(evals, "eval_greedy")
            length["held-out greedy"] = series(evals, "eval_mean_len")
        plot_series(self.out / "accuracy.png", f"GRPO on {self.cfg.task}: accuracy", acc, "accuracy")
        plot_series(self.out / "length.png", "mean completion length", length, "tokens")
