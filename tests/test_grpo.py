import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ONE_THREAD, cli, random_model, torchrun, weights
from torch._dynamo.testing import CompileCounter

from nanoseek import ModelConfig
from nanoseek.engine.llm import CompletionOutput, RequestOutput
from nanoseek.tasks import get_task
from nanoseek.tasks.rewards import RewardSet, format_reward, overlong_penalty
from nanoseek.train.grpo import (
    GRPOConfig,
    GRPOTrainer,
    advantages,
    policy_loss,
    shared_prompt_rows,
    token_logprobs,
)
from nanoseek.train.loop import Dist


def naive_loss(logp, old, ref, adv, mask, cfg):
    """Float64, per token, straight from REFERENCE §8."""
    n, t = len(logp), len(logp[0])
    per = [[0.0] * t for _ in range(n)]
    for i in range(n):
        for j in range(t):
            r = math.exp(logp[i][j] - old[i][j])
            c = min(max(r, 1 - cfg.epsilon_low), 1 + cfg.epsilon_high)
            obj = min(r * adv[i], c * adv[i])
            d = ref[i][j] - logp[i][j]
            per[i][j] = -(obj - cfg.beta * (math.exp(d) - d - 1))
    if cfg.loss_type == "grpo":
        return sum(sum(per[i][j] for j in range(t) if mask[i][j]) / sum(mask[i]) for i in range(n)) / n
    total = sum(per[i][j] for i in range(n) for j in range(t) if mask[i][j])
    if cfg.loss_type == "dapo":
        return total / sum(map(sum, mask))
    return total / (n * cfg.max_new_tokens)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_policy_loss_against_float64(loss_type):
    g = torch.Generator().manual_seed(0)
    n, t = 6, 5
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.4  # ratios well outside the clip
    ref = logp + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) > 0.3
    mask[:, 0] = True
    cfg = GRPOConfig(loss_type=loss_type, beta=0.04, max_new_tokens=7)
    got, stats = policy_loss(logp, old, ref, adv, mask, cfg)
    want = naive_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), cfg)
    assert got.item() == pytest.approx(want, rel=1e-10)
    m = mask.double()
    kl = (torch.exp(ref - logp) - (ref - logp) - 1) * m
    assert stats["kl"] == pytest.approx(float(kl.sum() / m.sum()), rel=1e-10)
    assert 0 < stats["clip_low_frac"] + stats["clip_high_frac"] < 1
    # in unequal micro-batches (4 + 2 rows), each divided by 2 as gradient accumulation does: the same loss,
    # and stats that average (as the training loop does) to the whole batch's per-token means
    batch = (n, int(mask.sum()), 2)
    parts = [
        policy_loss(logp[r], old[r], ref[r], adv[r], mask[r], cfg, batch) for r in (slice(0, 4), slice(4, 6))
    ]
    assert sum(loss for loss, _ in parts).item() / 2 == pytest.approx(want, rel=1e-10)
    for k, v in stats.items():
        assert sum(s[k] for _, s in parts) / 2 == pytest.approx(v, rel=1e-10), k


def test_gradient_is_zero_when_all_rewards_equal():
    adv = advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4, "group")
    assert torch.equal(adv, torch.zeros(4))
    logp = torch.zeros(4, 3, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), None, adv, torch.ones(4, 3, dtype=torch.bool), GRPOConfig())
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(4, 3))


def test_rollout_rows_sorted_by_length_keep_their_advantages_and_logprobs():
    """Rows are reordered by length so each micro-batch is cut to its own longest row; every row keeps its
    group's advantage, and the cut changes no log-prob."""
    cfg = GRPOConfig(
        task="addition@2", group_size=2, prompts_per_step=2, mask_truncated=False, shared_prompts=False
    )

    def group(prompt, completions, rewards):
        outs = [CompletionOutput(i, c, "", "stop") for i, c in enumerate(completions)]
        return None, RequestOutput("r", prompt, outs, 0), rewards, [{}, {}]

    groups = [
        group([1, 2, 3], [[4, 5, 6, 7], [8]], [1.0, 0.0]),
        group([9, 9], [[5, 5], [6, 6, 6]], [0.0, 1.0]),
    ]
    r = GRPOTrainer._pack(
        SimpleNamespace(cfg=cfg, rewards=SimpleNamespace(errors=0), d=Dist()),
        groups,
        [1.0, 0.0, 0.0, 1.0],
        1.0,
    )
    # lengths 7, 4, 4, 5 -> rows ordered 4 (reward 0), 4 (reward 0), 5 (reward 1), 7 (reward 1)
    assert r.lens.tolist() == [4, 4, 5, 7] and r.prompt_lens.tolist() == [3, 2, 2, 3]
    assert r.ids[0, :4].tolist() == [1, 2, 3, 8] and r.ids[3].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert r.mask.sum(1).tolist() == [1, 2, 3, 4]
    assert (r.adv > 0).tolist() == [False, False, True, True]
    model = random_model(ModelConfig.preset("tiny"))
    with torch.no_grad():
        whole, _ = token_logprobs(model, r, slice(None), 1.0)
        cut, _ = token_logprobs(model, r, slice(0, 2), 1.0)  # rows of length 4: a width of 4, not 7
    torch.testing.assert_close(cut[r.mask[:2]], whole[:2][r.mask[:2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("job", ["reference", "train"])
def test_shared_prompts_keep_every_logprob_and_gradient(job):
    """Each group's prompt computed once, the groups packed into one row: every completion token's
    log-prob, and the gradients, as when each completion carries its prompt, with the reference's
    attention over the whole row and with training's over the groups' padded layout. Groups of other
    prompt and completion lengths, two groups a micro-batch; a micro-batch that is not whole groups
    (dynamic sampling's empty one) falls back to a row each."""

    def group(prompt, completions):
        outs = [CompletionOutput(i, c, "", "stop") for i, c in enumerate(completions)]
        return None, RequestOutput("r", prompt, outs, 0), [1.0, 0.0, 0.5], [{}, {}, {}]

    groups = [group([1, 2, 3], [[4, 5, 6, 7], [8], [9, 9]]), group([9, 9], [[5, 5], [6, 6, 6], [7, 7, 5, 3]])]
    model = random_model(ModelConfig.preset("tiny")).train().prepare(job)
    per_token, grads = [], []
    for shared in (True, False):
        cfg = GRPOConfig(
            task="addition@2",
            group_size=3,
            prompts_per_step=2,
            micro_batch_size=6,
            mask_truncated=False,
            shared_prompts=shared,
        )
        r = GRPOTrainer._pack(
            SimpleNamespace(cfg=cfg, rewards=SimpleNamespace(errors=0), d=Dist()), groups, [0.0] * 6, 1.0
        )
        assert r.group_size == (3 if shared else 0)
        if shared:  # the prompt once, then each completion less its last token (which predicts nothing)
            assert shared_prompt_rows(r, slice(0, 6), 3)[0].shape == (1, 3 + 7 - 3 + 2 + 9 - 3)
        model.zero_grad()
        logp, entropy = token_logprobs(model, r, slice(0, 6), 1.0, with_entropy=True)
        assert logp.requires_grad and not entropy.requires_grad  # the entropy is a statistic, not a loss
        (logp * r.mask).sum().backward()
        # rows in each layout's own order: keyed by their ids
        per_token.append(
            {
                tuple(r.ids[i, : r.lens[i]].tolist()): (logp[i][r.mask[i]], entropy[i][r.mask[i]])
                for i in range(6)
            }
        )
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if shared:  # one row alone is not a whole group: it carries its prompt, with the same log-probs
            one, _ = token_logprobs(model, r, slice(5, 6), 1.0)
            torch.testing.assert_close(one[0][r.mask[5]], logp[5][r.mask[5]], rtol=1e-5, atol=1e-6)
    assert per_token[0].keys() == per_token[1].keys()
    for key, (logp, entropy) in per_token[0].items():
        torch.testing.assert_close(logp, per_token[1][key][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entropy, per_token[1][key][1], rtol=1e-5, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_update_compiles_once_more_for_every_later_length():
    """Micro-batches of other lengths, at other offsets into the rollout, reuse the update's second
    (dynamic) graph: compiling again for each would cost its compile time on every new length."""
    cfg = GRPOConfig(task="addition@2", group_size=2, prompts_per_step=4, mask_truncated=False)

    def group(prompt, completions):
        outs = [CompletionOutput(i, c, "", "stop") for i, c in enumerate(completions)]
        return None, RequestOutput("r", prompt, outs, 0), [1.0, 0.0], [{}, {}]

    # a group a row (shared prompts, each completion less its last token): 7, 19, 84 and 141 tokens wide, of
    # each remainder but 2 modulo the blocked attention's 4 blocks
    groups = [group([1, 2], [[3] * n, [4] * (n + k)]) for n, k in ((3, 1), (9, 1), (40, 4), (70, 1))]
    r = GRPOTrainer._pack(
        SimpleNamespace(cfg=cfg, rewards=SimpleNamespace(errors=0), d=Dist()), groups, [1.0, 0.0] * 4, 1.0
    )
    model = random_model(ModelConfig.preset("tiny")).prepare("train", compiled=True)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        token_logprobs(compiled, r, rows, 1.0)[0].sum().backward()
    assert counter.frame_count == 2


def test_advantage_scalings():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    a = advantages(r, 3, "none")
    assert torch.allclose(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    assert torch.allclose(advantages(r, 3, "group"), a / (r.view(2, 3).std(-1).repeat_interleave(3) + 1e-4))
    assert torch.allclose(advantages(r, 3, "batch"), a / (r.std() + 1e-4))


def test_rewards_survive_broken_reward_functions():
    task = get_task("arithmetic")
    p = task.sample(__import__("random").Random(0))
    good = f" ok </think> <answer> {p.answer} </answer>"
    rs = RewardSet(
        task,
        {"accuracy": 1.0, "format": 0.1, "boom": 1.0, "nan": 1.0, "none": 1.0},
        extra={"boom": lambda p, c: 1 / 0, "nan": lambda p, c: float("nan"), "none": lambda p, c: None},
    )
    total, parts = rs(p, good)
    assert total == pytest.approx(1.1) and parts["boom"] == 0 and rs.errors == 3
    assert format_reward(p, good) == 1.0
    assert format_reward(p, " a </think> <answer> 1 </answer> <answer> 2 </answer>") == 0.0
    assert format_reward(p, " a </think> <answer> </answer>") == 0.0


def test_overlong_penalty():
    assert overlong_penalty(10, 20, 5) == 0 and overlong_penalty(15, 20, 5) == 0
    assert overlong_penalty(18, 20, 5) == pytest.approx(-0.6) and overlong_penalty(30, 20, 5) == -1


@pytest.mark.parametrize(
    "changes,msg",
    [
        ({"group_size": 1}, "group_size"),
        ({"task": "chess"}, "unknown task"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"epsilon_low": 1.0}, "epsilon_low"),
        ({"overlong_cache": 64}, "overlong_cache"),
        ({"beta": -0.1}, "beta"),
    ],
)
def test_config_errors_before_training(changes, msg):
    with pytest.raises(ValueError, match=msg):
        GRPOConfig(**changes).validate(world=1)
    with pytest.raises(ValueError, match="prompts_per_step"):
        GRPOConfig(prompts_per_step=3).validate(world=2)


def test_grpo_end_to_end_updates_the_live_policy(tiny_base, tmp_path):
    import json

    from nanoseek import load_model
    from nanoseek.train.grpo import GRPOTrainer
    from nanoseek.train.loop import TrainConfig

    cfg = GRPOConfig(
        task="arithmetic",
        group_size=4,
        prompts_per_step=4,
        max_new_tokens=8,
        eval_every=2,
        eval_problems=4,
        eval_k=2,
        beta=0.01,
        mu=2,
        micro_batch_size=10,
    )
    trainer = GRPOTrainer(tiny_base, cfg, TrainConfig(steps=4, lr=1e-3, warmup=1), tmp_path / "rl")
    assert trainer.llm.model is trainer.model  # the engine holds the policy itself, not a copy
    trainer.train(progress=False)
    records = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # step 0: the base, evaluated before any update
    assert set(records[0]) == {"step", "eval_greedy", "eval_mean_len", "eval_pass@1", "eval_cons@k"}
    records = records[1:]
    for key in [
        "step",
        "reward_mean",
        "accuracy",
        "mean_len",
        "step_seconds",
        "rollout_seconds",
        "kl",
        "clip_low_frac",
        "entropy",
        "zero_std_frac",
        "truncation_rate",
        "grad_norm",
        "format_rate",
    ]:
        assert key in records[0], key
    assert "eval_greedy" in records[1] and "eval_pass@1" in records[1]
    before, after = load_model(tiny_base), load_model(tmp_path / "rl")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)
    assert (tmp_path / "rl" / "accuracy.png").exists() and (tmp_path / "rl" / "tokenizer.json").exists()


@pytest.mark.parametrize("mu,beta,ref_reset_every", [(1, 0.0, 0), (2, 0.05, 2)])
def test_grpo_resume_continues_exactly(tiny_base, tmp_path, mu, beta, ref_reset_every):
    """The MTP layers never train under GRPO (no optimizer state): resuming must still work, and match.
    With mu = 2 checkpoints fall between rollout batches, and a reference reset since the start is restored."""
    import json

    from safetensors.torch import load_file

    from nanoseek.train.grpo import GRPOTrainer
    from nanoseek.train.loop import TrainConfig

    cfg = GRPOConfig(
        task="arithmetic",
        group_size=4,
        prompts_per_step=4,
        max_new_tokens=8,
        micro_batch_size=16,
        mu=mu,
        beta=beta,
        ref_reset_every=ref_reset_every,
    )

    def run(out, steps, resume=False):
        tc = TrainConfig(steps=steps, lr=1e-3, warmup=1, min_lr_ratio=1.0, save_every=mu)
        GRPOTrainer(tiny_base, cfg, tc, out).train(resume=resume, progress=False)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    with pytest.raises(ValueError, match="save_every"):
        GRPOTrainer(tiny_base, GRPOConfig(task="arithmetic", mu=2), TrainConfig(save_every=3), tmp_path / "x")
    straight = run(tmp_path / "a", 3 * mu)
    run(tmp_path / "b", 2 * mu)  # leaves the checkpoint of step mu
    resumed = run(tmp_path / "b", 3 * mu, resume=True)
    assert [r["step"] for r in resumed] == list(range(1, 3 * mu + 1))
    if beta:
        assert max(r["kl"] for r in straight[mu:]) > 0  # the reference differs from the policy it is reset to
    for key in ("reward_mean", "mean_len", "kl", "entropy", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([r[key] for r in resumed]), torch.tensor([r[key] for r in straight])
        )
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], msg=k)


@pytest.mark.parametrize("template", ["chat", "r1zero"])
def test_grpo_never_trains_on_its_held_out_evaluation_problems(tiny_base, tmp_path, template):
    """The evaluation set is the one pretraining kept out of its corpus (same seed, same questions whatever
    the template), in the template trained on; rollouts avoid it."""
    from nanoseek.data import held_out_problems
    from nanoseek.train.loop import TrainConfig

    cfg = GRPOConfig(task="arithmetic@1", eval_problems=100, template=template)
    trainer = GRPOTrainer(tiny_base, cfg, TrainConfig(seed=3), tmp_path / "rl")
    held = [p.question for p in held_out_problems("arithmetic@1", 100, 3)]  # pretraining's (chat) set
    assert [p.question for p in trainer.eval_problems] == held
    assert {p.template for p in trainer.eval_problems} == {template}
    drawn = {p.question for step in range(5) for _, p in trainer.sample_prompts(step, 64)}
    assert len(drawn) > 100 and not drawn & set(held)  # one-digit arithmetic: a few hundred questions


def test_grpo_two_gloo_processes_match_one(tiny_base, tmp_path):
    """Each rank rolls out its share of the prompts (seeded by their place in the whole batch) and the loss is
    normalised by the whole batch, so two processes take the steps one would."""
    import json

    one, two = tmp_path / "one", tmp_path / "two"
    args = [
        "grpo",
        "--init",
        str(tiny_base),
        "--task",
        "arithmetic",
        "--steps",
        "2",
        "--group-size",
        "4",
        "--prompts-per-step",
        "4",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-3",
        "--eval-every",
        "0",
        "--scale-rewards",
        "batch",
        "--beta",
        "0.01",
    ]
    assert cli(*args, "--out", str(one), env=ONE_THREAD).returncode == 0
    torchrun(*args, "--out", str(two))
    records = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in records[1]] == [1, 2]
    for key in ("reward_mean", "accuracy", "mean_len"):  # averaged over the ranks' equal shares
        assert [r[key] for r in records[1]] == pytest.approx([r[key] for r in records[0]], rel=1e-6), key
    # a per-token mean of the whole batch, however it is split (KL and clip fractions go the same way)
    assert [r["entropy"] for r in records[1]] == pytest.approx([r["entropy"] for r in records[0]], rel=1e-4)
    assert records[1][0]["grad_norm"] == pytest.approx(records[0][0]["grad_norm"], rel=1e-4)
    wa, wb = weights(one), weights(two)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_grpo_cli_rejects_bad_flags_before_training(tiny_base, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "grpo",
            "--init",
            str(tiny_base),
            "--task",
            "nope",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unknown task" in r.stderr and not (tmp_path / "x").exists()


def test_demo_writes_report_and_summary(tmp_path):
    """`nanoseek demo` end to end with a few steps of each stage: the files and fields users rely on."""
    import json

    from nanoseek.demo import DemoConfig, run_demo

    summary = run_demo(
        DemoConfig(
            out=str(tmp_path),
            pretrain_steps=3,
            grpo_steps=2,
            eval_problems=4,
            eval_k=2,
            max_new_tokens=8,
            num_docs=2000,
        )
    )
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary)) and on_disk["task"] == "addition@2"
    for row in ("base", "rl", "sft_control"):
        assert {"greedy", "pass@1", "mean_len"} <= set(on_disk[row]) and 0 <= on_disk[row]["greedy"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert (
        "| base (pretrained) |" in report and f"nanoseek serve {tmp_path / 'rl'}" in report
    )  # this run's model
    # the R1-Zero picture: one held-out problem sampled before and after, two samples each (eval_k)
    section = report.split("## The same held-out problem, sampled")[1]
    assert section.count("before:") == 1 and section.count("after:") == 1 and section.count("\n- `") == 4
    for f in ("rl/accuracy.png", "rl/length.png", "samples.jsonl", "rl/model.safetensors"):
        assert (tmp_path / f).exists(), f
    # the curve starts at the base (step 0, its greedy accuracy as evaluated before GRPO) and ends at the last step
    curve = on_disk["curve"]
    assert [c["step"] for c in curve] == [0, 1, 2]
    assert curve[0]["greedy"] == on_disk["base"]["greedy"] and curve[-1]["greedy"] == on_disk["rl"]["greedy"]
    assert "| RL step | greedy | mean tokens |" in report


def test_demo_completion_limit_leaves_room_for_the_longest_worked_solution(tiny_base):
    from nanoseek.data import held_out_problems
    from nanoseek.demo import completion_limit
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_base)
    limits = {}
    for task in ("addition@2", "multiplication@4"):
        problems = held_out_problems(task, 20, 0)
        longest = max(len(tok.encode(get_task(task).solution(p)).ids) for p in problems)
        limits[task] = completion_limit(task, problems, tiny_base)
        assert 1.5 * longest <= limits[task] < 1.5 * longest + 16 and limits[task] % 16 == 0
    assert limits["multiplication@4"] > limits["addition@2"]  # four carry steps against two


def test_evaluate_greedy_pass1_and_consensus_against_hand_counts():
    """Two problems, k = 3: pass@1 is the mean solved share of the samples, cons@k grades the majority answer."""
    import random

    from nanoseek.eval import evaluate

    task = get_task("arithmetic@1")
    p, q = task.sample(random.Random(0)), task.sample(random.Random(1))

    def out(*completions):
        outs = [CompletionOutput(i, [0] * (i + 1), c, "stop") for i, c in enumerate(completions)]
        return RequestOutput("r", [], outs, 0)

    right = lambda x: x.completion("", str(x.answer))  # noqa: E731
    wrong = lambda x, d=1: x.completion("", str(x.answer + d))  # noqa: E731
    canned = {
        0: [out(right(p)), out(wrong(q))],  # greedy: 1 of 2
        3: [out(right(p), wrong(p), right(p)), out(wrong(q), wrong(q), right(q))],
    }
    llm = SimpleNamespace(generate=lambda prompts, sp: canned[sp.n if sp.temperature else 0])
    res = evaluate(llm, task, [p, q], k=3)
    assert res.greedy == 0.5 and res.mean_len == 1.0
    assert res.pass1 == pytest.approx((2 / 3 + 1 / 3) / 2) and res.cons == 0.5  # q's majority is wrong
    assert [s["mode"] for s in res.samples].count("sample") == 6


def test_eval_cli_with_the_r1zero_template(tiny_base, tmp_path):
    import json

    from nanoseek.data import held_out_problems

    r = cli(
        "eval",
        str(tiny_base),
        "--task",
        "arithmetic@1",
        "--n",
        "3",
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--template",
        "r1zero",
        "--out",
        str(tmp_path / "s.jsonl"),
        env=ONE_THREAD,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "arithmetic@1: greedy" in r.stdout and "pass@1" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 3 * 2
    assert [x["prompt"] for x in rows[:3]] == [p.question for p in held_out_problems("arithmetic@1", 3, 0)]


def test_dynamic_sampling_drops_groups_with_equal_rewards_and_refills(tiny_base, tmp_path):
    """Groups whose rewards are all equal carry no signal: they are dropped and more prompts are drawn until
    the step has its prompts; zero_std_frac reports the share of sampled groups that were dropped."""
    from nanoseek.train.loop import TrainConfig

    class Rewards:  # even answers: every sample scores 0; odd answers: all samples score differently
        errors, calls, answers = 0, 0, []

        def __call__(self, problem, text):
            self.calls += 1
            if self.calls % 4 == 1:
                self.answers.append(problem.answer)
            r = 0.0 if problem.answer % 2 == 0 else self.calls % 97 / 97
            return r, {"accuracy": r}

    rewards = Rewards()
    cfg = GRPOConfig(
        task="arithmetic", group_size=4, prompts_per_step=8, max_new_tokens=4, dynamic_sampling=True
    )
    r = GRPOTrainer(tiny_base, cfg, TrainConfig(steps=1), tmp_path / "rl", rewards=rewards).make_rollout(0)
    assert r.ids.shape[0] == 8 * 4 and bool((r.adv != 0).all())  # refilled with groups that have a signal
    assert len(rewards.answers) > 8  # more than one draw was needed
    dropped = sum(a % 2 == 0 for a in rewards.answers) / len(rewards.answers)
    assert 0 < r.metrics["zero_std_frac"] == pytest.approx(dropped)


def test_truncation_masking_overlong_penalty_and_reward_errors_in_the_trainer(tiny_base, tmp_path):
    """With 4 new tokens the random tiny model is cut off: mask_truncated leaves those rows out of the loss,
    the overlong penalty is each row's reward, and a reward function that raises is counted, not fatal."""
    from nanoseek.train.loop import TrainConfig

    def boom(problem, text):
        raise RuntimeError("a user's reward function failing")

    def rollout(**kw):
        cfg = GRPOConfig(task="arithmetic", group_size=4, prompts_per_step=4, max_new_tokens=4, **kw)
        rewards = RewardSet(get_task("arithmetic"), {"accuracy": 0.0, "format": 0.0}, extra={"boom": boom})
        return GRPOTrainer(
            tiny_base, cfg, TrainConfig(), tmp_path / str(len(kw)), rewards=rewards
        ).make_rollout(0)

    plain, masked = rollout(), rollout(mask_truncated=True, overlong_cache=2)
    assert (
        plain.metrics["reward_errors"] == 16 and plain.metrics["reward_mean"] == 0.0
    )  # one error per completion
    comps = (masked.lens - masked.prompt_lens).tolist()
    assert masked.metrics["reward_mean"] == pytest.approx(sum(overlong_penalty(c, 4, 2) for c in comps) / 16)
    assert plain.mask.sum(1).tolist() == (plain.lens - plain.prompt_lens).tolist()  # every token counts
    assert masked.metrics["truncation_rate"] > 0.5
    assert int(masked.mask.sum()) < int(
        plain.mask.sum()
    )  # same samples (same seeds), the cut-off rows masked
    assert all(row.sum() in (0, c) for row, c in zip(masked.mask, comps))  # whole rows, in or out
