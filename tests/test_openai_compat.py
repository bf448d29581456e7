"""The OpenAI/vLLM surface that outside tools rely on: batched prompts, echo with prompt log-probs (what
lm-eval's local-completions scores with), logit_bias, refused fields, routes without /v1, vLLM's
tokenizer routes, the OpenAPI schema, and lm-eval itself against its own `hf` backend."""

import dataclasses
import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from conftest import random_model

from nanoseek import LLM, ModelConfig, save_model
from nanoseek.serve.api import MAX_PROMPTS, background_server, create_app
from nanoseek.tokenizer import save_tokenizer, train_tokenizer

openai = pytest.importorskip("openai")

WORDS = "the cat sat on a mat and the dog ran to the park where birds sang all day long".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tok = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5, 300)
    torch.manual_seed(3)
    model = random_model(dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=tok.get_vocab_size()))
    out = tmp_path_factory.mktemp("compat-model")
    save_model(model, out)
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def served(checkpoint):
    llm = LLM(str(checkpoint), max_num_seqs=64)
    app = create_app(llm, served_model_name="m")
    with background_server(app) as url:
        yield url, llm


def full_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, by one uncached forward."""
    with torch.no_grad():
        logp = torch.log_softmax(llm.model(torch.tensor([ids]))[0, :-1].float(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def test_batched_prompts_strings_and_token_lists(served):
    url, llm = served
    texts = ["the cat sat", "where birds"]
    ids = [llm.encode(t) for t in texts]
    greedy = dict(model="m", max_tokens=5, temperature=0, ignore_eos=True)
    one = [post(url, "/v1/completions", prompt=t, **greedy).json()["choices"][0]["text"] for t in texts]
    for prompt in (texts, ids):
        r = post(url, "/v1/completions", prompt=prompt, n=2, **greedy).json()
        assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in r["choices"]] == [one[0], one[0], one[1], one[1]]
        assert r["usage"]["prompt_tokens"] == sum(map(len, ids))
        assert r["usage"]["completion_tokens"] == 20
    chunks = [
        json.loads(line[6:])
        for line in httpx.post(
            url + "/v1/completions", json=dict(prompt=texts, stream=True, **greedy), timeout=60
        ).text.splitlines()
        if line.startswith("data: {")
    ]
    streamed = {
        i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)
    }
    assert streamed == {0: one[0], 1: one[1]}


def test_echo_returns_the_prompt_and_its_logprobs_first_null(served):
    url, llm = served
    prompt = "the dog ran to the park"
    ids = llm.encode(prompt)
    r = post(
        url, "/v1/completions", model="m", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    assert c["text"].startswith(prompt) and len(c["text"]) > len(prompt)
    assert len(lp["tokens"]) == len(ids) + 3 and "".join(lp["tokens"]) == c["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    torch.testing.assert_close(
        torch.tensor(lp["token_logprobs"][1 : len(ids)]), full_logprobs(llm, ids), rtol=1e-4, atol=1e-4
    )
    # token-id prompts echo their decoded text; streamed, the prompt comes first; without logprobs, text only
    by_ids = post(url, "/completions", model="m", prompt=ids, max_tokens=3, temperature=0, echo=True).json()
    assert by_ids["choices"][0]["text"] == c["text"] and by_ids["choices"][0]["logprobs"] is None
    lines = httpx.post(
        url + "/v1/completions",
        json=dict(prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=0, stream=True),
        timeout=60,
    ).text.splitlines()
    first = json.loads(lines[0][6:])["choices"][0]
    assert first["text"] == prompt and first["logprobs"]["token_logprobs"][0] is None
    # a prompt already in the prefix cache scores the same
    again = post(
        url, "/v1/completions", model="m", prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    assert again.json()["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]


def test_logit_bias_and_unimplemented_fields(served):
    url, llm = served
    base = dict(model="m", prompt="the cat", max_tokens=4, temperature=0)
    target = llm.encode("park")[0]
    r = post(url, "/v1/completions", logit_bias={str(target): 100}, **base).json()
    assert r["choices"][0]["text"] == llm.tokenizer.decode([target]) * 4
    refused = [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 500}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "x"]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": ["x"] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"prompt": [[1]] * (MAX_PROMPTS + 1)}, "prompt"),
        ({"echo": "maybe"}, "echo"),
        ({"logprobs": 21}, "logprobs"),
    ]
    for change, param in refused:
        resp = post(url, "/v1/completions", **{**base, **change})
        assert resp.status_code == 400, (change, resp.text)
        assert resp.json()["error"]["param"] == param, resp.json()
    accepted = [{"user": "u1"}, {"tools": []}, {"tool_choice": "none"}, {"best_of": 1}, {"suffix": None}]
    # one prompt of token ids, longer than the most prompts a request may batch
    accepted += [{"prompt": [5] * (MAX_PROMPTS + 36)}, {"prompt": ["x"] * MAX_PROMPTS, "max_tokens": 1}]
    for change in accepted:
        assert post(url, "/v1/completions", **{**base, **change}).status_code == 200, change
    chat = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    bad = post(url, "/v1/chat/completions", **chat, tools=[{"type": "function", "function": {"name": "f"}}])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


def test_routes_without_v1_with_the_openai_client_and_auth(checkpoint, served):
    url, _ = served
    for base in (url, url + "/v1"):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["m"]
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.usage.completion_tokens == 3
        assert client.completions.create(model="m", prompt="the", max_tokens=2).usage.completion_tokens == 2
    app = create_app(LLM(str(checkpoint)), served_model_name="m", api_key="sk-1")
    with background_server(app) as guarded:
        for path in ("/models", "/v1/models", "/tokenizer_info"):
            assert httpx.get(guarded + path).status_code == 401
            assert httpx.get(guarded + path, headers={"Authorization": "Bearer sk-1"}).status_code == 200
        assert httpx.post(guarded + "/completions", json={"prompt": "a"}).status_code == 401
        assert httpx.get(guarded + "/version").status_code == 200


def test_tokenize_detokenize_version_and_tokenizer_info(served):
    url, llm = served
    ids = llm.encode("the cat sat")
    for prefix in ("", "/v1"):
        r = post(url, prefix + "/tokenize", prompt="the cat sat", return_token_strs=True).json()
        assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == llm.max_len
        assert "".join(r["token_strs"]) == "the cat sat"
        assert post(url, prefix + "/detokenize", tokens=ids).json() == {"prompt": "the cat sat"}
    chat = post(url, "/tokenize", messages=[{"role": "user", "content": "hi"}]).json()
    assert post(url, "/detokenize", tokens=chat["tokens"]).json()["prompt"].endswith("<think>\n")
    for body, param in [({"tokens": [-1]}, "tokens"), ({"tokens": "x"}, "tokens")]:
        assert post(url, "/detokenize", **body).json()["error"]["param"] == param
    assert post(url, "/tokenize", prompt="a", messages=[{"role": "user", "content": "b"}]).status_code == 400
    assert post(url, "/tokenize", prompt="a", model="other").status_code == 404
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<｜end▁of▁sentence｜>" and "<think>" in info["chat_template"]
    assert httpx.get(url + "/version").json()["version"]


def test_openapi_documents_every_status_and_the_event_stream(served):
    url, _ = served
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/tokenize",
        "/v1/detokenize",
        "/version",
    } <= set(paths)
    for route in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[route]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "500"} <= set(responses)
        assert "422" not in responses
        assert "text/event-stream" in responses["200"]["content"]


# ---- lm-evaluation-harness: local-completions must score as its hf backend does ----------------------
TASK = """task: nanoseek_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def lm_eval_loglikelihoods(model: str, model_args: str, task_dir: Path) -> list[float]:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["nanoseek_mc"],
        device="cpu",
        batch_size=1,
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir)),
    )
    samples = sorted(out["samples"]["nanoseek_mc"], key=lambda s: s["doc_id"])
    return [float(r[0][0]) for s in samples for r in s["resps"]]


def test_lm_eval_local_completions_matches_its_hf_backend(checkpoint, served, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    url, _ = served
    data = tmp_path / "mc.jsonl"
    rows = [
        {
            "question": " ".join(WORDS[i : i + 4]),
            "choices": [" " + WORDS[(i + 4 + k) % len(WORDS)] for k in range(3)],
            "label": 0,
        }
        for i in range(6)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    want = lm_eval_loglikelihoods("hf", f"pretrained={checkpoint},dtype=float32", tmp_path)
    assert len(want) == 18 and all(math.isfinite(x) and x < 0 for x in want)
    base = f"model=m,base_url={url}/v1/completions,num_concurrent=1,max_retries=1"
    for extra in (
        f"tokenizer={checkpoint},tokenizer_backend=huggingface",  # token-id prompts
        f"tokenizer={checkpoint},tokenizer_backend=huggingface,tokenized_requests=False",  # text prompts
        "",
    ):  # the server's own /tokenize and /tokenizer_info (lm-eval's remote tokenizer)
        got = lm_eval_loglikelihoods("local-completions", ",".join(filter(None, [base, extra])), tmp_path)
        assert got == pytest.approx(want, abs=1e-3), extra
