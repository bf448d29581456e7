"""`LLM`: the engine's front — requests in, tokens out, with continuous batching over the paged latent cache.

    llm = LLM("runs/base")
    outs = llm.generate(["1+1="], SamplingParams(temperature=0, max_tokens=8))
    for delta in llm.stream(["2+2="], SamplingParams(max_tokens=8)): print(delta.text, end="")

The server and the RL trainer drive it through `add_request` / `step` / `abort`.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checkpoint import load_model
from ..device import default_dtype, resolve_device
from ..model import DeepSeekV3
from ..tokenizer import load_chat_template, load_tokenizer
from .cache import BlockManager
from .detokenizer import Detokenizer
from .runner import ModelRunner, StepRows
from .sampling import InvalidRequest, Sample, SamplingParams, batch_sample, is_int, is_number, sample
from .scheduler import Scheduler, Sequence
from .speculative import Speculator


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """All samples of one prompt; `.token_ids` / `.text` are the first sample's, for n = 1 convenience."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    # with SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first) and top ones
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text


@dataclass
class StreamDelta:
    """What one step produced for one sample: new token ids and the new text safe to show."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens of this request served from the prefix cache
    # with SamplingParams.prompt_logprobs, on the request's first delta: as in RequestOutput
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


class LLM:
    """Continuous-batching generation over a paged MLA latent cache with prefix caching.

    `model` is a DeepSeekV3 (used where it is) or a checkpoint directory or Hub id, loaded on `device` (see
    `nanoseek.device`; default: a GPU if there is one) in bf16 on a GPU, fp32 on a CPU.
    The engine holds a reference to `model`, not a copy: a trainer that changes its weights in place calls
    `update_weights()`, and the next step uses the new weights.
    """

    def __init__(
        self,
        model: DeepSeekV3 | str | os.PathLike,
        tokenizer=None,
        *,
        cache_memory_mb: float = 256,
        block_size: int = 16,
        max_num_seqs: int = 128,
        max_batched_tokens: int = 1024,
        prefix_caching: bool = True,
        speculative: bool = False,
        compile: bool = False,
        device: str | None = None,
    ):
        for name, value in (
            ("block_size", block_size),
            ("max_num_seqs", max_num_seqs),
            ("max_batched_tokens", max_batched_tokens),
        ):
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not (is_number(cache_memory_mb) and cache_memory_mb > 0):
            raise ValueError(f"cache_memory_mb: must be a finite number > 0, got {cache_memory_mb!r}")
        self.chat_template: str | None = None  # the checkpoint's own (the server renders it), if any
        if not isinstance(model, DeepSeekV3):
            from ..hub import resolve_checkpoint

            resolved = resolve_device(device or "auto")  # refused before anything is downloaded
            model = resolve_checkpoint(model)  # a Hub id: fetched once, for the tokenizer and the weights
            tokenizer = tokenizer or load_tokenizer(model)
            self.chat_template = load_chat_template(model)
            model = load_model(model, device=resolved, dtype=default_dtype(resolved))
        elif device is not None and resolve_device(device) != model.device:
            raise ValueError(f"device: {device!r}, but the model given is on {model.device}; move it first")
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.runner = ModelRunner(model, cache_memory_mb, block_size, speculative, compile)
        self.blocks = BlockManager(self.runner.num_blocks, block_size, prefix_caching)
        self.speculator = Speculator(self.runner) if speculative else None
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_batched_tokens, num_draft=int(speculative))
        self.max_len = self.config.max_position_embeddings
        eos = self.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._requests: dict[str, list[Sequence]] = {}
        self._texts: dict[str, list[Detokenizer]] = {}  # request -> each sample's text
        self._pending_forks: dict[str, list[Sequence]] = {}
        self._tail_copies: list[tuple[int, int, Sequence]] = []  # (parent's tail block, child's, child)
        self._inboxes: dict[str, deque[StreamDelta]] = {}  # request -> its open stream's undelivered deltas
        self._counter = 0

    @property
    def spec_stats(self) -> dict[str, int]:
        """MTP drafts made and accepted (none without speculation)."""
        return self.speculator.stats if self.speculator is not None else {"drafted": 0, "accepted": 0}

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        """A prompt's token ids; raises InvalidRequest for a prompt that is neither text nor valid ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(
                    "prompt",
                    "a text prompt needs a tokenizer; pass token ids or a checkpoint with tokenizer.json",
                )
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        try:
            ids = list(prompt)
        except TypeError:  # e.g. one 0-d tensor out of a tensor of ids passed as a batch
            got = type(prompt).__name__
            raise InvalidRequest("prompt", f"must be a string or a list of token ids, got {got}") from None
        if any(not isinstance(t, int) or not 0 <= t < self.config.vocab_size for t in ids):
            raise InvalidRequest("prompt", f"token ids must be integers in [0, {self.config.vocab_size})")
        return ids

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the parameter if this request cannot be served; changes nothing."""
        if not ids:
            raise InvalidRequest("prompt", "must not be empty")
        if params.stop and self.tokenizer is None:
            raise InvalidRequest(
                "stop", "stop strings need a tokenizer; use stop_token_ids with token-id prompts"
            )
        if len(ids) >= self.max_len:
            raise InvalidRequest(
                "prompt",
                f"the prompt is {len(ids)} tokens; the context holds {self.max_len}",
                code="context_length_exceeded",
            )
        if any(t >= self.config.vocab_size for t in params.logit_bias):
            raise InvalidRequest("logit_bias", f"token ids must be in [0, {self.config.vocab_size})")
        if params.max_tokens > self.max_len:
            raise InvalidRequest(
                "max_tokens", f"{params.max_tokens} exceeds the context of {self.max_len} tokens"
            )
        if min(params.max_tokens, self.max_len - len(ids)) > self.room(len(ids)):
            raise InvalidRequest(
                "max_tokens", f"prompt + max_tokens exceeds the cache capacity of {self.capacity} tokens"
            )

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds: one sequence can never grow past it."""
        return len(self.blocks.ref) * self.blocks.block_size

    def room(self, prompt_len: int) -> int:
        """The most tokens a prompt of this length can be given, by the context and by the cache."""
        return min(self.max_len, self.capacity) - prompt_len

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a prompt; raises InvalidRequest naming the parameter for bad input, leaving others
        untouched."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_request(ids, params)
        if request_id is None:
            request_id = f"req-{self._counter}"
            self._counter += 1
        if request_id in self._requests:
            raise InvalidRequest("request_id", f"{request_id!r} is already in use")
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        # modulo 2**64, as torch's manual_seed: random.Random would seed -k like k
        seqs = [
            Sequence(request_id, i, ids, params, random.Random((base_seed + i) % 2**64))
            for i in range(params.n)
        ]
        if params.prompt_logprobs is not None:  # computed by the first sample; the others fork from it
            seqs[0].prompt_logprobs, seqs[0].prompt_top_logprobs = [None] * len(ids), [[] for _ in ids]
        self._requests[request_id] = seqs
        self._texts[request_id] = [Detokenizer(self.tokenizer, params.stop) for _ in seqs]
        self.scheduler.add(seqs[0])
        if params.n > 1:  # the other samples fork from the first once its prompt is in the cache
            self._pending_forks[request_id] = seqs[1:]
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its cache blocks are freed at once."""
        for seq in self._requests.pop(request_id, []):
            if not seq.finished:
                seq.finish_reason = "abort"
            self.scheduler.finish(seq)
        self._texts.pop(request_id, None)
        self._pending_forks.pop(request_id, None)

    def update_weights(self) -> None:
        """Call after changing the model's weights in place (a trainer, after each optimizer step): what the
        engine derived from them is derived again, and the cached prompt latents are dropped."""
        self.runner.weights_changed()
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix; sequences in flight hold latents that are never shared."""
        self.blocks.reset_hashes()
        pending = [child for children in self._pending_forks.values() for child in children]
        for seq in self.scheduler.running + list(self.scheduler.waiting) + pending:
            seq.sealed = (1 << 62, None)  # their latents may be stale: never register their blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one engine step -----------------------------------------------------------------------
    @torch.inference_mode()  # cheaper per op than no_grad; nothing a step makes is ever differentiated
    def step(self) -> list[StreamDelta]:
        """Schedule; then for the batch's decodes and for its prefills: run the model, sample, emit. Returns
        what each sample streams, for every request but those of `generate`."""
        batch = self.scheduler.schedule()
        deltas: list[StreamDelta] = []
        decodes = [(seq, 1 + len(seq.draft)) for seq in batch.decodes]  # a decode feeds its drafts too
        for pairs, prefill in ((decodes, False), (batch.prefills, True)):
            if not pairs:
                continue
            rows = StepRows(pairs, prefill)
            out = self.runner.run(rows)
            for seq, n, end in zip(rows.seqs, rows.lens, rows.ends, strict=True):
                if not end:  # a prefill chunk short of the end
                    seq.num_computed += n
            deltas += self._sample(rows, out.logits)
            for seq in rows.seqs:
                if not seq.finished:
                    self.scheduler.seal(seq)
            if self.speculator is not None:
                self.speculator.draft(rows, out)
            for src, dst, child in self._tail_copies:  # now that every layer (MTP too) wrote its latents
                if not child.finished:
                    self.runner.store.copy_block(src, dst)
            self._tail_copies.clear()
        for d in deltas:  # a stream may be waiting for it while another one (or generate) steps the engine
            if (inbox := self._inboxes.get(d.request_id)) is not None:
                inbox.append(d)
        return deltas

    def _sample(self, rows: StepRows, logits: Tensor | None) -> list[StreamDelta]:
        """Tokens for the rows that reached their end, from the logits [len(rows.at), V] at their sampled
        positions: MTP drafts verified, the other rows' next tokens drawn together in a few tensor ops
        (`batch_sample`; `sample` for the rows it leaves), and so are the first tokens of the samples that
        fork from a prompt just prefilled."""
        if not rows.emitting:
            return []
        seqs = [rows.seqs[i] for i in rows.emitting]
        ends = list(itertools.accumulate(rows.k))
        drafted = len(rows.at) > len(rows.k)  # some rows have several positions: the last is sampled
        last = logits[[end - 1 for end in ends]] if drafted else logits
        drawn = batch_sample(seqs, last)
        deltas, forks = [], []
        for j, (i, seq) in enumerate(zip(rows.emitting, seqs, strict=True)):
            if seq.draft:
                emitted = self.speculator.verify(seq, logits[ends[j] - rows.k[j] : ends[j]])
            else:
                emitted = [drawn[j] or sample(last[j], seq.params, seq.output_ids, seq.generator)]
            # positions computed: the tokens fed in, less the rejected drafts (the cache's tail is rewritten)
            seq.num_computed += rows.lens[i] - len(seq.draft) + len(emitted) - 1
            seq.draft = []
            if not seq.output_ids:  # the prompt is in the cache: the other samples fork from it now, before
                for child in self._pending_forks.pop(seq.request_id, []):  # a first token may finish seq
                    self._fork(seq, child)
                    forks.append((child, j))
            deltas.append(self._append(seq, emitted))
        if forks:  # each child's first token, from its parent's logits
            children = [child for child, _ in forks]
            first = batch_sample(children, last[[j for _, j in forks]])
            for (child, j), s in zip(forks, first, strict=True):
                deltas.append(self._append(child, [s or sample(last[j], child.params, [], child.generator)]))
        return [d for d in deltas if d is not None]  # generate's requests stream nothing

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """Give child the parent's prompt cache: full blocks shared, the partial tail block copied (at the end
        of the forward's step, once the MTP layer has written its latents too)."""
        full, tail = divmod(len(parent.prompt_ids), self.blocks.block_size)
        child.num_cached_prompt = parent.num_cached_prompt
        if len(self.scheduler.running) >= self.scheduler.max_num_seqs or (tail and not self.blocks.num_free):
            # no decode slot, or no block for its copy of the tail: wait like any request (and find the
            # prompt's full blocks in the prefix cache)
            self.scheduler.requeue(child)
            return
        child.table = self.blocks.fork(parent.table[:full])
        child.num_computed, child.admitted = len(parent.prompt_ids), True
        if tail:
            self.blocks.grow(child.table, child.num_computed)  # the one free block checked above
            self._tail_copies.append((parent.table[full], child.table[full], child))
        self.scheduler.running.append(child)

    def _append(self, seq: Sequence, samples: list[Sample]) -> StreamDelta | None:
        """Append sampled tokens up to the first stop condition, and return what to stream (None for the
        requests of `generate`, which reads their results at the end)."""
        p, text = seq.params, self._texts[seq.request_id][seq.index]
        new, text_delta = [], ""
        first = not seq.output_ids
        for s in samples:
            seq.output_ids.append(s.token)
            new.append(s.token)
            if s.logprob is not None:
                seq.logprobs.append(s.logprob)
            if s.top_logprobs is not None:
                seq.top_logprobs.append(s.top_logprobs)
            if (not p.ignore_eos and s.token in self.eos_ids) or s.token in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_len:
                seq.finish_reason = "length"
            if text.incremental or seq.finished:  # the text leaves out a stop (or EOS) token
                text_delta += text.update(
                    seq.output_ids[:-1] if seq.finish_reason == "stop" else seq.output_ids, seq.finished
                )
                if text.stopped:
                    seq.finish_reason = "stop"
            if seq.finished:
                break
        if seq.finished:
            self.scheduler.finish(seq)
        if not text.stream:
            return None
        delta = StreamDelta(
            seq.request_id,
            seq.index,
            new,
            text_delta,
            seq.finish_reason,
            seq.logprobs[-len(new) :] if p.logprobs else [],
            seq.top_logprobs[-len(new) :] if p.top_logprobs else [],
            seq.num_cached_prompt,
        )
        if first and seq.prompt_logprobs:
            delta.prompt_logprobs, delta.prompt_top_logprobs = seq.prompt_logprobs, seq.prompt_top_logprobs
        return delta

    # ---- batch and streaming fronts --------------------------------------------------------------
    def stream(
        self, prompts: str | Seq[int] | Iterable[str | Seq[int]], params: SamplingParams | None = None
    ) -> Iterator[StreamDelta]:
        """Yield deltas as they are produced, for the given prompts only. Closing the iterator aborts them.
        Streams may be interleaved: each step's deltas wait in the inbox of the stream they belong to."""
        ids: list[str] = []
        inbox: deque[StreamDelta] = deque()
        try:
            for p in _as_list(prompts):  # a bad prompt aborts the ones added before it (finally)
                ids.append(self.add_request(p, params))
                self._inboxes[ids[-1]] = inbox
            while True:
                while inbox:
                    yield inbox.popleft()
                if not any(not s.finished for r in ids for s in self._requests.get(r, [])):
                    return
                self.step()
        finally:
            for r in ids:
                self.abort(r)
                self._inboxes.pop(r, None)

    def warm_up(self) -> None:
        """Run every kind of decode batch once — each batch size with a graph of its own, of one length (no
        attention bias) and of different lengths; speculative greedy and sampled rows (which draft in forwards
        of their own) — so that with compile=True their graphs are built now rather than during the first
        requests (a graph built mid-load stalls every stream for seconds)."""
        kinds = [
            SamplingParams(temperature=t, max_tokens=4, ignore_eos=True, seed=0)
            for t in ((0.0, 1.0) if self.speculator is not None else (0.0,))
        ]
        stats = dict(self.spec_stats)  # drafts for made-up prompts say nothing about the model
        for params in kinds:
            for rows in self.runner.decode_batch_sizes:
                for extra in (0, 1) if rows > 1 else (0,):
                    self.generate([[1, 2, 3] + [4] * (extra * i) for i in range(rows)], params)
        self.spec_stats.update(stats)

    def generate(
        self,
        prompts: str | Seq[int] | Iterable[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for a batch of prompts (one SamplingParams for all, or one each); outputs in prompt
        order."""
        prompts = _as_list(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequest("params", "one SamplingParams per prompt, or a single one")
        ids = []
        try:
            for p, sp in zip(prompts, plist, strict=True):
                ids.append(self.add_request(p, sp))
                for text in self._texts[ids[-1]]:
                    text.stream = False  # the text is read only at the end
            while any(not s.finished for r in ids for s in self._requests[r]):
                self.step()
            return [self._result(r) for r in ids]
        finally:
            for r in ids:
                self.abort(r)

    def _result(self, request_id: str) -> RequestOutput:
        seqs, texts = self._requests[request_id], self._texts[request_id]
        outs = [
            CompletionOutput(
                s.index, list(s.output_ids), t.text, s.finish_reason, list(s.logprobs), list(s.top_logprobs)
            )
            for s, t in zip(seqs, texts, strict=True)
        ]
        out = RequestOutput(request_id, list(seqs[0].prompt_ids), outs, seqs[0].num_cached_prompt)
        first = seqs[0]
        if first.prompt_logprobs:
            out.prompt_logprobs, out.prompt_top_logprobs = first.prompt_logprobs, first.prompt_top_logprobs
        return out


def _as_list(prompts) -> list:
    one_of_ids = isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
    if isinstance(prompts, str) or one_of_ids:
        return [prompts]
    return list(prompts)
