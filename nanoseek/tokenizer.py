"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with DeepSeek-R1's added tokens and chat template.

Saved as `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer` loads it and a
checkpoint directory carries everything `serve`, `generate` and `grpo` need (REFERENCE §10, §11). The chat
template is Jinja, rendered here exactly as transformers renders it, so training, tasks and the server
produce the same prompts as `apply_chat_template`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .atomic import atomic_write_text

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK, ANSWER, END_ANSWER]  # ids 0..8
# R1 marks the reasoning tags as added tokens that are not special (REFERENCE §11): BPE never splits them,
# yet decoders that skip special tokens (transformers pipelines, vLLM, TRL) keep them in the text.
TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)
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
    + ASSISTANT
    + "{{ c }}"
    + EOS
    + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "<think>\n{% endif %}"
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file; it wins over tokenizer_config.json


# ---- the chat template ---------------------------------------------------------------------------------
def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers replaces Jinja's tojson, which escapes HTML characters a prompt must keep
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """transformers' `{% generation %}` block (it marks assistant text for loss masks): rendered as its body,
    so templates written for TRL compile here too."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # the environment transformers' apply_chat_template uses: same whitespace control, globals and filters
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)  # tasks and data loaders render thousands of prompts with one template
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template; ValueError (with the line) when the source is not valid Jinja."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"not a valid Jinja template (line {e.lineno}: {e.message})") from None


def render_chat(messages: list[dict], add_generation_prompt: bool = True, template: str | None = None) -> str:
    """The prompt text for a conversation, rendered like transformers' `apply_chat_template(tokenize=False)`.

    `template`: Jinja source (default: the built-in R1 template). Errors raised while rendering (a template's
    `raise_exception`, a message the template cannot handle) come out as ValueError starting with `messages:`.
    """
    compiled = compile_chat_template(CHAT_TEMPLATE if template is None else template)
    # transformers drops None-valued keys: templates test `'content' in m`, not for None
    plain = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    try:
        return compiled.render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
        )
    except Exception as e:  # whatever a template does wrong is about these messages, never a crash
        raise ValueError(f"messages: the chat template cannot render them: {e}") from None


def load_chat_template(path: str | os.PathLike) -> str | None:
    """The chat template saved in a checkpoint or tokenizer directory (`chat_template.jinja` first, then
    tokenizer_config.json's `chat_template`, as transformers reads them), or None when it has none."""
    d = Path(path)
    f = d / CHAT_TEMPLATE_FILE
    if f.is_file():
        try:
            return f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: cannot read the chat template ({e})") from None
    f = d / "tokenizer_config.json"
    if not f.is_file():
        return None
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: not a readable JSON file ({e})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]; serve the default
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{f}: chat_template lists named templates but none is named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{f}: chat_template must be a string, got {type(template).__name__}")
    return template


def read_chat_template(path: str | os.PathLike) -> str:
    """A Jinja chat template from a file, checked to compile; errors name the file."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the chat template ({e})") from None
    if not source.strip():
        raise ValueError(f"{path}: the chat template is empty")
    try:
        compile_chat_template(source)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return source


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE uses for each byte (GPT-2's table), inverted: char -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(tok: Tokenizer, token_id: int, added: set[int] | None = None) -> bytes:
    """The raw bytes of one token (a token may hold part of a UTF-8 character, so text alone is lossy).
    `added`: the ids of added tokens (special or not), when the caller has them at hand."""
    piece = tok.id_to_token(token_id)
    if piece is None:
        return b""
    if token_id in (added if added is not None else tok.get_added_tokens_decoder()):
        return piece.encode()
    return bytes(_BYTE_OF[c] for c in piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE; digits are split one per token (it helps small models do arithmetic)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size: {vocab_size} is too small; the 256 bytes and {len(SPECIAL_TOKENS)} "
            f"special tokens need at least {MIN_VOCAB}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)  # the trainer marks every one of its tokens special
    return with_r1_conventions(tok)


def with_r1_conventions(tok: Tokenizer) -> Tokenizer:
    """tok with DeepSeek-R1's added-token flags: BOS, EOS, PAD, User and Assistant special, the reasoning
    and answer tags added but not special; ids unchanged. Tokenizers saved before this convention (every
    tag special) come out in it too."""
    data = json.loads(tok.to_str())
    changed = False
    for entry in data.get("added_tokens") or []:
        if entry.get("content") in SPECIAL_TOKENS:
            special = entry["content"] not in TAGS
            changed |= entry.get("special") != special
            entry["special"] = special
    return Tokenizer.from_str(json.dumps(data)) if changed else tok


def save_tokenizer(
    tok: Tokenizer, out_dir: str | os.PathLike, model_max_length: int = 2048, chat_template: str | None = None
) -> None:
    """Write tokenizer.json and tokenizer_config.json (R1's conventions, whatever tok was loaded from).
    `chat_template`: the Jinja template to ship (default: the built-in R1 one)."""
    template = CHAT_TEMPLATE if chat_template is None else chat_template
    compile_chat_template(template)  # never ship a template nothing can render
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", with_r1_conventions(tok).to_str())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": template,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    # transformers reads chat_template.jinja before tokenizer_config.json: a stale one would shadow ours
    (out / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)


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
    for name in ("tokenizer.json", "tokenizer_config.json", CHAT_TEMPLATE_FILE):
        f = Path(src) / name
        if f.exists():
            atomic_write_text(Path(dst) / name, f.read_text())
