"""Supervised fine-tuning on chat JSONL: R1's cold start, and the second half of distillation.

Each line is `{"messages": [{"role", "content", "reasoning_content"?}, ...]}`. Every assistant turn becomes
one example: the conversation before it through the chat template (earlier answers without their
reasoning, as at inference), then `reasoning</think>answer<eos>` as the target. Only target tokens carry
loss; examples are packed into rows without attending across each other. Training is the pretraining loop
(`train_lm`): same logging, checkpoints, resume and torchrun behaviour.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig, option
from ..hub import resolve_checkpoint
from ..tokenizer import END_THINK, EOS, PAD, load_tokenizer, render_chat
from .expert_parallel import check_expert_parallel
from .loop import TrainConfig, setup_distributed
from .pretrain import PretrainConfig, train_lm

ROLES = ("system", "user", "assistant")


SFT_TRAIN_DEFAULTS = {"lr": 1e-3}  # lower than pretraining's: fine-tuning starts from trained weights


@dataclass
class SFTConfig(PretrainConfig):
    """`data` is the chat JSONL, `init` the checkpoint to fine-tune (its tokenizer is used)."""

    strict: bool = option(False, "stop at the first malformed line instead of skipping it")
    val_fraction: float = option(0.05, "share of the conversations held out for validation")


def read_conversations(path: str | os.PathLike, strict: bool = False) -> list[list[dict]]:
    """Valid conversations of a chat JSONL; bad lines are reported with their numbers and skipped
    (or, with strict, the first one raises ValueError)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such data file")
    good, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            good.append(_conversation(json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{number}: invalid JSON ({e.msg})")
        except ValueError as e:
            bad.append(f"{path}:{number}: {e}")
        if bad and strict:
            raise ValueError(bad[0])
    if bad:
        print(f"nanoseek: skipped {len(bad)} malformed line(s) of {path}:", file=sys.stderr)
        for message in bad[:10]:
            print(f"  {message}", file=sys.stderr)
    if not good:
        raise ValueError(f"{path}: no usable conversations")
    return good


def _conversation(rec: object) -> list[dict]:
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list) or not rec["messages"]:
        raise ValueError("a record needs a non-empty `messages` list")
    for i, m in enumerate(rec["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise ValueError(f"messages[{i}].reasoning_content must be a string")
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise ValueError("no assistant turn to learn from")
    return rec["messages"]


def assistant_target(message: dict) -> str:
    """What the model should generate after the `<think>\\n` the prompt opened: reasoning, `</think>`,
    the answer, end of sentence."""
    reasoning, content = message.get("reasoning_content"), message["content"]
    if reasoning is None and END_THINK in content:
        return content + EOS
    return (reasoning or "") + END_THINK + content + EOS


def chat_examples(tok, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """(token ids, 0/1 target mask) for every assistant turn of every conversation."""
    pairs = []
    for messages in conversations:
        for j, m in enumerate(messages):
            if m["role"] == "assistant":
                pairs.append((render_chat(messages[:j]), assistant_target(m)))
    encoded = tok.encode_batch([x for pair in pairs for x in pair], add_special_tokens=False)
    return [(p.ids + c.ids, [0] * len(p.ids) + [1] * len(c.ids)) for p, c in zip(encoded[::2], encoded[1::2])]


def pack_examples(
    examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> tuple[torch.Tensor, int]:
    """Pack whole examples into rows of seq_len + 1 tokens, first fit; returns [N, 3, seq_len + 1]
    (ids, target mask, example ids; padding has mask 0) and how many examples had to be truncated."""
    width, truncated = seq_len + 1, 0
    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):
        if len(ids) > width:
            ids, mask, truncated = ids[:width], mask[:width], truncated + 1
            if not any(mask[1:]):
                continue  # the prompt alone fills the row: nothing left to learn
        for r, free in enumerate(room):
            if free >= len(ids):
                rows[r].append((ids, mask))
                room[r] -= len(ids)
                break
        else:
            rows.append([(ids, mask)])
            room.append(width - len(ids))
    out = torch.zeros(len(rows), 3, width, dtype=torch.long)
    out[:, 0] = pad_id
    out[:, 2] = -1
    for r, items in enumerate(rows):
        at = 0
        for doc, (ids, mask) in enumerate(items):
            out[r, 0, at : at + len(ids)] = torch.tensor(ids)
            out[r, 1, at : at + len(ids)] = torch.tensor(mask)
            out[r, 2, at : at + len(ids)] = doc
            at += len(ids)
    return out, truncated


def sft(
    sc: SFTConfig, tc: TrainConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True
) -> dict:
    """Fine-tune `sc.init` on `sc.data` into `out`; returns the run summary."""
    if not sc.init:
        raise ValueError("init: SFT needs a checkpoint to start from")
    init = resolve_checkpoint(sc.init)  # the run config keeps the name given (a Hub id stays one)
    if tc.expert_parallel > 1:  # before reading and packing the data
        check_expert_parallel(
            tc.expert_parallel, setup_distributed().world, ModelConfig.from_json(init), tc.fsdp
        )
    tok = load_tokenizer(init)
    if tok is None:
        raise ValueError(f"init: {sc.init} has no tokenizer.json")
    examples = chat_examples(tok, read_conversations(sc.data, sc.strict))
    rows, truncated = pack_examples(examples, sc.seq_len, tok.token_to_id(PAD))
    if truncated and setup_distributed().main:
        print(f"nanoseek: truncated {truncated} of {len(examples)} examples to {sc.seq_len + 1} tokens")
    n_val = min(max(int(rows.shape[0] * sc.val_fraction), 1), rows.shape[0] - 1) if rows.shape[0] > 1 else 0
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(tc.seed))
    rows = rows[perm]
    train_rows, val_rows = (rows[:-n_val], rows[-n_val:]) if n_val else (rows, rows[:0])
    print(
        f"SFT data: {len(examples)} examples in {rows.shape[0]} packed rows of {sc.seq_len + 1} tokens "
        f"({int(rows[:, 1].sum())} target tokens)"
    )
    return train_lm(sc, tc, out, (tok, init, train_rows, val_rows, {}), resume, progress)
