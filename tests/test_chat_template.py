"""R1's tokenizer conventions (reasoning tags added but not special) and the Jinja chat template: rendered as
transformers renders it, read from checkpoints, and served (`--chat-template`)."""

import json

import httpx
import pytest
import torch
from conftest import random_model

from nanoseek import LLM, ModelConfig, SamplingParams, save_model
from nanoseek.cli import main
from nanoseek.serve.api import background_server, create_app
from nanoseek.serve.reasoning import split_reasoning
from nanoseek.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    SPECIAL_TOKENS,
    TAGS,
    THINK,
    USER,
    compile_chat_template,
    load_chat_template,
    load_tokenizer,
    render_chat,
    save_tokenizer,
    token_bytes,
    train_tokenizer,
)

NO_THINK = CHAT_TEMPLATE.replace(ASSISTANT + "<think>\n{% endif %}", ASSISTANT + "{% endif %}")
MARKERS = [t for t in SPECIAL_TOKENS if t not in TAGS]
TEXT = BOS + USER + "2+2?" + ASSISTANT + "<think>\nadd</think> <answer>4</answer>" + EOS

# whitespace control, loop controls, tojson and raise_exception: what transformers' environment provides
MULTILINE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' and not loop.first %}
        {{ raise_exception('a system message must come first') }}
    {% endif %}
    {% if m['role'] == 'tool' %}{% continue %}{% endif %}
    {% if m['role'] == 'assistant' %}
        {% generation %}<a>{{ m['content'] }}{% endgeneration %}
    {% else %}
    <{{ m['role'] }}>{{ m['content'] | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd two and two</think>\n\n4"},
        {"role": "user", "content": "and {{ 3+3 }}? ünïcode 😀"},
        {"role": "assistant", "content": "<think>a</think>b</think>6"},
        {"role": "user", "content": "thanks"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    texts = [render_chat(c) + "reasoning</think>answer" + EOS for c in CONVERSATIONS] * 5
    return train_tokenizer(texts + ["<think> <answer> 0123456789"], 300)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out


def _old_style(src, dst):
    """A tokenizer saved before R1's convention: every one of the nine tokens special."""
    data = json.loads((src / "tokenizer.json").read_text())
    for entry in data["added_tokens"]:
        entry["special"] = True
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(data))
    (dst / "tokenizer_config.json").write_text((src / "tokenizer_config.json").read_text())


def _flags(path) -> dict[str, bool]:
    data = json.loads((path / "tokenizer.json").read_text())
    return {t["content"]: t["special"] for t in data["added_tokens"]}


# ---- the tags: added tokens, not special --------------------------------------------------------------
def test_tags_are_added_tokens_that_are_not_special(tok, hf_dir):
    added = tok.get_added_tokens_decoder()
    assert {added[i].content: added[i].special for i in range(len(SPECIAL_TOKENS))} == {
        t: t not in TAGS for t in SPECIAL_TOKENS
    }  # same ids as ever: 0..8 in SPECIAL_TOKENS order
    assert _flags(hf_dir) == {t: t not in TAGS for t in SPECIAL_TOKENS}
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    for i, t in enumerate(SPECIAL_TOKENS):
        if t in TEXT:
            assert i in ids
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert tok.decode(ids, skip_special_tokens=True) == "2+2?<think>\nadd</think> <answer>4</answer>"
    assert token_bytes(tok, SPECIAL_TOKENS.index(THINK)) == THINK.encode()


def test_transformers_decode_skipping_special_tokens_keeps_the_tags(tok, hf_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert hf.encode(TEXT, add_special_tokens=False) == ids
    text = hf.decode(ids, skip_special_tokens=True)
    assert text == "2+2?<think>\nadd</think> <answer>4</answer>"
    assert all(t in text for t in TAGS) and not any(t in text for t in MARKERS)
    assert hf.decode(ids, skip_special_tokens=False) == TEXT


def test_old_style_tokenizer_loads_and_resaves_with_the_new_convention(hf_dir, tmp_path):
    old = tmp_path / "old"
    _old_style(hf_dir, old)
    loaded = load_tokenizer(old)
    assert all(v.special for v in loaded.get_added_tokens_decoder().values())
    ids = loaded.encode("a<think>b</think><answer>c</answer>", add_special_tokens=False).ids
    assert [i for i in ids if i < len(SPECIAL_TOKENS)] == [SPECIAL_TOKENS.index(t) for t in TAGS]
    assert loaded.decode(ids, skip_special_tokens=False) == "a<think>b</think><answer>c</answer>"
    assert token_bytes(loaded, SPECIAL_TOKENS.index(THINK)) == THINK.encode()

    save_tokenizer(loaded, tmp_path / "new")
    assert _flags(tmp_path / "new") == {t: t not in TAGS for t in SPECIAL_TOKENS}
    resaved = load_tokenizer(tmp_path / "new")
    assert resaved.encode(TEXT).ids == loaded.encode(TEXT).ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "new")
    assert hf.decode(ids, skip_special_tokens=True) == "a<think>b</think><answer>c</answer>"


# ---- the template: one Jinja renderer, the same text as transformers ---------------------------------
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_chat_equals_transformers_apply_chat_template(hf_dir, generation_prompt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for messages in CONVERSATIONS:
        for template in (None, MULTILINE, NO_THINK):
            expected = hf.apply_chat_template(
                messages, tokenize=False, chat_template=template, add_generation_prompt=generation_prompt
            )
            assert render_chat(messages, generation_prompt, template=template) == expected
    text = render_chat(CONVERSATIONS[2])
    assert text.endswith(ASSISTANT + THINK + "\n") and "add two" not in text and "</think>" not in text
    assert "{{ 3+3 }}" in text  # message text is data, never template code


def test_template_errors_name_messages_or_the_template():
    bad = [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match="^messages: .*a system message must come first"):
        render_chat(bad, template=MULTILINE)
    with pytest.raises(ValueError, match="not a valid Jinja template .line 1"):
        render_chat(bad, template="{% for m in messages %}")
    assert compile_chat_template(CHAT_TEMPLATE) is compile_chat_template(CHAT_TEMPLATE)  # compiled once


def test_load_chat_template(tmp_path, hf_dir):
    assert load_chat_template(tmp_path) is None
    assert load_chat_template(hf_dir) == CHAT_TEMPLATE
    save_tokenizer(load_tokenizer(hf_dir), tmp_path, chat_template=NO_THINK)
    assert load_chat_template(tmp_path) == NO_THINK
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "x"},
        {"name": "default", "template": MULTILINE},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(tmp_path) == MULTILINE
    (tmp_path / "chat_template.jinja").write_text("jinja file")  # transformers reads this one first
    assert load_chat_template(tmp_path) == "jinja file"
    save_tokenizer(load_tokenizer(hf_dir), tmp_path)  # the stale file would shadow the template written
    assert load_chat_template(tmp_path) == CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_chat_template(tmp_path)


# ---- serving with the checkpoint's template or --chat-template ---------------------------------------
@pytest.fixture(scope="module")
def no_think_checkpoint(tok, tmp_path_factory):
    """A random tiny model whose checkpoint ships a template that does not open `<think>`."""
    out = tmp_path_factory.mktemp("no-think")
    torch.manual_seed(0)
    save_model(random_model(ModelConfig.preset("tiny").replace(vocab_size=tok.get_vocab_size())), out)
    save_tokenizer(tok, out, chat_template=NO_THINK)
    return out


def _chat(url: str, content: str = "2+2?") -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8},
    )


@pytest.mark.parametrize("override", [None, "default", "no_think"])
def test_serve_renders_the_checkpoint_template_or_the_override(no_think_checkpoint, tok, override):
    llm = LLM(str(no_think_checkpoint), max_num_seqs=4, cache_memory_mb=4)
    template = {None: NO_THINK, "default": CHAT_TEMPLATE, "no_think": NO_THINK}[override]
    given = {None: None, "default": CHAT_TEMPLATE, "no_think": NO_THINK}[override]
    if override == "no_think":  # an override beats a checkpoint that opens <think>
        llm.chat_template = CHAT_TEMPLATE
    prompt = render_chat([{"role": "user", "content": "2+2?"}], template=template)
    text = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].text
    with background_server(create_app(llm, chat_template=given)) as url:
        body = _chat(url).json()
    message = body["choices"][0]["message"]
    assert body["usage"]["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False).ids)
    forced = template == CHAT_TEMPLATE
    reasoning, content = split_reasoning(text, forced)
    assert message["content"] == content
    if forced:
        assert message["reasoning_content"] == reasoning
    else:  # no forced thinking: content only, unless the model itself opened <think>
        assert message.get("reasoning_content") == (reasoning if text.lstrip().startswith(THINK) else None)


def test_template_error_is_a_400_naming_messages(no_think_checkpoint):
    raising = "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('no boom here') }}{% endif %}ok"
    llm = LLM(str(no_think_checkpoint), max_num_seqs=2, cache_memory_mb=4)
    with background_server(create_app(llm, chat_template=raising)) as url:
        r = _chat(url, "boom")
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages" and "no boom here" in r.json()["error"]["message"]
        assert _chat(url, "fine").status_code == 200
    with pytest.raises(ValueError, match="chat_template: not a valid Jinja template"):
        create_app(llm, chat_template="{% if %}")


@pytest.mark.parametrize(
    "content, why",
    [(None, "cannot read"), ("{% for m in messages %}", "not a valid Jinja"), ("  \n", "empty")],
)
def test_bad_chat_template_flag_is_refused_before_loading(tmp_path, capsys, content, why):
    f = tmp_path / "template.jinja"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SystemExit) as exit:
        main(["serve", str(tmp_path / "no-such-checkpoint"), "--chat-template", str(f)])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--chat-template" in err and str(f) in err and why in err
    assert "no-such-checkpoint" not in err  # refused before the checkpoint is looked at
