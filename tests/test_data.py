import json

import pytest
import torch

from nanoseek.data import (
    ASK_STEPS,
    Batches,
    builtin_documents,
    document_ids,
    held_out_problems,
    pack,
    read_documents,
)


def test_builtin_corpus_excludes_held_out_problems():
    held = held_out_problems("arithmetic", 300, seed=0)
    docs = builtin_documents(3000, seed=0, tasks=("arithmetic",), exclude={p.question for p in held})
    assert not {prompt for prompt, _ in docs} & {p.prompt for p in held}
    assert sum("," in completion for _, completion in docs) > 300  # some carry a scratchpad


def test_asked_examples_request_the_steps_and_always_show_them():
    """An `asked` share of the corpus asks for the steps and shows them; the other questions are the task's
    own, of which a `scratchpad` share think. Held-out questions appear in neither."""
    held = {p.question for p in held_out_problems("addition@2", 100, seed=0)}
    docs = builtin_documents(4000, seed=0, tasks=("addition@2",), scratchpad=0.2, exclude=held, asked=0.4)
    thinks = [c.split("</think>")[0].strip() != "" for _, c in docs]
    asked = [ASK_STEPS in prompt for prompt, _ in docs]
    assert 0.35 < sum(asked) / len(docs) < 0.45 and all(t for t, a in zip(thinks, asked) if a)
    plain = [t for t, a in zip(thinks, asked) if not a]
    assert 0.15 < sum(plain) / len(plain) < 0.25
    questions = {prompt.split("<｜User｜>")[1].split("<｜Assistant｜>")[0] for prompt, _ in docs}
    assert not {q.removesuffix(f"? {ASK_STEPS}") for q in questions} & held


def test_pack_and_deterministic_sharded_batches():
    rows = pack([list(range(i, i + 7)) for i in range(40)], seq_len=9)
    assert rows.shape == (28, 10)
    b = Batches(rows, batch_size=4, seed=3)
    assert torch.equal(b.get(5), Batches(rows, 4, 3).get(5))
    shards = [b.get(5, r, 2) for r in range(2)]
    assert sorted(map(tuple, torch.cat(shards).tolist())) == sorted(map(tuple, b.get(5).tolist()))
    with pytest.raises(ValueError, match="cannot fill"):
        pack([[1, 2]], seq_len=9)


def test_documents_end_at_eos_whether_or_not_they_start_with_bos():
    bos, eos = 0, 1
    rows = torch.tensor([[5, 6, eos, 7, eos, bos, 8, 9, eos, 4]])  # plain text, plain text, chat, a cut one
    assert document_ids(rows, eos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]]


def test_read_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert len(read_documents(tmp_path / "a.txt")) == 2
    lines = [
        {"text": "hello"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    docs = read_documents(tmp_path / "b.jsonl")
    assert docs[0].startswith("hello") and "<｜User｜>q<｜Assistant｜>a" in docs[1]


def test_parquet_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert [d[:3] for d in read_documents(tmp_path / "c.parquet")] == ["one", "two"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("e.txt", "", "empty"),
        ("x.csv", "a", "unsupported"),
        ("bad.jsonl", '{"text": "a"}\n{oops', "line 2"),
        ("nofield.jsonl", '{"title": 1}', "needs a `text`"),
    ],
)
def test_bad_data_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        read_documents(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_documents(tmp_path / "missing.txt")
