"""Pretraining data: the built-in corpus of worked task examples, user files, packing and batches.

Built-in documents are R1-Zero prompts followed by a worked completion; a fraction carry a step-by-step
scratchpad inside <think>, the rest an empty one, so the base model learns the format and RL has room to
teach it to think. Documents are packed end to end (separated by EOS) into fixed-length rows.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from .tasks import Problem, Task, get_task
from .tokenizer import EOS, render_chat

EVAL_SEED_OFFSET = 1_000_003  # held-out problems come from a disjoint RNG stream
ASK_STEPS = "Show your steps."  # what an `asked` corpus question adds


Document = str | tuple[str, ...]  # a text, or pieces tokenised separately (prompt, completion)


def builtin_documents(
    n: int,
    seed: int,
    tasks: tuple[str, ...] = ("arithmetic", "countdown"),
    scratchpad: float = 0.25,
    exclude: set[str] | None = None,
    asked: float = 0.0,
) -> list[tuple[str, str]]:
    """n worked examples (prompt, completion), cycling over tasks (`name@levels` limits the levels drawn);
    problems whose question is in `exclude` are skipped. An `asked` share of them ask for the steps
    ("What is 37 + 48? Show your steps.") and always show them; of the others, a `scratchpad` share do.
    So the method can be learned from many examples while an unprompted question is mostly answered at
    once, as on the web, where worked solutions come when they are asked for.

    Prompt and completion are tokenised separately, as at generation time, so no BPE merge spans the
    boundary the model will see when it is asked to complete the prompt."""
    rng = random.Random(seed)
    objs = [get_task(t) for t in tasks]
    docs: list[str] = []
    while len(docs) < n:
        task = objs[len(docs) % len(objs)]
        p = task.sample(rng)
        if exclude and p.question in exclude:
            continue
        if asked and rng.random() < asked:
            docs.append((replace(p, question=f"{p.question}? {ASK_STEPS}").prompt, task.solution(p) + EOS))
        else:
            docs.append((p.prompt, task.solution(p, scratchpad=rng.random() < scratchpad) + EOS))
    return docs


def tokenize(tok, docs: list[Document]) -> list[list[int]]:
    """Token ids per document; the pieces of a tuple document are encoded one by one and joined."""
    pieces = [d if isinstance(d, tuple) else (d,) for d in docs]
    flat = tok.encode_batch([x for ps in pieces for x in ps], add_special_tokens=False)
    out, i = [], 0
    for ps in pieces:
        out.append([t for e in flat[i : i + len(ps)] for t in e.ids])
        i += len(ps)
    return out


def held_out_problems(task: str, n: int, seed: int, template: str = "chat") -> list[Problem]:
    """The evaluation problems of a task: training stages run with the same seed keep their questions out
    (whatever the template). Of a task that knows its size (a user's JSONL, arithmetic) a fifth at most
    (one at least) is held out, each question once: drawn with replacement, 100 draws from 60 JSONL
    records would hold out 45 and leave 15, and from `addition@1`'s 100 questions 62."""
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    t = get_task(task, template)
    if t.size is None:
        return [t.sample(rng) for _ in range(n)]
    n, distinct = min(n, max(t.size // 5, 1)), {}
    for _ in range(100 * n):
        p = t.sample(rng)
        distinct.setdefault(p.question, p)
        if len(distinct) == n:
            break
    return list(distinct.values())


def training_problems(task: Task, rng: random.Random, n: int, held_out: set[str]) -> list[Problem]:
    """n problems from the task's generator, none of whose questions is held out for evaluation."""
    out: list[Problem] = []
    for _ in range(100 * n):
        p = task.sample(rng)
        if p.question not in held_out:
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(
        f"task: {task.name} yields too few problems outside the {len(held_out)} held out for evaluation"
    )


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents from a local .txt (blank-line separated), .jsonl (`text` or chat `messages`) or .parquet."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        elif suffix == ".jsonl":
            docs = [
                _record_text(_json_line(line, path, i + 1), path, i + 1)
                for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
                if line.strip()
            ]
        elif suffix == ".parquet":
            try:
                import datasets
            except ImportError:
                raise ValueError(f"{path}: reading .parquet needs the `datasets` package") from None
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
            docs = [_record_text(r, path, i + 1) for i, r in enumerate(ds)]
        else:
            raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .txt, .jsonl or .parquet)")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{path}: no documents (the file is empty)")
    return [d + EOS for d in docs]


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON on line {number} ({e.msg})") from None


def _record_text(rec: dict, path: Path, line: int) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        for i, m in enumerate(rec["messages"]):  # a Jinja template renders what is missing as nothing
            if not (isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))):
                raise ValueError(f"{path}:{line}: messages[{i}] needs a `role` and a `content` string")
        try:
            return render_chat(rec["messages"], add_generation_prompt=False)
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
    raise ValueError(f"{path}:{line}: a record needs a `text` string or a `messages` list")


def pack(token_lists: list[list[int]], seq_len: int) -> Tensor:
    """Concatenate documents and cut into rows of seq_len + 1 tokens (inputs and shifted targets)."""
    flat = [t for ids in token_lists for t in ids]
    rows = len(flat) // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"data: {len(flat)} tokens cannot fill one sequence of {seq_len + 1}")
    return torch.tensor(flat[: rows * (seq_len + 1)], dtype=torch.long).view(rows, seq_len + 1)


def document_ids(rows: Tensor, eos_id: int) -> Tensor:
    """Which packed document each token belongs to, for `segments=`: a new one starts after every EOS,
    which ends every document (only chat-rendered ones start with BOS)."""
    after_eos = torch.zeros_like(rows)
    after_eos[:, 1:] = rows[:, :-1] == eos_id
    return after_eos.cumsum(-1)


@dataclass
class Batches:
    """Deterministic batches: the rows of step k depend only on (seed, k), so resuming needs only k."""

    rows: Tensor  # [N, seq_len + 1]
    batch_size: int
    seed: int

    def get(self, step: int, rank: int = 0, world: int = 1) -> Tensor:
        """The global batch of `step`, this rank's share of it (rows rank, rank + world, ...)."""
        n = self.rows.shape[0]
        per_epoch = max(n // self.batch_size, 1)
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        idx = perm[(k * self.batch_size + torch.arange(self.batch_size)) % n]
        return self.rows[idx[rank::world]]
