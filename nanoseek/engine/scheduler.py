"""Sequences and the continuous-batching scheduler: decodes first, then chunked prefills, preempt the newest.

Every step, each running sequence that is decoding gets one token slot (plus draft slots for MTP
speculation); prefills then fill the remaining token budget in chunks, so a long prompt never stalls the
others. When the cache cannot hold a decode, the newest running sequence is preempted: its blocks are
freed and it is recomputed later from its prompt plus what it has generated so far.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import torch

from .cache import BlockManager
from .sampling import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sample being generated. `tokens` = prompt + output; `num_computed` of them are in the cache."""

    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    generator: random.Random  # the sample's own randomness: seed + index
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(
        default_factory=list
    )  # by position; filled as it is prefilled
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    table: list[int] = field(default_factory=list)
    num_computed: int = 0
    sealed: tuple[int, bytes | None] = (0, None)  # blocks hashed for the prefix cache, last hash
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache (first admission)
    admitted: bool = False
    preempted: bool = False  # recomputed blocks of its own are not prefix-cache hits
    finish_reason: str | None = None
    draft: list[int] = field(default_factory=list)  # MTP draft tokens awaiting verification
    draft_probs: torch.Tensor | None = None  # the distribution the draft was sampled from
    seq_id: int = field(default_factory=lambda: next(_ids))

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def window(self, start: int, n: int) -> list[int]:
        """(tokens + draft)[start:start + n] without building the whole list: a decode step reads only its
        last token and drafts, so its cost must not grow with the sequence."""
        p, o, end = len(self.prompt_ids), len(self.output_ids), start + n
        return (
            self.prompt_ids[start:end]
            + self.output_ids[max(start - p, 0) : max(end - p, 0)]
            + self.draft[max(start - p - o, 0) : max(end - p - o, 0)]
        )

    @property
    def last_token(self) -> int:
        """The newest token: the one a decode step feeds."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_tokens - 1 or not self.admitted


@dataclass
class Batch:
    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]  # (sequence, number of tokens to compute this step)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batched_tokens: int, num_draft: int = 0):
        self.blocks = blocks
        self.max_num_seqs, self.max_batched_tokens, self.num_draft = (
            max_num_seqs,
            max_batched_tokens,
            num_draft,
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        decodes: list[Sequence] = []
        partial: list[Sequence] = []  # partially prefilled: they continue before new prompts start
        budget = self.max_batched_tokens
        for seq in list(self.running):
            if seq.prefilling:  # (a preempted sequence is no longer admitted: prefilling again)
                if seq.admitted:
                    partial.append(seq)
                continue
            need = seq.num_tokens + self.num_draft  # slots for the last token and the drafts
            # (preemption takes the newest sequences, never one this loop has passed)
            while not self.blocks.grow(seq.table, need):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.admitted:  # not the victim of its own growth
                decodes.append(seq)
                budget -= 1 + self.num_draft
        prefills: list[tuple[Sequence, int]] = []
        for seq in partial:
            if budget <= 0:
                break
            n = self._chunk(seq, budget)
            if n:
                prefills.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.admitted:
                # the prompt's logprobs need its every position computed: no prefix-cache hit before them
                scoring = seq.params.prompt_logprobs is not None and not seq.output_ids
                seq.table = self.blocks.match_prefix([] if scoring else seq.tokens[:-1])
                seq.num_computed = len(seq.table) * self.blocks.block_size
                if not (seq.output_ids or seq.preempted):  # its first admission
                    seq.num_cached_prompt = seq.num_computed
                seq.admitted = True
            if (
                seq.draft and not seq.prefilling
            ):  # a kept draft's sequence, all its tokens cached: decodes next
                self.waiting.popleft()
                self.running.append(seq)
                continue
            n = self._chunk(seq, budget)
            if not n:  # no room yet: give back the prefix blocks so running sequences can use them
                self._evict(seq)
                break
            self.waiting.popleft()
            self.running.append(seq)
            prefills.append((seq, n))
            budget -= n
        return Batch(decodes, prefills)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq's prompt(+output) to compute now, with cache room for them; 0 if none fit. A
        draft kept through preemption stops the recompute before the last token: the decode step then
        feeds that token and the draft, and verifies it as it would have been."""
        n = min(seq.num_tokens - bool(seq.draft) - seq.num_computed, budget)
        while n > 0 and not self.blocks.grow(seq.table, seq.num_computed + n):
            n -= self.blocks.block_size
        return max(n, 0)

    def _evict(self, seq: Sequence) -> None:
        """Drop seq's cache; it will be recomputed from its prompt plus its output so far. An MTP draft is
        kept: its sampling already drew from the request's generator."""
        self.blocks.release(seq.table)
        seq.num_computed, seq.admitted, seq.sealed = 0, False, (0, None)

    def requeue(self, seq: Sequence) -> None:
        self._evict(seq)
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.requeue(seq)
        seq.preempted = True
        self.num_preemptions += 1

    def seal(self, seq: Sequence) -> None:
        """Hash the blocks filled since the last call, reading only their tokens (called every step)."""
        done, bs = seq.sealed[0], self.blocks.block_size
        full = seq.num_computed // bs
        if full > done:
            seq.sealed = self.blocks.seal(seq.table, seq.window(done * bs, (full - done) * bs), *seq.sealed)

    def finish(self, seq: Sequence) -> None:
        """Remove seq, keeping its computed blocks findable by later prompts that share them."""
        self.seal(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.table)
