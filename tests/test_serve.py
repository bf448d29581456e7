"""`nanoseek serve` against real clients: the official `openai` package, raw HTTP, and Chromium for the page.

The served model is a tiny DeepSeekV3 trained in a few seconds to answer every chat message with
REASONING + `</think>` + ANSWER, so the reasoning/content split can be checked exactly.
"""

import asyncio
import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import missing
from hypothesis import given
from hypothesis import strategies as st

from nanoseek import LLM, DeepSeekV3, ModelConfig, save_model
from nanoseek.serve.api import background_server, create_app
from nanoseek.serve.reasoning import ThinkParser, split_reasoning
from nanoseek.tokenizer import EOS, render_chat, save_tokenizer, train_tokenizer

openai = pytest.importorskip("openai")

REASONING, ANSWER = "Let me think about it.", "Hello from nanoseek!"
USERS = [
    "hi",
    "hello there",
    "what is 2+2?",
    "tell me a story",
    "how are you",
    "ping",
    "who are you?",
    "test",
]
SYSTEM = "You are nanoseek, a small model that thinks before it answers. Keep your answers short and kind."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    texts = [
        render_chat([{"role": "system", "content": s}, {"role": "user", "content": u}])
        + REASONING
        + "</think>"
        + ANSWER
        + EOS
        for u in USERS
        for s in ("", SYSTEM)
    ]
    tok = train_tokenizer(texts * 10 + ["the quick brown fox jumps over the lazy dog 0123456789 é ü 😀"], 300)
    config = dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = DeepSeekV3(config)
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        logits = model(ids[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("chat-model")
    save_model(model.eval(), out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def served(checkpoint):
    app = create_app(LLM(str(checkpoint), max_num_seqs=64), served_model_name="nanoseek-test")
    with background_server(app) as url:
        yield url, app.state.server


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# ---- the think parser ------------------------------------------------------------------------------
@given(st.text(alphabet="ab</think>\n", max_size=40), st.lists(st.integers(0, 40), max_size=6), st.booleans())
def test_think_parser_any_split_equals_whole(text, cuts, in_reasoning):
    cuts = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    parser = ThinkParser(in_reasoning)
    got = [parser.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == split_reasoning(text, in_reasoning)


def test_think_parser_cases():
    assert split_reasoning("plan</think>\n\nanswer", True) == ("plan", "answer")
    assert split_reasoning("cut off while thinking", True) == ("cut off while thinking", "")  # length
    assert split_reasoning("<think>plan</think>answer", False) == ("plan", "answer")  # the model opened it
    assert split_reasoning("just an answer", False) == ("", "just an answer")
    p = ThinkParser(True)
    assert p.feed("a</th") == ("a", "")  # a possible tag is held back, never shown as reasoning
    assert p.feed("ink>b") == ("", "b")


# ---- the API with the openai client ------------------------------------------------------------------
def test_models_health_openapi(served, client):
    url, _ = served
    assert [m.id for m in client.models.list().data] == ["nanoseek-test"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)


def test_chat_non_streaming_splits_reasoning(client):
    r = client.chat.completions.create(
        model="nanoseek-test",
        messages=[{"role": "user", "content": "hello there"}],
        temperature=0,
        max_tokens=40,
    )
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == (REASONING, ANSWER)
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens


def test_chat_streaming_reasoning_first_then_content_then_usage(served):
    url, _ = served
    body = {
        "messages": [{"role": "user", "content": "ping"}],
        "temperature": 0,
        "max_tokens": 40,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0  # usage before [DONE]
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    kinds = [k for d in deltas for k in ("reasoning_content", "content") if d.get(k)]
    assert kinds == sorted(kinds, key=lambda k: k == "content") and "content" in kinds  # reasoning first
    assert "".join(d.get("reasoning_content", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    # every token's logprob once, in a chunk of the part it belongs to, also for tokens whose text is held
    # back (split characters or tags: sampled hot, the emoji's bytes come up)
    body.update({"n": 8, "temperature": 2.0, "seed": 5, "max_tokens": 12, "ignore_eos": True})
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 8 * 12
    for i in range(8):
        with_lp = [
            c["choices"][0]
            for c in chunks[:-1]
            if c["choices"][0]["index"] == i and c["choices"][0]["logprobs"]
        ]
        assert sum(len(c["logprobs"]["content"]) for c in with_lp) == 12
        parts = ["content" if "content" in c["delta"] else "reasoning_content" for c in with_lp]
        assert parts == sorted(parts, key=lambda k: k == "content"), parts


def test_streaming_with_openai_client_and_length_inside_thinking(client):
    stream = client.chat.completions.create(
        model="nanoseek-test",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=3,
        stream=True,
    )
    chunks = list(stream)
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning and REASONING.startswith(reasoning) and content == ""
    assert chunks[-1].choices[0].finish_reason == "length"


def test_second_turn_is_served_from_the_prefix_cache(client):
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "who are you?"}]
    a = client.chat.completions.create(model="nanoseek-test", messages=first, temperature=0, max_tokens=40)
    second = first + [
        {
            "role": "assistant",
            "content": a.choices[0].message.content,
            "reasoning_content": a.choices[0].message.reasoning_content,
        },
        {"role": "user", "content": "how are you"},
    ]
    b = client.chat.completions.create(model="nanoseek-test", messages=second, temperature=0, max_tokens=40)
    assert b.usage.prompt_cache_hit_tokens >= 16  # at least the system prompt's full blocks
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_cache_hit_tokens
    assert b.usage.prompt_cache_hit_tokens + b.usage.prompt_cache_miss_tokens == b.usage.prompt_tokens


def test_logprobs_n_and_seed(client):
    r = client.chat.completions.create(
        model="nanoseek-test",
        messages=[{"role": "user", "content": "test"}],
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely token
    kwargs = dict(
        model="nanoseek-test",
        messages=[{"role": "user", "content": "hi"}],
        temperature=1.5,
        max_tokens=12,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.reasoning_content for c in a.choices] == [
        c.message.reasoning_content for c in b.choices
    ]
    assert a.usage.completion_tokens == 36


def test_completions_endpoint(client):
    prompt = render_chat([{"role": "user", "content": "hello there"}])
    r = client.completions.create(
        model="nanoseek-test", prompt=prompt, temperature=0, max_tokens=40, logprobs=2
    )
    assert r.choices[0].text == REASONING + "</think>" + ANSWER
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="nanoseek-test", prompt=prompt, temperature=0, max_tokens=40, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_bad_requests_raise_the_clients_exception_types(client):
    ok = dict(model="nanoseek-test", messages=[{"role": "user", "content": "hi"}])
    cases = [
        ({"temperature": -1}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ]
    for change, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{**ok, **change})
        err = e.value.response.json()["error"]
        assert err["param"] == param and set(err) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**ok, "model": "gpt-5"})
    assert client.chat.completions.create(**ok, max_tokens=4).usage.completion_tokens >= 1  # still serving


def test_malformed_bodies_never_500(served):
    url, _ = served
    post = lambda **kw: httpx.post(url + "/v1/chat/completions", timeout=30, **kw)  # noqa: E731
    bad = [
        post(content=b"{not json", headers={"content-type": "application/json"}),
        post(json={"messages": "hello"}),
        post(json={"messages": [{"role": "user", "content": 5}]}),
        post(json=[1, 2]),
        post(json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}),
        post(content=b"x" * (3 * 2**20), headers={"content-type": "application/json"}),
    ]
    assert [r.status_code for r in bad] == [400] * 5 + [413]
    untyped = httpx.post(
        url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}]}'
    )
    assert (
        untyped.status_code == 400 and "Content-Type: application/json" in untyped.json()["error"]["message"]
    )
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in bad)
    assert httpx.get(url + "/v1/nothing-here").json()["error"]["code"] == "not_found"
    chunked = post(content=(b"x" * 2**20 for _ in range(3)), headers={"content-type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    for body, param in [
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": [-5]}, "prompt"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": [5] * 600}, "prompt"),
    ]:
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith(param), r.text
    hi = {"role": "user", "content": "hi"}
    for body, param in [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),  # a lone surrogate
        ({"messages": [{"role": "user", "content": "hi " * 200_000}]}, "messages"),  # can't fit
        ({"messages": [hi], "stop": ["x"] * 17}, "stop"),
        ({"messages": [hi], "stop": "y" * 257}, "stop"),
    ]:
        r = post(content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # null means unset (the openai client sends it); a temperature too small to scale by is greedy
    nulls = post(
        json={
            "messages": [hi],
            "max_tokens": 3,
            "temperature": None,
            "n": None,
            "stream": None,
            "logprobs": None,
            "top_p": None,
            "presence_penalty": None,
            "stop": None,
        }
    )
    assert nulls.status_code == 200, nulls.text
    tiny = post(json={"messages": [hi], "max_tokens": 3, "temperature": 1e-300, "logprobs": True})
    assert tiny.status_code == 200 and all(
        math.isfinite(t["logprob"]) for t in tiny.json()["choices"][0]["logprobs"]["content"]
    )
    # a request field the server does not implement is refused, naming it (inside a message, ignored)
    unknown_field = post(json={"messages": [hi], "max_tokens": 2, "frobnicate": True})
    assert unknown_field.status_code == 400 and unknown_field.json()["error"]["param"] == "frobnicate"
    assert (
        post(json={"messages": [{"role": "user", "content": "hi", "x": 1}], "max_tokens": 2}).status_code
        == 200
    )
    long_stop = post(
        json={"messages": [hi], "max_tokens": 2, "stop": "Human: please stop here"}
    )  # 23 characters
    assert long_stop.status_code == 200, long_stop.text


def test_without_max_tokens_a_request_gets_what_the_cache_holds(checkpoint):
    """A cache smaller than the context: an unset max_tokens is bounded by the cache, not refused."""
    from nanoseek.engine.cache import LatentStore

    llm = LLM(str(checkpoint))
    llm = LLM(
        str(checkpoint), cache_memory_mb=200 * LatentStore.bytes_per_token(llm.config, torch.float32) / 2**20
    )
    with background_server(create_app(llm, served_model_name="m")) as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=60,
            json={"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] <= llm.capacity < llm.max_len


def test_api_key_and_queue_limit(checkpoint):
    app = create_app(LLM(str(checkpoint)), served_model_name="m", api_key="sk-secret", max_pending=1)
    with background_server(app) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        # checked before the body is read: a client without the key learns nothing about its request
        for body in (b"{not json", b"x" * (3 * 2**20)):
            r = httpx.post(
                url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # outside /v1: open
        good = openai.OpenAI(base_url=url + "/v1", api_key="sk-secret", max_retries=0)
        long = good.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            max_tokens=400,
            extra_body={"ignore_eos": True},
        )
        next(iter(long))
        with pytest.raises(openai.RateLimitError):
            good.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        long.close()
        assert wait_for(lambda: app.state.server.engine.num_requests == 0)
        assert (
            good.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            ).usage.completion_tokens
            >= 1
        )


# ---- load ------------------------------------------------------------------------------------------
def test_32_concurrent_streams_match_each_request_alone(served):
    url, _ = served
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def request(i):
        return dict(
            model="nanoseek-test",
            messages=[{"role": "user", "content": USERS[i % 8] + " " * (i // 8)}],
            temperature=1.3,
            max_tokens=16,
            seed=1000 + i,
            extra_body={"ignore_eos": True},
        )

    async def one(i):
        text = ""
        async for c in await client.chat.completions.create(**request(i), stream=True):
            if c.choices:
                d = c.choices[0].delta
                text += (getattr(d, "reasoning_content", None) or "") + "|" + (d.content or "")
        return text

    async def both():
        together = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), 120)
        alone = [await one(i) for i in range(32)]
        return together, alone

    together, alone = asyncio.run(both())
    assert together == alone
    assert all(t.count("|") >= 1 for t in together)


def slow_steps(server, monkeypatch, seconds: float = 0.02) -> list[int]:
    """Engine steps made slower by `seconds`, and counted (the one-item list's value): a request freed in
    fewer steps than it had tokens to generate was aborted, however slow or busy the machine."""
    step, count = server.llm.step, [0]

    def slow():
        count[0] += 1
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(server.llm, "step", slow)
    return count


def test_disconnecting_clients_free_their_cache(served, monkeypatch):
    url, server = served
    steps = slow_steps(server, monkeypatch)
    aborted = metric(url, 'nanoseek_requests_total{outcome="abort"}')
    body = {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    for _ in range(5):
        start = steps[0]
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)  # a few chunks in, then the client goes away
        assert wait_for(lambda: metric(url, "nanoseek_cache_blocks_used") == 0, timeout=30)
        assert steps[0] - start < 400  # freed long before its 400 tokens: aborted
    assert wait_for(lambda: metric(url, 'nanoseek_requests_total{outcome="abort"}') == aborted + 5)
    assert server.engine.num_requests == 0 and not server.llm.has_unfinished()


def test_a_non_streaming_client_that_leaves_aborts_its_request(served, monkeypatch):
    """Tokens keep arriving, so the handler never idles: it still notices the client has gone."""
    url, server = served
    steps = slow_steps(server, monkeypatch)
    aborted, finished = (
        metric(url, f'nanoseek_requests_total{{outcome="{o}"}}') for o in ("abort", "length")
    )
    body = {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
    assert wait_for(lambda: metric(url, "nanoseek_cache_blocks_used") == 0, timeout=30)
    assert steps[0] < 400  # freed long before its 400 tokens: aborted
    assert wait_for(lambda: metric(url, 'nanoseek_requests_total{outcome="abort"}') == aborted + 1)
    assert metric(url, 'nanoseek_requests_total{outcome="length"}') == finished


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_engine_step_fails_its_requests_and_the_server_goes_on(served, client, monkeypatch, stream):
    """A bug in a step is not the client's fault: a 500 in the OpenAI shape (an error event mid-stream),
    counted as an error (not as a client's abort), with its cache freed; the next request is served."""
    url, server = served
    step, calls = server.llm.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return step()

    monkeypatch.setattr(server.llm, "step", failing_once)
    errors, aborted = (metric(url, f'nanoseek_requests_total{{outcome="{o}"}}') for o in ("error", "abort"))
    with pytest.raises(openai.APIError, match="engine step failed: boom") as failed:
        r = client.chat.completions.create(
            model="nanoseek-test",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        for _ in r if stream else ():
            pass
    assert stream or isinstance(failed.value, openai.InternalServerError)
    assert wait_for(lambda: metric(url, 'nanoseek_requests_total{outcome="error"}') == errors + 1)
    assert metric(url, 'nanoseek_requests_total{outcome="abort"}') == aborted
    assert wait_for(lambda: metric(url, "nanoseek_cache_blocks_used") == 0)
    r = client.chat.completions.create(
        model="nanoseek-test",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 4


def test_metrics_report_latency_and_tokens(served, client):
    client.chat.completions.create(
        model="nanoseek-test", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    url, _ = served
    assert metric(url, "nanoseek_time_to_first_token_seconds_count") >= 1
    assert metric(url, "nanoseek_time_per_output_token_seconds_count") >= 1
    assert metric(url, "nanoseek_generation_tokens_total") >= 8
    assert metric(url, "nanoseek_prompt_tokens_total") > 0
    hits = metric(url, "nanoseek_prompt_cache_hit_tokens_total")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "metrics"}]
    for _ in range(2):
        r = client.chat.completions.create(model="nanoseek-test", messages=messages, max_tokens=2)
    assert r.usage.prompt_cache_hit_tokens > 0
    assert wait_for(
        lambda: (
            metric(url, "nanoseek_prompt_cache_hit_tokens_total") >= hits + r.usage.prompt_cache_hit_tokens
        )
    )


def test_latency_histogram_buckets_are_cumulative():
    from nanoseek.serve.metrics import Histogram

    h = Histogram((0.01, 0.1, 1.0))
    for v in (0.003, 0.01, 0.05, 5.0):
        h.observe(v)
    assert h.lines("t") == [
        't_bucket{le="0.01"} 2',
        't_bucket{le="0.1"} 3',
        't_bucket{le="1.0"} 3',
        't_bucket{le="+Inf"} 4',
        "t_sum 5.063000",
        "t_count 4",
    ]


def test_queue_depth_gauge(checkpoint, monkeypatch):
    app = create_app(LLM(str(checkpoint), max_num_seqs=1), served_model_name="m")
    slow_steps(app.state.server, monkeypatch)
    with background_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = dict(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        first, second = client.chat.completions.create(**chat), client.chat.completions.create(**chat)
        next(iter(first))  # one decoding, the other waiting for the one sequence slot
        assert wait_for(lambda: metric(url, "nanoseek_requests_waiting") == 1)
        assert metric(url, "nanoseek_requests_running") == 1
        first.close()
        second.close()
        assert wait_for(lambda: metric(url, "nanoseek_cache_blocks_used") == 0)


# ---- the chat page in a real browser -------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture
def chat_page(served):
    """The chat page in headless Chromium, at temperature 0, with "hello there" sent."""
    absent = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        absent.append("the playwright package")
    if not os.path.exists(CHROMIUM):
        absent.append(CHROMIUM + " (apt-get install -y chromium)")
    if absent:
        missing("browser test needs " + " and ".join(absent))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(served[0] + "/")
            page.fill("#temperature", "0")
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            yield page
        finally:
            browser.close()


def test_chat_page_streams_thinking_then_answer(chat_page):
    page = chat_page
    page.wait_for_function(
        "document.querySelector('.msg.assistant .answer')?.textContent === 'Hello from nanoseek!'",
        timeout=30000,
    )
    assert page.inner_text(".msg.user") == "hello there"
    assert page.text_content(".reasoning") == REASONING
    assert re.fullmatch(r"Thought for \d+\.\d s", page.inner_text("details.thinking summary"))
    page.wait_for_function("document.querySelector('.usage')?.textContent.includes('cache hit')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)
    page.fill("#input", "how are you")  # a second turn keeps the history
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant .answer').length === 2 && "
        "document.querySelectorAll('.msg.assistant .answer')[1].textContent.length > 0"
    )
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#max-tokens", "100000")  # refused (beyond the context): the turn is not kept
    page.fill("#input", "ping")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .error")
    page.fill("#max-tokens", "8")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#input", "hi")
        page.press("#input", "Enter")
    assert [m["content"] for m in sent.value.post_data_json["messages"]] == ["hi"]


@pytest.fixture
def slow_server(served, monkeypatch):
    """Engine steps slowed to 0.5 s (set before the chat page sends its message): the thinking lasts seconds."""
    return served[0], slow_steps(served[1], monkeypatch, seconds=0.5), served[1]


def test_chat_page_shows_thinking_while_it_streams_and_stops(slow_server, chat_page):
    """The block reads "Thinking…" while reasoning arrives; Stop ends the turn (the summary then gives the
    time) and the server frees the request's cache before it could have finished it."""
    url, steps, server = slow_server
    page = chat_page
    page.wait_for_function("document.querySelector('.reasoning')?.textContent.length > 0", timeout=30000)
    assert page.inner_text("details.thinking summary") == "Thinking…"
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.click("#stop")
    page.wait_for_function(
        "document.querySelector('details.thinking summary').textContent.startsWith('Thought')"
    )
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert wait_for(lambda: metric(url, "nanoseek_cache_blocks_used") == 0, timeout=60)
    whole = (
        len(server.tokenizer.encode(REASONING + "</think>" + ANSWER, add_special_tokens=False).ids) + 1
    )  # + EOS
    assert steps[0] < whole and page.text_content(".msg.assistant .answer") != ANSWER  # aborted, not finished


# ---- the command lines -----------------------------------------------------------------------------
def test_generate_and_serve_command_lines(checkpoint):
    """`nanoseek generate` streams the answer; `nanoseek serve` binds 127.0.0.1 by default and honours
    --api-key, --served-model-name and --max-concurrency."""
    import socket
    import subprocess
    import sys

    from conftest import ONE_THREAD, cli

    prompt = render_chat([{"role": "user", "content": "hello there"}])
    r = cli("generate", str(checkpoint), "--prompt", prompt, "--max-tokens", "40", env=ONE_THREAD)
    assert r.returncode == 0 and r.stdout.strip() == REASONING + "</think>" + ANSWER, r.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "serve",
            str(checkpoint),
            "--port",
            str(port),
            "--api-key",
            "sk-cli",
            "--served-model-name",
            "cli-model",
            "--max-concurrency",
            "1",
            "--max-queue",
            "0",
            "--log-level",
            "warning",
        ],
        env=ONE_THREAD,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["cli-model"]
        long = client.chat.completions.create(
            model="cli-model",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(long))
        with pytest.raises(openai.RateLimitError):  # one running, no queue
            client.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "hi"}])
        long.close()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"chat page at http://127.0.0.1:{port}/" in out


def test_request_fields_developer_role_and_earlier_reasoning(served, client):
    url, _ = served
    r = client.chat.completions.create(
        model="nanoseek-test",
        messages=[{"role": "developer", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        max_completion_tokens=3,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"

    # earlier turns' reasoning is dropped from the prompt, as the DeepSeek API does
    def turn(reasoning: str) -> list[dict]:
        return [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ANSWER, "reasoning_content": reasoning},
            {"role": "user", "content": "and now?"},
        ]

    short, long = (
        client.chat.completions.create(model="nanoseek-test", messages=turn(x), max_tokens=1)
        for x in ("", "a long chain of thought " * 20)
    )
    assert short.usage.prompt_tokens == long.usage.prompt_tokens
    # no usage chunk unless asked for
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["choices"] and c.get("usage") is None for c in chunks)


def test_server_threads_leave_the_event_loop_a_core(monkeypatch):
    from nanoseek.serve.async_engine import server_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert (server_threads(), server_threads(3)) == (7, 3)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert server_threads() == 1
