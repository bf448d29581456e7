import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data import builtin_documents
from nanoseek.tokenizer import (
    ASSISTANT,
    MIN_VOCAB,
    SPECIAL_TOKENS,
    THINK,
    render_chat,
    save_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["".join(d) for d in builtin_documents(400, seed=0)], 600)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_special_tokens_are_single_tokens(tok):
    for s in SPECIAL_TOKENS:
        assert len(tok.encode(f"a{s}b", add_special_tokens=False).ids) == 3


def test_transformers_loads_it_with_the_chat_template(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd</think>4"},
        {"role": "user", "content": "3+3?"},
    ]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(msgs)
    assert text.endswith(ASSISTANT + THINK + "\n") and "add" not in text  # earlier reasoning dropped
    assert (
        hf.encode("12 <think>", add_special_tokens=False)
        == tok.encode("12 <think>", add_special_tokens=False).ids
    )


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], MIN_VOCAB - 1)
