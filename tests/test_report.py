"""--report-to (TensorBoard read back from its event files); GRPO's per-reward metrics and completions."""

import json
from collections import defaultdict

import pytest
import torch
from conftest import pretrain_tiny

from nanoseek.cli import main as cli_main
from nanoseek.train import report
from nanoseek.train.report import Tracker, parse_report_to

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(path):
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_parse_report_to(monkeypatch):
    assert parse_report_to("none") == parse_report_to(None) == parse_report_to("") == ()
    assert parse_report_to("tensorboard") == ("tensorboard",)
    assert parse_report_to(" wandb , tensorboard,wandb") == ("wandb", "tensorboard")
    monkeypatch.setattr(report, "_installed", lambda name: name == "tensorboard")
    assert parse_report_to("all") == ("tensorboard",)  # every installed tracker, as transformers does
    with pytest.raises(ValueError, match="report_to: unknown tracker.*'mlflow'"):
        parse_report_to("tensorboard,mlflow")


def test_missing_tracker_packages_fail_before_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(report, "_installed", lambda name: False)
    for name in ("tensorboard", "wandb"):
        with pytest.raises(ValueError, match=rf"--report-to {name}: .*pip install {name}"):
            Tracker(name, tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main(["pretrain", "--report-to", "wandb", "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "pip install wandb" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["grpo", "--init", "x", "--out", str(tmp_path / "r"), "--report-to", "nope"])
    assert "unknown tracker" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_resumed_run_replaces_the_tensorboard_steps_after_its_checkpoint(tmp_path):
    t = Tracker("tensorboard", tmp_path)
    for step in (1, 2, 3):
        t.log({"step": step, "loss": float(step), "note": "text is not a scalar", "flag": True})
    t.close()
    t = Tracker("tensorboard", tmp_path)  # resumed from the checkpoint at step 1
    for step in (2, 3):
        t.log({"step": step, "loss": 10.0 * step})
    t.close()
    acc = read_events(tmp_path / report.TENSORBOARD_DIR)
    assert acc.Tags()["scalars"] == ["loss"]
    assert scalars(acc, "loss") == {1: 1.0, 2: 20.0, 3: 30.0}


def test_pretrain_sends_every_metric_to_tensorboard(tmp_path):
    out = pretrain_tiny(tmp_path / "base", eval_every=2, val_batches=1, train={"report_to": "tensorboard"})
    records = metrics(out)
    acc = read_events(out / "tensorboard")
    for key in ("loss", "mtp_loss", "lr", "grad_norm", "val_loss", "load_max_mean"):
        want = {r["step"]: r[key] for r in records if key in r}
        got = scalars(acc, key)
        assert got.keys() == want.keys(), key
        for step, v in want.items():
            assert got[step] == pytest.approx(v, rel=1e-6), (key, step)  # stored as float32
    assert [r["step"] for r in records] == [1, 2, 3]


def test_grpo_logs_each_reward_and_a_completion_table(tiny_base, tmp_path):
    from tensorboard.util import tensor_util

    from nanoseek.train.grpo import GRPOConfig, GRPOTrainer, advantages
    from nanoseek.train.loop import TrainConfig

    cfg = GRPOConfig(
        task="arithmetic",
        group_size=4,
        prompts_per_step=2,
        max_new_tokens=8,
        overlong_cache=4,
        format_weight=0.1,
        consistency_weight=0.05,
        log_completions_every=2,
        eval_problems=2,
    )
    out = tmp_path / "rl"
    tc = TrainConfig(steps=3, lr=1e-3, warmup=1, report_to="tensorboard")
    trainer = GRPOTrainer(tiny_base, cfg, tc, out)
    trainer.train(progress=False)
    weights = {**trainer.rewards.weights, "overlong": 1.0}
    records = metrics(out)
    for r in records:
        parts = {k.removeprefix("reward/"): v for k, v in r.items() if k.startswith("reward/")}
        assert set(parts) == {"accuracy", "format", "consistency", "overlong"}
        assert r["reward_mean"] == pytest.approx(sum(weights[k] * v for k, v in parts.items()), abs=1e-6)
        assert r["reward/format"] == pytest.approx(r["format_rate"], abs=1e-9)

    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    # the first rollout batch and those whose update is a multiple of K = 2: steps 1 and 2, all 8 samples each
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8
    by_prompt = defaultdict(list)
    for r in rows:
        assert {
            "prompt",
            "completion",
            "accuracy",
            "format",
            "consistency",
            "overlong",
            "reward",
            "advantage",
        } <= set(r)
        assert r["reward"] == pytest.approx(sum(weights[k] * r[k] for k in weights), abs=1e-9)
        by_prompt[(r["step"], r["prompt"])].append(r)
    for group in by_prompt.values():
        assert len(group) == cfg.group_size
        want = advantages(torch.tensor([r["reward"] for r in group]), cfg.group_size, cfg.scale_rewards)
        assert [r["advantage"] for r in group] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-5)
    for step in (1, 2):
        step_rows = [r for r in rows if r["step"] == step]
        reward_mean = next(r["reward_mean"] for r in records if r["step"] == step)
        assert sum(r["reward"] for r in step_rows) / len(step_rows) == pytest.approx(reward_mean, abs=1e-6)

    acc = read_events(out / "tensorboard")
    for key in ("reward/accuracy", "reward/format", "reward/overlong", "reward_mean", "kl", "grad_norm"):
        assert scalars(acc, key) == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-6), key
    tables = acc.Tensors("completions/text_summary")
    assert [t.step for t in tables] == [1, 2]
    text = tensor_util.make_ndarray(tables[0].tensor_proto).item().decode()
    assert text.startswith("| step | prompt | completion | accuracy |") and text.count("\n") == 1 + 8
