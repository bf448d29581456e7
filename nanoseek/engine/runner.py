"""The model runner: the only engine code that runs the model or reads its internals.

A step's rows (each a sequence's next tokens over the paged latent cache) go in; the logits at the positions
sampled from, and what MTP drafting reads, come out. The runner holds the cache tensor, runs the prefill
forward (the last layer only where a token is sampled), the decode forward, MTP's draft and verify forwards
and the prompt log-probs, compiles the decode forwards when asked, and re-derives the weights decoding
computes from the parameters when told that they changed (`weights_changed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import chain

import torch
from torch import Tensor

from ..kernels import FUSED_LINEAR_MAX_ROWS
from ..model import MLA, DecoderLayer, DeepSeekV3, MTPLayer
from .cache import LatentStore, PagedBatch
from .scheduler import Sequence
from .tensors import int64s

# There is a decode graph per kind of batch (one row or several, 1 or 2 tokens a row, masked or not): past
# dynamo's default limit of 8 per function it would quietly run the rest eagerly.
RECOMPILE_LIMIT = 64


class StepRows:
    """One batched forward: each sequence's next `n` tokens (a decode feeds its last token and its drafts, a
    prefill a chunk), the rows that reach the end of their tokens (the others are prefill chunks short of
    it), and the (row, position) pairs sampled from: an ending row's draft positions and its last."""

    def __init__(self, pairs: list[tuple[Sequence, int]], prefill: bool):
        self.prefill = prefill
        self.seqs = [seq for seq, _ in pairs]
        self.lens = [n for _, n in pairs]
        self.starts = [seq.num_computed for seq in self.seqs]
        if prefill:
            self.tokens = [seq.window(seq.num_computed, n) for seq, n in pairs]
            self.ends = [seq.num_computed + n >= seq.num_tokens for seq, n in pairs]
        else:  # a decoding sequence has every token but its last in the cache: it feeds that one and its drafts
            self.tokens = [[seq.last_token, *seq.draft] for seq in self.seqs]
            self.ends = [True] * len(pairs)
        self.emitting = [i for i, end in enumerate(self.ends) if end]
        self.k = [1 + len(self.seqs[i].draft) for i in self.emitting]  # positions sampled from, per row
        self.at = [
            (i, p)
            for i, k in zip(self.emitting, self.k, strict=True)
            for p in range(self.lens[i] - k, self.lens[i])
        ]


@dataclass
class StepOutput:
    logits: Tensor | None  # [len(rows.at), V] fp32 on the CPU, at the positions sampled from (None: none)
    hidden: Tensor | None  # [B, S, d] every position's final state, where computed (MTP drafting reads them)
    drafts: Tensor | None  # [B, S] on the CPU: the greedy MTP draft after each position, where made
    cache: PagedBatch


class ModelRunner:
    """Runs `model` for the engine over a paged latent cache of `cache_memory_mb`. compile=True compiles the
    decode forwards (as vLLM compiles its model): a decode step is a few hundred tiny ops whose dispatch,
    not their arithmetic, costs on CPU; compiled, they fuse. Prefill chunks stay eager: they are
    arithmetic-bound."""

    def __init__(
        self, model: DeepSeekV3, cache_memory_mb: float, block_size: int, speculative: bool, compile: bool
    ):
        if speculative and not model.mtp:
            raise ValueError("speculative: the model has no MTP module to draft with")
        self.model, self.speculative = model, speculative
        dtype = model.lm_head.weight.dtype
        per_block = LatentStore.bytes_per_token(model.config, dtype, speculative) * block_size
        num_blocks = max(int(cache_memory_mb * 2**20) // per_block, 1)
        self.store = LatentStore(model.config, num_blocks, block_size, dtype, model.device, speculative)
        self.num_blocks = num_blocks
        model.prepare("decode", compiled=compile)
        self._mlas = [m for m in model.modules() if isinstance(m, MLA)]
        compiled = self._compiled if compile else lambda fn: fn
        self._decode = compiled(model.hidden_states)
        self._draft_forward = compiled(self._mtp_forward)
        self._greedy_spec_forward = compiled(self._verify_and_draft)
        self.weights_changed()  # the model may have been trained since anything was derived from it

    @staticmethod
    def _compiled(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=True, recompile_limit=RECOMPILE_LIMIT)

    @property
    def in_place(self) -> bool:
        """Whether a step's cache leaves the context in the store: the model's kernels as prepared now (a
        trainer switches them between jobs) read fp32 latents there (kernels.paged), and a row's one query
        takes MLA's absorbed form, the one that reads them."""
        return (
            self.model.kernels.paged_context
            and self.store.data.dtype == torch.float32
            and MLA.absorb_max_queries >= 1
        )

    @property
    def decode_batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes whose decode steps get graphs of their own: one row, a few, and more rows than the
        model's `linear` fuses."""
        return 1, 2, FUSED_LINEAR_MAX_ROWS + 1

    def weights_changed(self) -> None:
        """The parameters were changed in place: re-derive what decoding computes from them (MLA's folded
        absorbed weights), into the tensors compiled graphs read."""
        for mla in self._mlas:
            if mla.folded is not None:
                mla.folded.refold()

    # ---- the step's forward ----------------------------------------------------------------------
    def run(self, rows: StepRows) -> StepOutput:
        """The forward of one step's rows; their latents reach the cache. Greedy speculative decodes draft in
        the same forward; MTP drafting and prompt log-probs need every position's final state, other prefills
        only the sampled ones'."""
        ids = self._ids(rows.tokens)
        tables = [seq.table for seq in rows.seqs]
        cache = PagedBatch(self.store, tables, rows.starts, rows.lens, self.model.device, self.in_place)
        sampled_at = [i for i, _ in rows.at], [p for _, p in rows.at]
        scoring = [
            i
            for i, seq in enumerate(rows.seqs)
            if rows.prefill and seq.prompt_logprobs and not seq.output_ids
        ]
        logits = hidden = drafts = None
        if rows.prefill and not self.speculative and not scoring:
            sampled = self._prefill_last(ids, cache, rows)
        elif (
            not rows.prefill
            and self.speculative
            and all(s.params.greedy and not s.params.adjusts_logits for s in rows.seqs)
        ):
            all_logits, drafts = self._greedy_spec_forward(ids, cache.positions, cache)
            logits, drafts = all_logits[sampled_at], drafts.cpu()
        else:
            hidden = (self.model.hidden_states if rows.prefill else self._decode)(ids, cache.positions, cache)
            # a step of one token a row that samples every row reads them all, without a gather
            every_row = hidden.shape[1] == 1 and len(rows.at) == hidden.shape[0]
            sampled = hidden[:, 0] if every_row else hidden[sampled_at]
            for i in scoring:
                self._score_prompt(rows.seqs[i], rows.starts[i], hidden[i])
        cache.commit()
        if rows.at:  # one head matmul for every position that is sampled
            logits = (self.model.lm_head(sampled) if logits is None else logits).float().cpu()
        return StepOutput(logits, hidden, drafts, cache)

    def _ids(self, tokens: list[list[int]]) -> Tensor:
        """Token lists as one zero-padded [B, S] tensor on the model's device."""
        width = max(len(t) for t in tokens)
        padded = int64s(chain.from_iterable(t + [0] * (width - len(t)) for t in tokens))
        return padded.view(len(tokens), width).to(self.model.device)

    def _score_prompt(self, seq: Sequence, start: int, hidden: Tensor) -> None:
        """Record the log-probs of the prompt tokens that the positions of this prefill chunk predict (the
        model's own distribution: no temperature, penalty or bias), from the chunk's hidden states [S, d]."""
        targets = seq.prompt_ids[start + 1 : start + 1 + hidden.shape[0]]
        if not targets:
            return
        logp = torch.log_softmax(self.model.lm_head(hidden[: len(targets)]).float(), -1).cpu()
        chosen = logp.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        top = logp.topk(k) if k else None
        for j, lp in enumerate(chosen):
            seq.prompt_logprobs[start + 1 + j] = lp
            if top is not None:
                alternatives = zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True)
                seq.prompt_top_logprobs[start + 1 + j] = list(alternatives)

    def _prefill_last(self, ids: Tensor, cache: PagedBatch, rows: StepRows) -> Tensor:
        """A prefill forward that returns final hidden states [len(rows.at), d] only at the positions sampled
        from, one a row: the last layer runs its attention and feed-forward only there."""
        m = self.model
        *layers, last = m.model.layers
        x, freqs = m.model.embed_tokens(ids), m.rope(cache.positions)
        for layer in layers:
            x = layer(x, freqs, cache)
        return m.model.norm(self._layer_at(last, x, freqs, cache, rows, rows.at))

    def _layer_at(
        self,
        layer: DecoderLayer,
        x: Tensor,
        freqs: Tensor,
        cache: PagedBatch,
        rows: StepRows,
        at: list[tuple[int, int]],
    ) -> Tensor:
        """A layer's output [len(at), d] at the (row, position in the chunk) pairs of x [B, S, d] alone. Its
        latents come from its input, so every position's goes to the cache; the attention and feed-forward
        run only where an output is read, against the cache."""
        layer.self_attn.store_latents(layer.input_layernorm(x), freqs, cache)
        cache.commit()
        if not at:
            return x.new_empty(0, x.shape[-1])
        idx = [i for i, _ in at]
        one = PagedBatch(
            self.store,
            [rows.seqs[i].table for i in idx],
            [rows.starts[i] + p for i, p in at],
            [1] * len(at),
            self.model.device,
            self.in_place,
        )
        # an MTP module's input is already combined: its decoder layer's own forward runs it
        block = partial(DecoderLayer.forward, layer) if isinstance(layer, MTPLayer) else layer
        return block(x[idx, [p for _, p in at]][:, None], self.model.rope(one.positions), one)[:, 0]

    # ---- MTP (V3 report §2.2) ----------------------------------------------------------------------
    def draft_logits(
        self, rows: StepRows, out: StepOutput, nexts: list[list[int]], at: list[tuple[int, int]]
    ) -> Tensor | None:
        """Run the MTP layer at the positions the main forward just computed, from their final states and
        the tokens that follow them (`nexts`, a list per row), its latents going to the cache; its logits
        [len(at), V] (fp32, CPU) at the (row, position) pairs `at`, None where there are none."""
        mtp, cache = self.model.mtp[0], out.cache
        next_ids = self._ids(nexts)
        if not rows.prefill:  # a token and its draft: run the layer over both, as the main forward did
            normed = self._draft_forward(out.hidden, next_ids, cache.positions, cache)
            cache.commit()
            if not at:
                return None
            logits = self.model.lm_head(normed[[i for i, _ in at], [p for _, p in at]])
        else:  # every position needs its latent, but only a row's last one a query: it alone runs the layer
            x = mtp.combine(out.hidden, self.model.model.embed_tokens(next_ids))
            last = self._layer_at(mtp, x, self.model.rope(cache.positions), cache, rows, at)
            if not at:
                return None
            logits = self.model.lm_head(mtp.shared_head.norm(last))
        return logits.float().cpu()

    def _verify_and_draft(self, ids: Tensor, positions: Tensor, cache: PagedBatch) -> tuple[Tensor, Tensor]:
        """A speculative decode step of greedy rows as one forward (one compiled graph instead of two, and no
        trip to Python between them): logits [B, S, V] at every position, and the MTP draft [B, S] that
        follows each. Greedy decoding emits each position's argmax, so the MTP layer can be fed it here; at
        the last accepted position, the one a draft is read from, it is the token a separate draft forward
        would feed."""
        hidden = self.model.hidden_states(ids, positions, cache)
        logits = self.model.lm_head(hidden).float()
        normed = self._mtp_forward(hidden, logits.argmax(-1), positions, cache)
        return logits, self.model.lm_head(normed).argmax(-1)

    def _mtp_forward(self, hidden: Tensor, next_ids: Tensor, positions: Tensor, cache: PagedBatch) -> Tensor:
        """The MTP module's normed output [B, S, d] at a step's positions (the head is applied only where a
        draft is read), from the main model's hidden states and the next tokens."""
        mtp = self.model.mtp[0]
        out = mtp(hidden, self.model.model.embed_tokens(next_ids), self.model.rope(positions), cache)
        return mtp.shared_head.norm(out)
