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
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence as Seq

import torch
from torch import Tensor

from ..checkpoint import load_model
from ..kernels import FUSED_LINEAR_MAX_ROWS
from ..model import MLA, DecoderLayer, DeepSeekV3, MTPLayer
from ..tokenizer import load_chat_template, load_tokenizer
from .cache import BlockManager, LatentStore, PagedBatch
from .sampling import (Sample, SamplingParams, apply_penalties, batch_sample, draw, is_int, is_number,
                       processed_probs, sample, verify_draft)
from .scheduler import Scheduler, Sequence


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

    The engine holds a reference to `model`, not a copy: weights updated in place (by a trainer) are
    used from the next step on.
    """

    def __init__(self, model: DeepSeekV3 | str | os.PathLike, tokenizer=None, *, cache_memory_mb: float = 256,
                 block_size: int = 16, max_num_seqs: int = 128, max_batched_tokens: int = 1024,
                 prefix_caching: bool = True, speculative: bool = False, compile: bool = False):
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_batched_tokens", max_batched_tokens)):
            if not (is_int(value) and value >= 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not (is_number(cache_memory_mb) and cache_memory_mb > 0):
            raise ValueError(f"cache_memory_mb: must be a finite number > 0, got {cache_memory_mb!r}")
        self.chat_template: str | None = None  # the checkpoint's own (the server renders it), if loaded from one
        if not isinstance(model, DeepSeekV3):
            from ..hub import resolve_checkpoint
            model = resolve_checkpoint(model)  # a Hub id: fetched once, for the tokenizer and the weights
            tokenizer = tokenizer or load_tokenizer(model)
            self.chat_template = load_chat_template(model)
            model = load_model(model)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        if speculative and not model.mtp:
            raise ValueError("speculative: the model has no MTP module to draft with")
        dtype = model.lm_head.weight.dtype
        per_block = LatentStore.bytes_per_token(self.config, dtype, speculative) * block_size
        num_blocks = max(int(cache_memory_mb * 2**20) // per_block, 1)
        self.store = LatentStore(self.config, num_blocks, block_size, dtype, model.device, speculative)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.speculative = speculative
        # compile=True: torch.compile the decode forwards (as vLLM compiles its model). A decode step is a few
        # hundred tiny ops whose dispatch, not their arithmetic, costs on CPU; compiled, they fuse. Prefill
        # chunks stay eager: they are arithmetic-bound. There is a graph per kind of batch (one row or
        # several, 1 or 2 tokens a row, masked or not): past dynamo's default limit of 8 per function it
        # would quietly run the rest eagerly.
        model.prepare("decode", compiled=compile)
        if compile:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._decode_forward = torch.compile(model.hidden_states, dynamic=True) if compile else model.hidden_states
        # a compiled step reads MLA's folded weights as they are: refresh them eagerly before each step
        self._folds = [m for m in model.modules() if isinstance(m, MLA)] if compile else []
        self._draft_forward = torch.compile(self._mtp_forward, dynamic=True) if compile else self._mtp_forward
        self._greedy_spec_forward = (torch.compile(self._verify_and_draft, dynamic=True) if compile
                                     else self._verify_and_draft)
        self.spec_stats = {"drafted": 0, "accepted": 0}
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_batched_tokens, num_draft=int(speculative))
        self.max_len = self.config.max_position_embeddings
        eos = self.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._requests: dict[str, list[Sequence]] = {}
        self._pending_forks: dict[str, list[Sequence]] = {}
        self._tail_copies: list[tuple[int, int, Sequence]] = []  # (parent's tail block, child's, child)
        self._inboxes: dict[str, deque[StreamDelta]] = {}  # request -> its open stream's undelivered deltas
        self._counter = 0

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; pass token ids or a checkpoint with tokenizer.json")
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        try:
            ids = list(prompt)
        except TypeError:  # e.g. one 0-d tensor out of a tensor of ids passed as a batch
            raise ValueError(f"prompt: must be a string or a list of token ids, got {type(prompt).__name__}") from None
        if any(not isinstance(t, int) or not 0 <= t < self.config.vocab_size for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {self.config.vocab_size})")
        return ids

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the parameter if this request cannot be served; changes nothing."""
        if not ids:
            raise ValueError("prompt: must not be empty")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt: {len(ids)} tokens, the context holds {self.max_len}")
        if any(t >= self.config.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {self.config.vocab_size})")
        if params.max_tokens > self.max_len:
            raise ValueError(f"max_tokens: {params.max_tokens} exceeds the context of {self.max_len} tokens")
        if min(params.max_tokens, self.max_len - len(ids)) > self.room(len(ids)):
            raise ValueError(f"max_tokens: prompt + max_tokens exceeds the cache capacity of {self.capacity} tokens")

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds: one sequence can never grow past it."""
        return len(self.blocks.ref) * self.blocks.block_size

    def room(self, prompt_len: int) -> int:
        """The most tokens a prompt of this length can be given, by the context and by the cache."""
        return min(self.max_len, self.capacity) - prompt_len

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt; raises ValueError naming the parameter for bad input, leaving others untouched."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_request(ids, params)
        if request_id is None:
            request_id = f"req-{self._counter}"
            self._counter += 1
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        base_seed = params.seed if params.seed is not None else random.getrandbits(62)
        # modulo 2**64, as torch's manual_seed: random.Random would seed -k like k
        seqs = [Sequence(request_id, i, ids, params, random.Random((base_seed + i) % 2**64))
                for i in range(params.n)]
        if params.prompt_logprobs is not None:  # the first sample computes the prompt; the others fork from it
            seqs[0].prompt_logprobs, seqs[0].prompt_top_logprobs = [None] * len(ids), [[] for _ in ids]
        self._requests[request_id] = seqs
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
        self._pending_forks.pop(request_id, None)

    def reset_prefix_cache(self) -> None:
        """Call after changing the model's weights in place: cached prompt latents are no longer valid,
        and weights derived from the parameters are refreshed (their version counters are moved, for
        in-place kernels that do not)."""
        torch.autograd.graph.increment_version(list(self.model.parameters()))
        self.blocks.reset_hashes()
        pending = [child for children in self._pending_forks.values() for child in children]
        for seq in self.scheduler.running + list(self.scheduler.waiting) + pending:
            seq.sealed = (1 << 62, None)  # sequences in flight hold stale latents: never share their blocks

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one engine step -----------------------------------------------------------------------
    @torch.inference_mode()  # cheaper per op than no_grad; nothing a step makes is ever differentiated
    def step(self) -> list[StreamDelta]:
        """Schedule, run one batched decode forward and one batched prefill forward, sample, stream."""
        batch = self.scheduler.schedule()
        deltas: list[StreamDelta] = []
        for mla in self._folds:
            mla.folded_weights()
        decodes = [(s, 1 + len(s.draft)) for s in batch.decodes]
        for rows, prefill in ((decodes, False), (batch.prefills, True)):
            if not rows:
                continue
            seqs = [seq for seq, _ in rows]
            starts = [seq.num_computed for seq in seqs]
            tokens = [seq.window(st, n) for (seq, n), st in zip(rows, starts)]  # decodes feed their drafts
            cache = PagedBatch(self.store, [seq.table for seq in seqs], starts, [n for _, n in rows], self.model.device)
            ends = [seq.num_computed + n >= seq.num_tokens for seq, n in rows]  # else a prefill chunk short of it
            # (row, seq, tokens fed) of the sequences that reach their end, and the positions sampled from (the
            # drafts' and the last)
            emitting = [(i, seq, n) for i, ((seq, n), end) in enumerate(zip(rows, ends)) if end]
            k = [1 + len(seq.draft) for _, seq, _ in emitting]
            at = [(i, p) for (i, _, n), kk in zip(emitting, k) for p in range(n - kk, n)]
            ids = self._ids(tokens)
            sampled_at = [i for i, _ in at], [p for _, p in at]
            logits = drafts = None  # (the greedy speculative forward returns both)
            scoring = [i for i, seq in enumerate(seqs) if prefill and seq.prompt_logprobs and not seq.output_ids]
            # MTP drafting and prompt logprobs need every position's final state
            if prefill and not self.speculative and not scoring:
                sampled = self._prefill_last(ids, cache, seqs, starts, at)
            elif not prefill and self.speculative and all(s.params.greedy and not s.params.adjusts_logits for s in seqs):
                all_logits, drafts = self._greedy_spec_forward(ids, cache.positions, cache)
                logits = all_logits[sampled_at]
            else:
                hidden = (self.model.hidden_states if prefill else self._decode_forward)(ids, cache.positions, cache)
                sampled = hidden[sampled_at]
                for i in scoring:
                    self._score_prompt(seqs[i], starts[i], hidden[i])
            cache.commit()
            for (seq, n), end in zip(rows, ends):
                if not end:
                    seq.num_computed += n
            if emitting:  # one head matmul for every position that is sampled
                logits = (self.model.lm_head(sampled) if logits is None else logits).float().cpu()
                last = logits[[end - 1 for end in itertools.accumulate(k)]] if len(at) > len(k) else logits
                fast = batch_sample([seq for _, seq, _ in emitting], last)
                for (_, seq, n), lg in zip(emitting, logits.split(k)):
                    deltas += self._emit(seq, lg, n, fast.get(id(seq)))
            for seq in seqs:
                if not seq.finished:
                    self.scheduler.seal(seq)
            if drafts is not None:
                drafts = drafts.cpu()
                for i, pos, seq in self._drafting(seqs, starts):
                    seq.draft, seq.draft_probs = [int(drafts[i, pos])], None
            elif self.speculative:
                self._draft(seqs, starts, hidden, cache, prefill)
            for src, dst, child in self._tail_copies:  # now that every layer (MTP too) wrote this step's latents
                if not child.finished:
                    self.store.copy_block(src, dst)
            self._tail_copies.clear()
        for d in deltas:  # a stream may be waiting for it while another one (or generate) steps the engine
            if (inbox := self._inboxes.get(d.request_id)) is not None:
                inbox.append(d)
        return deltas

    def _ids(self, tokens: list[list[int]]) -> Tensor:
        """Token lists as one zero-padded [B, S] tensor on the model's device."""
        width = max(len(t) for t in tokens)
        return torch.tensor([t + [0] * (width - len(t)) for t in tokens], device=self.model.device)

    def _score_prompt(self, seq: Sequence, start: int, hidden: Tensor) -> None:
        """Record the log-probs of the prompt tokens that the positions of this prefill chunk predict (the
        model's own distribution: no temperature, penalty or bias), from the chunk's hidden states [S, d]."""
        targets = seq.prompt_ids[start + 1:start + 1 + hidden.shape[0]]
        if not targets:
            return
        logp = torch.log_softmax(self.model.lm_head(hidden[:len(targets)]).float(), -1).cpu()
        chosen = logp.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        top = logp.topk(k) if k else None
        for j, lp in enumerate(chosen):
            seq.prompt_logprobs[start + 1 + j] = lp
            if top is not None:
                seq.prompt_top_logprobs[start + 1 + j] = list(zip(top.indices[j].tolist(), top.values[j].tolist()))

    def _prefill_last(self, ids: Tensor, cache: PagedBatch, seqs: list[Sequence], starts: list[int],
                      at: list[tuple[int, int]]) -> Tensor:
        """A prefill forward that returns final hidden states [len(at), d] only at the (row, position) pairs
        sampled from, one a row: the last layer runs its attention and feed-forward only there (a
        1000-token prompt's TTFT 22% lower)."""
        m = self.model
        *layers, last = m.model.layers
        x, freqs = m.model.embed_tokens(ids), m.rope(cache.positions)
        for layer in layers:
            x = layer(x, freqs, cache)
        return m.model.norm(self._layer_at(last, x, freqs, cache, seqs, starts, at))

    def _layer_at(self, layer: DecoderLayer, x: Tensor, freqs: Tensor, cache: PagedBatch, seqs: list[Sequence],
                  starts: list[int], at: list[tuple[int, int]]) -> Tensor:
        """A layer's output [len(at), d] at the (row, position in the chunk) pairs of x [B, S, d] alone. Its
        latents come from its input, so every position's goes to the cache; the attention and feed-forward
        run only where an output is read, against the cache."""
        layer.self_attn.store_latents(layer.input_layernorm(x), freqs, cache)
        cache.commit()
        if not at:
            return x.new_empty(0, x.shape[-1])
        rows = [i for i, _ in at]
        one = PagedBatch(self.store, [seqs[i].table for i in rows], [starts[i] + p for i, p in at], [1] * len(at),
                         self.model.device)
        block = layer.block if isinstance(layer, MTPLayer) else layer  # the MTP input is already combined
        return block(x[rows, [p for _, p in at]][:, None], self.model.rope(one.positions), one)[:, 0]

    def _draft(self, seqs: list[Sequence], starts: list[int], hidden: Tensor, cache: PagedBatch,
               prefill: bool) -> None:
        """MTP (V3 report §2.2): fill the MTP layer's cache at the positions the main forward just
        computed, from (h_i, token_{i+1}), and draft the next-next token of every decoding sequence.

        It reuses the main forward's batch view: a position past a rejected draft (or past the end) gets
        a placeholder next token, and its slot is rewritten next step, as the main layers' slots are."""
        s = hidden.shape[1]
        nexts = self._ids([(seq.window(st + 1, s) + [0] * s)[:s] for seq, st in zip(seqs, starts)])  # drafts spent
        mtp = self.model.mtp[0]
        rows = self._drafting(seqs, starts)
        if not prefill:  # a token and its draft: run the layer over both, as the main forward did
            normed = self._draft_forward(hidden, nexts, cache.positions, cache)
            cache.commit()
            if not rows:
                return
            logits = self.model.lm_head(normed[[i for i, _, _ in rows], [p for _, p, _ in rows]])
        else:  # every position needs its latent but only a row's last one a query, so that one alone runs
            # the layer (the whole layer over a long prompt costs a quarter of its TTFT)
            x = mtp.combine(hidden, self.model.model.embed_tokens(nexts))
            at = [(i, p) for i, p, _ in rows]
            last = self._layer_at(mtp, x, self.model.rope(cache.positions), cache, seqs, starts, at)
            if not rows:
                return
            logits = self.model.lm_head(mtp.shared_head.norm(last))
        for (_, _, seq), lg in zip(rows, logits.float().cpu()):
            lg = apply_penalties(lg, seq.output_ids, seq.params)
            if seq.params.greedy:
                seq.draft, seq.draft_probs = [int(lg.argmax())], None
            else:
                seq.draft_probs = processed_probs(lg, seq.params)
                seq.draft = [draw(seq.draft_probs, seq.generator)]

    @staticmethod
    def _drafting(seqs: list[Sequence], starts: list[int]) -> list[tuple[int, int, Sequence]]:
        """(row, position in the forward, sequence) of those to draft for after a forward, the position being
        the last computed one, which a draft follows: nothing while prefilling or finished, before the first
        token (sampled plainly, whatever the chunking), or where a draft survived preemption (verified as it
        was, for seeded sampling)."""
        return [(i, seq.num_computed - 1 - st, seq) for i, (seq, st) in enumerate(zip(seqs, starts))
                if not seq.finished and seq.num_computed == seq.num_tokens - 1 and seq.output_ids and not seq.draft]

    def _verify_and_draft(self, ids: Tensor, positions: Tensor, cache: PagedBatch) -> tuple[Tensor, Tensor]:
        """A speculative decode step of greedy rows as one forward (one compiled graph instead of two, and no
        trip to Python between them): logits [B, S, V] at every position, and the MTP draft [B, S] that
        follows each. Greedy decoding emits each position's argmax, so the MTP layer can be fed it here; at
        the last accepted position, the one a draft is read from, it is the token `_draft` would feed."""
        hidden = self.model.hidden_states(ids, positions, cache)
        logits = self.model.lm_head(hidden).float()
        normed = self._mtp_forward(hidden, logits.argmax(-1), positions, cache)
        return logits, self.model.lm_head(normed).argmax(-1)

    def _mtp_forward(self, hidden: Tensor, next_ids: Tensor, positions: Tensor, cache: PagedBatch) -> Tensor:
        """The MTP module's normed output [B, S, d] at a step's positions (the head is applied only where a
        draft is read), from the main model's hidden states and the next tokens."""
        mtp = self.model.mtp[0]
        return mtp.shared_head.norm(mtp(hidden, self.model.model.embed_tokens(next_ids), self.model.rope(positions),
                                        cache))

    def _emit(self, seq: Sequence, logits: Tensor, fed: int, sampled: Sample | None = None) -> list[StreamDelta]:
        """Turn the logits [drafts + 1, V] of the last positions of the `fed` tokens into tokens: verify
        MTP drafts, then sample one more (`sampled`: already drawn by `batch_sample`)."""
        emitted: list[Sample] = []
        for j, d in enumerate(seq.draft):
            s, ok = verify_draft(logits[j], d, seq.draft_probs, seq.params,
                                 seq.output_ids + [x.token for x in emitted], seq.generator)
            emitted.append(s)
            self.spec_stats["drafted"] += 1
            self.spec_stats["accepted"] += ok
            if not ok:
                break
        else:
            emitted.append(sampled or sample(logits[-1], seq.params, seq.output_ids + [x.token for x in emitted],
                                             seq.generator))
        # positions computed: the tokens fed in, less the rejected drafts (the tail of the cache is rewritten)
        seq.num_computed += fed - len(seq.draft) + len(emitted) - 1
        seq.draft = []
        out = []
        if not seq.output_ids:  # the prompt is in the cache: the other samples fork from it now
            for child in self._pending_forks.pop(seq.request_id, []):
                self._fork(seq, child)
                out.append(self._append(child, [sample(logits[0], child.params, [], child.generator)]))
        return [self._append(seq, emitted)] + out

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

    def _append(self, seq: Sequence, samples: list[Sample]) -> StreamDelta:
        """Append sampled tokens up to the first stop condition, and return what to stream."""
        p = seq.params
        new, text_delta = [], ""
        first = not seq.output_ids
        incremental = seq.stream_text or bool(p.stop)  # a stop string may end the text before a draft's token
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
            if incremental:
                text_delta += self._update_text(seq)
            if seq.finished:
                break
        if seq.finished:
            if not incremental and self.tokenizer is not None:
                seq.text = self.tokenizer.decode(self._text_ids(seq), skip_special_tokens=False)
            self.scheduler.finish(seq)
        delta = StreamDelta(seq.request_id, seq.index, new, text_delta, seq.finish_reason,
                            seq.logprobs[-len(new):] if p.logprobs else [],
                            seq.top_logprobs[-len(new):] if p.top_logprobs else [], seq.num_cached_prompt)
        if first and seq.prompt_logprobs:
            delta.prompt_logprobs, delta.prompt_top_logprobs = seq.prompt_logprobs, seq.prompt_top_logprobs
        return delta

    def _update_text(self, seq: Sequence) -> str:
        """Detokenise incrementally and return the text safe to stream: broken UTF-8 and a tail that may
        start a stop string are held back.

        Only the new tokens are decoded, with the last complete window before them for context (as vLLM
        does), so a step costs the same at token 10 and at token 10,000; `text` grows only by whole
        characters until the sequence finishes."""
        if self.tokenizer is None:
            return ""
        ids = self._text_ids(seq)
        before = self.tokenizer.decode(ids[seq.prefix_offset:seq.read_offset], skip_special_tokens=False)
        after = self.tokenizer.decode(ids[seq.prefix_offset:], skip_special_tokens=False)
        if len(after) > len(before):
            new = after[len(before):]
            whole = seq.finished or not new.endswith("\ufffd")  # else a character still lacks bytes
            start, text = len(seq.text), seq.text + (new if whole else new.rstrip("\ufffd"))
            for stop in seq.params.stop:  # only where the new text could complete a stop string
                at = text.find(stop, max(start - len(stop) + 1, 0))
                if at >= 0:
                    text, seq.finish_reason = text[:at], "stop"
            if whole or seq.finished:  # a stop string ends the text even before a split character completes
                seq.text = text
                seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        safe = len(seq.text)
        if not seq.finished:
            for stop in seq.params.stop:
                for k in range(min(len(stop) - 1, safe - seq.sent_text), 0, -1):
                    if seq.text[safe - k:safe] == stop[:k]:
                        safe -= k
                        break
        delta, seq.sent_text = seq.text[seq.sent_text:safe], max(seq.sent_text, safe)
        return delta

    @staticmethod
    def _text_ids(seq: Sequence) -> list[int]:
        """The output tokens that make its text: all but a stop (or EOS) token."""
        return seq.output_ids[:-1] if seq.finish_reason == "stop" else seq.output_ids

    # ---- batch and streaming fronts --------------------------------------------------------------
    def stream(self, prompts: str | Seq[int] | Iterable[str | Seq[int]],
               params: SamplingParams | None = None) -> Iterator[StreamDelta]:
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
        """Run every kind of decode batch once — one row; a few rows and more than a few (`linear` has a
        graph for each), of one length (no attention bias) and of different lengths; speculative greedy
        and sampled rows (which draft in forwards of their own) — so that with compile=True their graphs
        are built now rather than during the first requests (a graph built mid-load stalls every stream
        for seconds)."""
        kinds = [SamplingParams(temperature=t, max_tokens=4, ignore_eos=True, seed=0)
                 for t in ((0.0, 1.0) if self.speculative else (0.0,))]
        stats = dict(self.spec_stats)  # drafts for made-up prompts say nothing about the model
        for params in kinds:
            self.generate([[1, 2, 3]], params)
            for rows in (2, FUSED_LINEAR_MAX_ROWS + 1):
                for extra in (0, 1):
                    self.generate([[1, 2, 3] + [4] * (extra * i) for i in range(rows)], params)
        self.spec_stats.update(stats)

    def generate(self, prompts: str | Seq[int] | Iterable[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for a batch of prompts (one SamplingParams for all, or one each); outputs in prompt order."""
        prompts = _as_list(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("params: one SamplingParams per prompt, or a single one")
        ids = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp))
                for seq in self._requests[ids[-1]]:
                    seq.stream_text = False
            while any(not s.finished for r in ids for s in self._requests[r]):
                self.step()
            return [self._result(r) for r in ids]
        finally:
            for r in ids:
                self.abort(r)

    def _result(self, request_id: str) -> RequestOutput:
        seqs = self._requests[request_id]
        outs = [CompletionOutput(s.index, list(s.output_ids), s.text, s.finish_reason, list(s.logprobs),
                                 list(s.top_logprobs)) for s in seqs]
        out = RequestOutput(request_id, list(seqs[0].prompt_ids), outs, seqs[0].num_cached_prompt)
        if seqs[0].prompt_logprobs:
            out.prompt_logprobs, out.prompt_top_logprobs = seqs[0].prompt_logprobs, seqs[0].prompt_top_logprobs
        return out


def _as_list(prompts) -> list:
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)
