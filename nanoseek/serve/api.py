"""The OpenAI/DeepSeek-compatible HTTP API (REFERENCE §9) and the chat page, over one shared engine.

    app = create_app(LLM("runs/rl"), served_model_name="nanoseek")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Bad input is answered in the OpenAI error shape with a 4xx status and never disturbs other requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator
from starlette.exceptions import HTTPException

from .. import __version__
from ..engine import LLM, InvalidRequest, SamplingParams
from ..engine.llm import StreamDelta
from ..tokenizer import (
    BOS,
    CHAT_TEMPLATE,
    END_THINK,
    EOS,
    PAD,
    THINK,
    compile_chat_template,
    render_chat,
    token_bytes,
)
from .async_engine import AsyncEngine, EngineError
from .metrics import Metrics
from .reasoning import ThinkParser, opens_reasoning

log = logging.getLogger("nanoseek.serve")
STATIC = Path(__file__).parent / "static"


# ---- errors ------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _refused(e: InvalidRequest, names: dict[str, str] | None = None) -> APIError:
    """The engine's refusal as a 400 naming the request's field: `names` maps the engine's field names to
    the request's where they differ (a chat's prompt is its `messages`)."""
    param = (names or {}).get(e.param, e.param)
    return APIError(400, f"{param}: {e.reason}", param=param, code=e.code)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


# ---- request schema ----------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI-compatible servers do

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """Clients send null for parameters left unset (the openai client does): the default applies."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text"] = "text"


# Request fields that change nothing a client gets back from this server: accepted and ignored, as OpenAI's
# API ignores them for such models. Any other field the schema does not name is refused (400 naming it),
# unless it holds the value that means "not used".
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
UNUSED_VALUES: dict[str, tuple] = {
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "suffix": ("",),
    "best_of": (1,),
}


MAX_PROMPTS = 64  # prompts in one /completions request


class _Sampling(_Lenient):
    """Types and the API's own limits; SamplingParams checks the values (its errors name the field)."""

    model_config = ConfigDict(extra="allow")  # so that `refuse_unimplemented` sees the fields it must refuse

    model: str | None = None
    temperature: float = Field(1.0, le=2)  # OpenAI's limit
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, le=16)  # choices per request
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0  # extensions, as in vLLM's server
    min_p: float = 0.0
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        """JSON keys are strings: OpenAI's are token ids written in decimal."""
        if bias and not all(k.isdecimal() for k in bias):
            raise ValueError("keys must be token ids (decimal integers as strings)")
        return bias

    def refuse_unimplemented(self) -> None:
        """400 naming the first field this server does not implement, rather than answering as if it did."""
        for name, value in (self.model_extra or {}).items():
            unused = value in UNUSED_VALUES.get(name, ()) or (name == "best_of" and value == self.n)
            if name not in IGNORED_FIELDS and not unused:
                raise APIError(
                    400, f"{name}: not supported by this server", param=name, code="unsupported_parameter"
                )

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """The DeepSeek API's limit of 16 (one string is one stop); each is searched for after every token."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 16 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 16 stop sequences of at most 256 characters each")
        return stop


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    # a string, a list of strings, a list of token ids or a list of token-id lists, as OpenAI accepts
    prompt: str | list[str] | list[Annotated[int, Strict()]] | list[list[Annotated[int, Strict()]]]
    logprobs: int | None = None  # legacy: how many top log-probs per token
    echo: bool = False  # the prompt leads the text and, with logprobs, the log-probs

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, prompt: Any, handler) -> Any:
        """One message for any wrong shape (pydantic's would list every member of the union)."""
        try:
            prompt = handler(prompt)
        except ValueError:
            prompt = None
        if prompt is None or prompt == [] or (_batched(prompt) and len(prompt) > MAX_PROMPTS):
            raise ValueError(
                f"must be a string, a list of strings, a list of token ids or a list of token-id "
                f"lists (1 to {MAX_PROMPTS} prompts)"
            )
        return prompt

    def prompts(self) -> list[str | list[int]]:
        return list(self.prompt) if _batched(self.prompt) else [self.prompt]


def _batched(prompt: str | list) -> bool:
    """A list of prompts; a list of token ids is one prompt, however long."""
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


class _Model(_Lenient):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    refuse_unimplemented = _Sampling.refuse_unimplemented


class TokenizeRequest(_Model):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # the tokenizer adds none: accepted for vLLM's clients
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Model):
    tokens: list[Annotated[int, Strict()]]


def _error_schema(description: str) -> dict:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                        }
                    },
                }
            }
        },
    }


# every status a route may answer, in the OpenAI error shape, so the schema tells clients (and fuzzers) the truth
ERROR_RESPONSES: dict[int | str, dict] = {
    400: _error_schema("Invalid request: a bad field, value or prompt (the field is named in `param`)."),
    401: _error_schema("Missing or wrong API key (when the server has one)."),
    404: _error_schema("Unknown model or route."),
    413: _error_schema("The request body is too large."),
    429: _error_schema("Too many requests in flight; retry later."),
    500: _error_schema("The engine failed while generating."),
}
STREAM_RESPONSE: dict[int | str, dict] = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events: `data: {chunk}` lines, then "
        "`data: [DONE]`.",
        "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
    }
}


# ---- one request in flight ---------------------------------------------------------------------------
class _Choice:
    def __init__(self, in_reasoning: bool):
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.parser = ThinkParser(in_reasoning)


class Generation:
    """An engine request as a handler sees it: deltas in, per-choice state, usage and metrics out."""

    def __init__(self, server: Server, prompt_ids: list[int], params: SamplingParams, in_reasoning: bool):
        self.server, self.prompt_ids, self.in_reasoning = server, prompt_ids, in_reasoning
        self.choices = [_Choice(in_reasoning) for _ in range(params.n)]
        self.arrived, self.first_token_at = time.perf_counter(), None
        self.num_cached = 0
        self.prompt_logprobs: list[float | None] = []  # with SamplingParams.prompt_logprobs
        self.prompt_top_logprobs: list[list[tuple[int, float]]] = []
        self.request_id, self.queue = server.submit(prompt_ids, params)
        self.done = self.closed = self.failed = False

    async def deltas(self, request: Request | None = None) -> AsyncIterator[StreamDelta]:
        """Deltas until every choice finished. Given `request`, also stop when its client goes away (asked
        every quarter second, whether or not tokens keep coming)."""
        check_at = time.perf_counter()
        while True:
            if request is not None and time.perf_counter() >= check_at:
                if await request.is_disconnected():
                    return
                check_at = time.perf_counter() + 0.25
            try:
                item = await asyncio.wait_for(self.queue.get(), 0.25) if request else await self.queue.get()
            except asyncio.TimeoutError:
                continue
            if item is None:
                self.done = True
                return
            if isinstance(item, EngineError):
                self.failed = True
                raise APIError(500, str(item), type="server_error")
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
                self.server.metrics.observe(
                    "nanoseek_time_to_first_token_seconds", self.first_token_at - self.arrived
                )
            c = self.choices[item.index]
            c.token_ids += item.token_ids
            c.text += item.text
            c.logprobs += item.logprobs
            c.top_logprobs += item.top_logprobs
            c.finish_reason = item.finish_reason
            self.num_cached = item.num_cached_tokens
            if item.prompt_logprobs:
                self.prompt_logprobs, self.prompt_top_logprobs = (
                    item.prompt_logprobs,
                    item.prompt_top_logprobs,
                )
            yield item

    async def finish(self, request: Request) -> None:
        """Consume every delta (non-streaming responses), aborting if the client goes away."""
        try:
            async for _ in self.deltas(request):
                pass
        finally:
            self.close()

    def close(self) -> None:
        """Abort if unfinished (client gone, engine failure) and record the request's metrics, once."""
        if self.closed:
            return
        self.closed = True
        m = self.server.metrics
        if not self.done:
            self.server.engine.abort(self.request_id)
            m.inc("nanoseek_requests_total", label="error" if self.failed else "abort")
            return
        m.inc("nanoseek_requests_total", label=self.choices[0].finish_reason or "stop")
        m.inc("nanoseek_prompt_tokens_total", len(self.prompt_ids))
        m.inc("nanoseek_prompt_cache_hit_tokens_total", self.num_cached)
        m.inc("nanoseek_generation_tokens_total", sum(len(c.token_ids) for c in self.choices))
        n_out = len(self.choices[0].token_ids)
        if n_out > 1 and self.first_token_at is not None:
            m.observe(
                "nanoseek_time_per_output_token_seconds",
                (time.perf_counter() - self.first_token_at) / (n_out - 1),
            )

    def usage(self) -> dict[str, Any]:
        completion = sum(len(c.token_ids) for c in self.choices)
        reasoning = sum(self.server.reasoning_tokens(c.token_ids, self.in_reasoning) for c in self.choices)
        prompt = len(self.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_cache_hit_tokens": self.num_cached,
            "prompt_cache_miss_tokens": prompt - self.num_cached,
            "prompt_tokens_details": {"cached_tokens": self.num_cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }


# ---- the server --------------------------------------------------------------------------------------
class Server:
    """What the routes share: the engine thread, tokenizer, limits and metrics."""

    def __init__(self, llm: LLM, served_model_name: str, max_pending: int, chat_template: str | None = None):
        if llm.tokenizer is None:
            raise ValueError("model: serving needs a tokenizer; the checkpoint has no tokenizer.json")
        self.llm, self.tokenizer, self.name = llm, llm.tokenizer, served_model_name
        # the Jinja template chat requests render: the one given, else the checkpoint's, else the built-in one
        if chat_template is None:
            chat_template = getattr(llm, "chat_template", None)
        self.chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
        try:
            compile_chat_template(self.chat_template)  # refuse a broken template before serving anything
        except ValueError as e:
            raise ValueError(f"chat_template: {e}") from None
        self.max_pending = max_pending
        self.engine = AsyncEngine(llm)
        self.end_think = self.tokenizer.token_to_id(END_THINK)
        self.think = self.tokenizer.token_to_id(THINK)
        self.added_ids = set(self.tokenizer.get_added_tokens_decoder())  # token_bytes per logprob token
        # no token spells more bytes than this: a longer prompt cannot fit the context, encoded or not
        self.max_prompt_bytes = llm.max_len * max(
            len(token_bytes(self.tokenizer, i, self.added_ids))
            for i in range(self.tokenizer.get_vocab_size())
        )
        self.created = int(time.time())
        stats = self.engine.stats
        self.metrics = Metrics(
            {
                "nanoseek_requests_running": ("Sequences being generated.", lambda: stats()["running"]),
                "nanoseek_requests_waiting": (
                    "Sequences queued for the engine (queue depth).",
                    lambda: stats()["waiting"],
                ),
                "nanoseek_cache_blocks_used": (
                    "Latent-cache blocks held by requests.",
                    lambda: stats()["blocks_used"],
                ),
                "nanoseek_cache_blocks_total": (
                    "Latent-cache blocks in all.",
                    lambda: stats()["blocks_total"],
                ),
            }
        )

    def submit(self, prompt_ids: list[int], params: SamplingParams):
        if self.engine.num_requests >= self.max_pending:
            self.metrics.inc("nanoseek_requests_total", label="rejected")
            raise APIError(
                429,
                f"the server is busy ({self.max_pending} requests in flight); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        try:
            return self.engine.add(prompt_ids, params)
        except InvalidRequest as e:
            raise _refused(e) from None

    async def encode(self, text: str, param: str) -> list[int]:
        """A prompt's token ids, off the event loop (a megabyte prompt takes seconds to encode and would
        stall every stream); 400 for text that is not valid Unicode."""
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise APIError(
                400, f"{param}: the text is not valid Unicode (a lone surrogate)", param=param
            ) from None
        if size > self.max_prompt_bytes:
            raise APIError(
                400,
                f"{param}: the prompt is {size} bytes, more than the {self.llm.max_len}-token "
                "context can hold",
                param=param,
                code="context_length_exceeded",
            )
        return (await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=False)).ids

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """Messages through the chat template; 400 when the template refuses them (its raise_exception)."""
        try:
            return render_chat(
                [m.as_dict() for m in messages], add_generation_prompt, template=self.chat_template
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(
                404,
                f"The model {model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )

    def params(
        self,
        req: _Sampling,
        ids: list[int],
        max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int,
        prompt_logprobs: int | None = None,
        names: dict[str, str] | None = None,
    ) -> SamplingParams:
        """The engine's SamplingParams for one prompt, checked by the engine as the request will be (before
        any prompt of the request is queued); 400 naming the request's field (see `_refused`)."""
        room = self.llm.max_len - len(ids)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            params = SamplingParams(
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                max_tokens=max(self.llm.room(len(ids)), 1) if max_tokens is None else max_tokens,
                ignore_eos=req.ignore_eos,
                stop=stop,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                seed=req.seed,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                prompt_logprobs=prompt_logprobs,
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            )
            if max_tokens is not None and 0 < room < max_tokens:  # OpenAI refuses what the context would cut
                # short (a prompt that does not fit at all is the engine's to refuse)
                why = (
                    f"{max_tokens} plus the {len(ids)}-token prompt exceeds the context of "
                    f"{self.llm.max_len} tokens"
                )
                raise InvalidRequest("max_tokens", why, code="context_length_exceeded")
            self.llm.check_request(ids, params)
        except InvalidRequest as e:
            raise _refused(e, names) from None
        return params

    def reasoning_tokens(self, ids: list[int], in_reasoning: bool) -> int:
        if not in_reasoning and not (ids and ids[0] == self.think):
            return 0
        return ids.index(self.end_think) + 1 if self.end_think in ids else len(ids)

    def token_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(self.tokenizer, token_id, self.added_ids)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def chat_logprobs(
        self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]]
    ) -> dict | None:
        if not lps:
            return None
        content = []
        for i, (t, lp) in enumerate(zip(ids, lps)):
            entry = self.token_logprob(t, lp)
            entry["top_logprobs"] = [self.token_logprob(a, b) for a, b in tops[i]] if i < len(tops) else []
            content.append(entry)
        return {"content": content}

    def completion_logprobs(
        self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]], offset: int
    ) -> dict | None:
        if not lps:
            return None
        tokens = [self.token_logprob(t, 0.0)["token"] for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "text_offset": offsets,  # a prompt's first top is null
            "top_logprobs": [
                {self.token_logprob(a, 0.0)["token"]: b for a, b in top} if top else None for top in tops
            ]
            or None,
        }

    def echoed(
        self, gen: Generation, prompt: str, c: _Choice, logprobs: bool, offset: int = 0
    ) -> tuple[str, dict | None]:
        """A choice's text and logprobs with the prompt in front (`echo`): the prompt tokens' log-probs come
        first, the first one null, as OpenAI returns them."""
        if not logprobs:
            return prompt + c.text, None
        head = self.completion_logprobs(gen.prompt_ids, gen.prompt_logprobs, gen.prompt_top_logprobs, offset)
        tail = self.completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs, offset + len(prompt))
        if tail is not None:
            head = {k: head[k] + tail[k] for k in ("tokens", "token_logprobs", "text_offset")} | {
                "top_logprobs": head["top_logprobs"] + (tail["top_logprobs"] or [None] * len(tail["tokens"]))
            }
        return prompt + c.text, head


class BodyLimit:
    """413 for a body over the limit, declared or (chunked) counted as it arrives; a plain ASGI middleware,
    so streamed responses pass through untouched (`BaseHTTPMiddleware` would copy every chunk)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body exceeds {self.max_bytes} bytes"
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            return await APIError(413, too_large, code="request_too_large").response()(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        return await self.app(scope, receive if size is not None else counted, send)


class BearerAuth:
    """401 for an API request (/v1/..., or one of `paths` without the prefix) without `Authorization: Bearer KEY` (constant-time compare), before its body is
    read: a client without the key learns nothing about its request (as with OpenAI's API and vLLM)."""

    def __init__(self, app, api_key: str, paths: frozenset[str]):
        self.app, self.key, self.paths = app, api_key.encode(), paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] in self.paths):
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = APIError(
                    401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key"
                )
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(
    llm: LLM,
    *,
    served_model_name: str = "nanoseek",
    api_key: str | None = None,
    max_pending: int = 256,
    max_body_bytes: int = 2 * 2**20,
    chat_template: str | None = None,
) -> FastAPI:
    """The FastAPI app; the engine thread starts and stops with the app's lifespan. `chat_template`: Jinja
    source for chat prompts (default: the checkpoint's tokenizer_config.json, else the built-in R1 one)."""
    server = Server(llm, served_model_name, max_pending, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(
        title="nanoseek",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI/DeepSeek-compatible API for a nanoseek model.",
    )
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        param = _loc(tuple(err.get("loc", ()))[1:]) or None
        msg = "the request body must be a JSON object" if param is None else f"{param}: {err.get('msg')}"
        kind = request.headers.get("content-type", "")
        if param is None and "json" not in kind:  # FastAPI reads a body as JSON only when it says so
            msg += f" sent with Content-Type: application/json (got {kind or 'none'!r})"
        return APIError(400, msg, param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return APIError(
            e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None
        ).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("unhandled error")
        return APIError(500, "internal server error", type="server_error").response()

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.get("/health")
    async def health():
        alive = server.engine.alive
        return JSONResponse(
            {"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    # The OpenAI-style routes answer with and without the /v1 prefix (DeepSeek's documented base URL has none)
    api = APIRouter(responses=ERROR_RESPONSES)

    @api.get("/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": server.name,
                    "object": "model",
                    "created": server.created,
                    "owned_by": "nanoseek",
                    "max_model_len": llm.max_len,
                }
            ],
        }

    @api.post("/chat/completions", responses=STREAM_RESPONSE)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        req.refuse_unimplemented()
        prompt = server.render(req.messages)
        ids = await server.encode(prompt, "messages")
        in_reasoning = opens_reasoning(prompt)  # else the model may still open `<think>` itself
        limit = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        params = server.params(
            req,
            ids,
            getattr(req, limit),
            req.logprobs or bool(req.top_logprobs),
            req.top_logprobs or 0,
            names={"prompt": "messages", "max_tokens": limit},
        )
        gen = Generation(server, ids, params, in_reasoning)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if req.stream:
            head["object"] = "chat.completion.chunk"
            return _streaming([gen], _chat_stream(server, gen, head), head, req)
        await gen.finish(request)
        choices = []
        for i, c in enumerate(gen.choices):
            reasoning, content = c.parser.feed(c.text, final=True)
            message = {"role": "assistant", "content": content}
            if in_reasoning or reasoning:
                message["reasoning_content"] = reasoning
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "finish_reason": c.finish_reason,
                    "logprobs": server.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs),
                }
            )
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": gen.usage(),
            "system_fingerprint": None,
        }

    @api.post("/completions", responses=STREAM_RESPONSE)
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        req.refuse_unimplemented()
        prompts, texts, ids = req.prompts(), [], []
        for p in prompts:  # every prompt is checked before any is queued
            try:
                ids.append(await server.encode(p, "prompt") if isinstance(p, str) else llm.encode(p))
            except InvalidRequest as e:  # token ids outside the vocabulary
                raise _refused(e) from None
            texts.append(p if isinstance(p, str) else server.tokenizer.decode(p, skip_special_tokens=False))
        k = req.logprobs
        names = {"top_logprobs": "logprobs", "prompt_logprobs": "logprobs"}  # the legacy field holds both
        params = [
            server.params(
                req,
                i,
                req.max_tokens,
                k is not None,
                k or 0,
                k if req.echo and k is not None else None,
                names,
            )
            for i in ids
        ]
        gens: list[Generation] = []
        try:
            for i, sp in zip(ids, params):
                gens.append(Generation(server, i, sp, in_reasoning=False))
        except APIError:
            for g in gens:
                g.close()
            raise
        echo = texts if req.echo else None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}
        if req.stream:
            head["object"] = "text_completion"
            return _streaming(gens, _completion_stream(server, gens, head, echo, k is not None), head, req)
        try:
            await asyncio.gather(*(g.finish(request) for g in gens))
        finally:
            for g in gens:
                g.close()
        choices = []
        for p, gen in enumerate(gens):
            for i, c in enumerate(gen.choices):
                text, logprobs = (
                    server.echoed(gen, echo[p], c, k is not None)
                    if echo
                    else (c.text, server.completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs, 0))
                )
                choices.append(
                    {
                        "index": p * len(gen.choices) + i,
                        "text": text,
                        "finish_reason": c.finish_reason,
                        "logprobs": logprobs,
                    }
                )
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(gens)}

    @api.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        req.refuse_unimplemented()
        if req.prompt is not None:
            ids = await server.encode(req.prompt, "prompt")
        else:
            ids = await server.encode(server.render(req.messages, req.add_generation_prompt), "messages")
        strs = [server.token_logprob(t, 0.0)["token"] for t in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": llm.max_len, "tokens": ids, "token_strs": strs}

    @api.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        req.refuse_unimplemented()
        vocab = server.tokenizer.get_vocab_size()
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens: token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": server.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @api.get("/tokenizer_info")
    async def tokenizer_info():
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": llm.max_len,
            "chat_template": server.chat_template,
        }

    @app.get("/version")
    async def version():
        return {"version": __version__}

    app.include_router(api, prefix="/v1")
    app.include_router(api, include_in_schema=False)
    if api_key is not None:  # added last: runs first
        app.add_middleware(BearerAuth, api_key=api_key, paths=frozenset(r.path for r in api.routes))
    schema = app.openapi

    def openapi() -> dict:
        """FastAPI lists 422 for every body; this server answers validation errors with 400 (as OpenAI does)."""
        if app.openapi_schema is None:
            for path in schema()["paths"].values():
                for op in path.values():
                    op["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _chat_stream(server: Server, gen: Generation, head: dict) -> AsyncIterator[str]:
    """SSE chunks: the role, then `reasoning_content` deltas, then `content` deltas, finish."""

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        return _sse(
            {
                **head,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                ],
            }
        )

    for i in range(len(gen.choices)):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for d in gen.deltas():
        c = gen.choices[d.index]
        thinking = c.parser.in_reasoning  # these tokens' part: `</think>` itself still counts as reasoning
        reasoning, content = c.parser.feed(d.text, final=d.finish_reason is not None)
        logprobs = server.chat_logprobs(d.token_ids, d.logprobs, d.top_logprobs)
        if reasoning:
            yield chunk(d.index, {"reasoning_content": reasoning}, logprobs=None if content else logprobs)
        if content:
            yield chunk(d.index, {"content": content}, logprobs=logprobs)
        elif (
            logprobs and not reasoning
        ):  # tokens whose text is held back: logprobs go with the part they are in
            yield chunk(d.index, {"reasoning_content" if thinking else "content": ""}, logprobs=logprobs)
        if d.finish_reason is not None:
            yield chunk(d.index, {}, d.finish_reason)


async def _completion_stream(
    server: Server, gens: list[Generation], head: dict, echo: list[str] | None, logprobs: bool
) -> AsyncIterator[str]:
    """Each prompt's choices in turn (all of them are generated at once; later ones wait in their queues).
    With `echo`, a choice's first chunk is its prompt, sent with its first tokens (whose delta carries the
    prompt's log-probs)."""

    def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> str:
        return _sse(
            {
                **head,
                "choices": [
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
                ],
            }
        )

    for p, gen in enumerate(gens):
        offsets, echoed = [0] * len(gen.choices), [echo is None] * len(gen.choices)
        async for d in gen.deltas():
            index = p * len(gen.choices) + d.index
            if not echoed[d.index]:
                prompt, lp = server.echoed(gen, echo[p], _Choice(False), logprobs)
                yield chunk(index, prompt, lp, None)
                offsets[d.index], echoed[d.index] = len(prompt), True
            lp = server.completion_logprobs(d.token_ids, d.logprobs, d.top_logprobs, offsets[d.index])
            offsets[d.index] += len(d.text)
            yield chunk(index, d.text, lp, d.finish_reason)


def _usage(gens: list[Generation]) -> dict[str, Any]:
    """The usage of several prompts' generations, summed field by field."""

    def add(a: Any, b: Any) -> Any:
        return {k: add(v, b[k]) for k, v in a.items()} if isinstance(a, dict) else a + b

    total = gens[0].usage()
    for gen in gens[1:]:
        total = add(total, gen.usage())
    return total


def _streaming(
    gens: list[Generation], chunks: AsyncIterator[str], head: dict, req: _Sampling
) -> StreamingResponse:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_event_stream(gens, chunks, head, include_usage), media_type="text/event-stream")


async def _event_stream(
    gens: list[Generation], chunks: AsyncIterator[str], head: dict, include_usage: bool
) -> AsyncIterator[str]:
    """The envelope both streaming endpoints share: their chunks, an error event if the engine fails,
    the usage chunk when asked for, then [DONE]; the request is closed (aborted if unfinished) in any case."""
    try:
        try:
            async for c in chunks:
                yield c
        except APIError as e:
            yield _sse(e.body())
            return
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(gens)})
        yield _sse("[DONE]")
    finally:
        for gen in gens:
            gen.close()


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` under uvicorn on a thread (port 0: a free port) and yield its URL; for tests, benchmarks
    and notebooks. The socket is bound before the thread starts, so there is no race for the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
