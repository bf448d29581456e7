"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with DeepSeek-R1 special tokens and chat template.

Saved as `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer` loads it and a
checkpoint directory carries everything `serve`, `generate` and `grpo` need (REFERENCE §10).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .atomic import atomic_write_text

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, ANSWER, END_ANSWER]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# DeepSeek-R1 style: system text first, user/assistant turns, earlier answers without their reasoning,
# and a generation prompt that opens the reasoning: `<｜Assistant｜><think>\n`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    + ASSISTANT + "{{ c }}" + EOS +
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "<think>\n{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template in Python (same text as the Jinja one; checked against transformers in tests)."""
    out = [BOS] + [m["content"] for m in messages if m["role"] == "system"]
    for m in messages:
        if m["role"] == "user":
            out.append(USER + m["content"])
        elif m["role"] == "assistant":
            out.append(ASSISTANT + m["content"].split(END_THINK)[-1] + EOS)
    if add_generation_prompt:
        out.append(ASSISTANT + THINK + "\n")
    return "".join(out)


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE uses for each byte (GPT-2's table), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(tok: Tokenizer, token_id: int, added: set[int] | None = None) -> bytes:
    """The raw bytes of one token (a token may hold part of a UTF-8 character, so text alone is lossy).
    `added`: the ids of added (special) tokens, when the caller has them at hand."""
    piece = tok.id_to_token(token_id)
    if piece is None:
        return b""
    if token_id in (added if added is not None else tok.get_added_tokens_decoder()):
        return piece.encode()
    return bytes(_BYTE_OF[c] for c in piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE; digits are split one per token (it helps small models do arithmetic)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: {vocab_size} is too small; the 256 bytes and {len(SPECIAL_TOKENS)} "
                         f"special tokens need at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, model_max_length: int = 2048) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer saved in a directory (checkpoint or tokenizer dir), or None when there is none."""
    f = Path(path) / "tokenizer.json"
    if not f.exists():
        return None
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise ValueError(f"{f}: not a valid tokenizer file ({e})") from None


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the tokenizer files of src beside a checkpoint in dst (atomically)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        f = Path(src) / name
        if f.exists():
            atomic_write_text(Path(dst) / name, f.read_text())

