"""SFT on chat JSONL, rejection sampling, and distillation into a dense student."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import pretrain_tiny

from nanoseek import LLM, SamplingParams, load_model
from nanoseek.tasks import get_task
from nanoseek.tokenizer import EOS, render_chat
from nanoseek.train.distill import SampleConfig, check_same_tokenizer, distill_problems, rejection_sample
from nanoseek.train.loop import TrainConfig
from nanoseek.train.sft import SFTConfig, chat_examples, pack_examples, read_conversations, sft


def conversation(a: int, b: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}"},
            {
                "role": "assistant",
                "content": f" <answer> {a + b} </answer>",
                "reasoning_content": f"{a} + {b} = {a + b} ",
            },
        ]
    }


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_bad_lines_are_reported_with_numbers_or_raise_when_strict(tmp_path, capsys):
    f = write(
        tmp_path / "d.jsonl",
        [
            conversation(1, 2),
            "{not json",
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "x"}]},
            conversation(3, 4),
        ],
    )
    assert len(read_conversations(f)) == 2
    err = capsys.readouterr().err
    assert "skipped 3 malformed" in err and "d.jsonl:2: invalid JSON" in err
    assert "d.jsonl:3: no assistant turn" in err and "d.jsonl:4: messages[0].role" in err
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        read_conversations(f, strict=True)


def test_targets_are_exactly_the_assistant_turns(tiny_base):
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_base)
    two_turns = conversation(1, 2)["messages"] + [
        {"role": "user", "content": "And 3 + 4"},
        {"role": "assistant", "content": "7", "reasoning_content": "add"},
    ]
    examples = chat_examples(tok, [two_turns])
    assert len(examples) == 2  # one example per assistant turn
    ids, mask = examples[1]
    target = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert target == "add</think>7" + EOS
    prompt = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert prompt == render_chat(two_turns[:3]) and "1 + 2 = 3" not in prompt  # earlier reasoning dropped
    rows, truncated = pack_examples(examples * 3, seq_len=40, pad_id=2)
    assert rows.shape[1:] == (3, 41) and truncated == 0
    assert int(rows[:, 1].sum()) == 3 * sum(sum(m) for _, m in examples)  # every target kept once
    assert (rows[:, 1][rows[:, 2] == -1] == 0).all()  # padding is never a target
    _, truncated = pack_examples([(list(range(50)), [0] * 10 + [1] * 40)], seq_len=20, pad_id=2)
    assert truncated == 1


def test_sft_learns_the_assistant_turns(tiny_base, tmp_path):
    data = write(tmp_path / "sft.jsonl", [conversation(a, b) for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]])
    summary = sft(
        SFTConfig(
            init=str(tiny_base), data=str(data), seq_len=64, batch_size=4, eval_every=20, eval_problems=0
        ),
        TrainConfig(steps=80, lr=1e-2, warmup=5),
        tmp_path / "sft",
        progress=False,
    )
    records = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.3 * records[0]["loss"] and summary["steps"] == 80
    assert any("val_loss" in r for r in records)
    llm = LLM(tmp_path / "sft")
    out = llm.generate(
        render_chat([{"role": "user", "content": "What is 3 + 4"}]),
        SamplingParams(temperature=0, max_tokens=30),
    )[0]
    assert out.text == "3 + 4 = 7 </think> <answer> 7 </answer>"


class ScriptedTeacher:
    """Stands in for the engine: per problem, a wrong answer, the right one twice (a duplicate), a longer
    right one, and a right one cut off by max_tokens."""

    def __init__(self, task):
        self.task = task

    def generate(self, prompts, params):
        outs = []
        for prompt in prompts:
            answer = self.answers[prompt]
            texts = [
                ("x </think> <answer> -1 </answer>", "stop"),
                (f"ok </think> <answer> {answer} </answer>", "stop"),
                (f"ok </think> <answer> {answer} </answer>", "stop"),
                (f"a longer way </think> <answer> {answer} </answer>", "stop"),
                (f"cut </think> <answer> {answer} </answer>", "length"),
            ]
            outs.append(
                SimpleNamespace(
                    outputs=[
                        SimpleNamespace(text=t, finish_reason=f, token_ids=t.split())
                        for t, f in texts[: params.n]
                    ]
                )
            )
        return outs


def test_rejection_sampling_keeps_distinct_verified_complete_samples():
    cfg = SampleConfig(task="arithmetic", problems=12, n=5, keep=2)
    teacher = ScriptedTeacher(get_task("arithmetic"))
    teacher.answers = {
        p.prompt: p.answer for p in distill_problems(get_task("arithmetic"), "arithmetic", 12, 0)
    }
    records, rates = rejection_sample(teacher, cfg)
    assert len(records) == 24  # two distinct verified samples per problem, shortest first
    first = records[0]["messages"][1]
    assert first["reasoning_content"] == "ok " and first["content"].startswith(" <answer>")
    assert all(r["messages"][1]["reasoning_content"] != "cut " for r in records)  # truncated: never kept
    assert sum(t["samples"] for t in rates.values()) == 60
    assert all(t["accept_rate"] == pytest.approx(3 / 5) for t in rates.values())  # wrong and cut-off rejected


def test_distill_problems_avoid_the_held_out_set():
    from nanoseek.data import held_out_problems

    held = {p.question for p in held_out_problems("arithmetic", 200, 0)}
    assert not held & {p.question for p in distill_problems(get_task("arithmetic"), "arithmetic", 500, 0)}


def test_distill_refuses_a_student_with_another_tokenizer(tiny_base, tmp_path):
    out = pretrain_tiny(tmp_path / "other", steps=1, vocab_size=300, tasks=("countdown",))
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer(tiny_base, out)


def test_distill_from_scratch_into_a_dense_student(tiny_base, tmp_path, monkeypatch):
    import nanoseek.train.distill as distill_mod

    task = get_task("arithmetic")
    teacher = ScriptedTeacher(task)
    teacher.answers = {p.prompt: p.answer for p in distill_problems(task, "arithmetic", 16, 0)}
    teacher.config = load_model(tiny_base).config
    monkeypatch.setattr(distill_mod, "LLM", lambda path, device=None: teacher)
    cfg = distill_mod.DistillConfig(
        teacher=str(tiny_base),
        student_preset="dense-small",
        sample=SampleConfig(problems=16, n=4),
        steps=3,
        batch_size=4,
        seq_len=64,
    )
    summary = distill_mod.distill(cfg, tmp_path / "student")
    student = load_model(tmp_path / "student")
    assert student.config.first_k_dense_replace >= student.config.num_hidden_layers  # all layers dense
    assert student.config.vocab_size == teacher.config.vocab_size
    assert summary["records"] == 16 and (tmp_path / "student" / "distill_data.jsonl").exists()
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
