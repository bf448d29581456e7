"""SamplingParams and the sampler: penalties, temperature, top-k/top-p/min-p, per-request seeds, logprobs."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .tensors import floats


class InvalidRequest(ValueError):
    """A request the engine cannot serve: `param` names the offending field (the server reports it to the
    client as OpenAI's `param`), `code` a machine-readable reason where one applies."""

    def __init__(self, param: str, reason: str, code: str | None = None):
        super().__init__(f"{param}: {reason}")
        self.param, self.reason, self.code = param, reason, code


@dataclass
class SamplingParams:
    """Per-request generation settings, named as in vLLM/OpenAI. Invalid values raise InvalidRequest."""

    n: int = 1
    temperature: float = 1.0  # 0 (below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: bool = False  # log-prob of each chosen token (under the temperature-scaled distribution)
    top_logprobs: int = 0
    # the model's log-prob of every prompt token after the first, with this many top alternatives (None: off);
    # a request that asks for them computes its whole prompt (a prefix-cache hit holds no logits)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(
        default_factory=dict
    )  # token id -> added to its logit, in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [] if self.stop is None else self.stop
        self.stop_token_ids = [] if self.stop_token_ids is None else self.stop_token_ids
        self.logit_bias = {} if self.logit_bias is None else self.logit_bias
        checks = [
            ("n", is_int(self.n) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", is_number(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", is_int(self.top_k) and self.top_k >= -1, "must be -1, 0 (off) or a positive integer"),
            ("min_p", is_number(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "must be true or false"),
            (
                "presence_penalty",
                is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                "must be in [-2, 2]",
            ),
            (
                "frequency_penalty",
                is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                "must be in [-2, 2]",
            ),
            ("logprobs", isinstance(self.logprobs, bool), "must be true or false"),
            (
                "top_logprobs",
                is_int(self.top_logprobs) and 0 <= self.top_logprobs <= 20,
                "must be in [0, 20]",
            ),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None
                or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
                "must be None or in [0, 20]",
            ),
            (
                "logit_bias",
                isinstance(self.logit_bias, dict)
                and all(
                    is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100
                    for t, b in self.logit_bias.items()
                ),
                "must map token ids (integers >= 0) to numbers in [-100, 100]",
            ),
            (
                "stop",
                isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
                "must be a string or a list of non-empty strings",
            ),
            (
                "stop_token_ids",
                isinstance(self.stop_token_ids, (list, tuple, set))
                and all(is_int(t) for t in self.stop_token_ids),
                "must be a list of integers",
            ),
            (
                "seed",
                self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed <= 2**64 - self.n),
                "must be an integer in [-2**63, 2**64 - n]",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidRequest(name, f"{why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """Below vLLM's 1e-5, a temperature only overflows the scaled logits: such requests are greedy."""
        return self.temperature < 1e-5

    @property
    def penalised(self) -> bool:
        """Presence or frequency penalties: the logits depend on the tokens generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def adjusts_logits(self) -> bool:
        """Penalties or a logit bias: the logits sampled from are not the model's."""
        return self.penalised or bool(self.logit_bias)


def is_number(x: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: object) -> bool:
    """An int that is not a bool (True would pass isinstance(x, int))."""
    return isinstance(x, int) and not isinstance(x, bool)


def apply_penalties(logits: Tensor, output_ids: list[int], params: SamplingParams) -> Tensor:
    """OpenAI's logit bias, then presence/frequency penalties over the tokens generated so far (one row of
    logits)."""
    if params.logit_bias:
        logits = logits.index_add(
            -1,
            torch.tensor(list(params.logit_bias), dtype=torch.long),
            torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype),
        )
    if not output_ids or not params.penalised:
        return logits
    counts = torch.bincount(torch.tensor(output_ids), minlength=logits.shape[-1]).to(logits.dtype)
    return (
        logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    )


def processed_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution actually sampled from: temperature, then top-k, top-p and min-p truncation (fp32)."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = probs.topk(params.top_k).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if params.top_p < 1.0:
        probs = _top_p(probs, params.top_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _top_p(probs: Tensor, top_p: float | Tensor) -> Tensor:
    """Zero all but the smallest most-likely prefix whose mass reaches top_p, per row of [..., V]
    (`top_p` a number, or one per row as [R, 1])."""
    sorted_p, order = probs.sort(descending=True)
    drop_sorted = sorted_p.cumsum(-1) - sorted_p > top_p
    return probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)


@dataclass
class Sample:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def draw(probs: Tensor, generator: random.Random) -> int:
    """Inverse-CDF draw from probs [V] with one uniform from the request's own generator."""
    return _inverse_cdf(probs[None], [generator])[0]


def _inverse_cdf(probs: Tensor, generators: list[random.Random]) -> list[int]:
    """One token per row of probs [R, V], each row drawn with one uniform from its own generator (a Python
    `random.Random` per sequence: a uniform from it is a plain call, where each `torch.Generator` draw
    would be an op of its own)."""
    cdf = probs.cumsum(-1)
    u = floats((g.random() for g in generators), cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)
    tokens = picked.squeeze(1).tolist()
    for r in (probs.gather(1, picked)[:, 0] == 0).nonzero()[:, 0].tolist():  # the float edge of the cdf
        while probs[r, tokens[r]] == 0:
            tokens[r] -= 1
    return tokens


def _annotate(token: int, logits: Tensor, params: SamplingParams) -> Sample:
    """Attach the chosen token's log-prob (under the temperature-scaled distribution) and the top ones."""
    out = Sample(token)
    if params.logprobs or params.top_logprobs:
        logp = torch.log_softmax(logits / (1.0 if params.greedy else params.temperature), -1)
        out.logprob = float(logp[token])
        if params.top_logprobs:
            vals, ids = logp.topk(params.top_logprobs)
            out.top_logprobs = list(zip(ids.tolist(), vals.tolist()))
    return out


def sample(logits: Tensor, params: SamplingParams, output_ids: list[int], generator: random.Random) -> Sample:
    """Pick the next token from one row of logits [V]; randomness comes only from the request's generator,
    so a seeded request samples the same tokens whatever else is in the batch."""
    logits = apply_penalties(logits.float(), output_ids, params)
    token = int(logits.argmax()) if params.greedy else draw(processed_probs(logits, params), generator)
    return _annotate(token, logits, params)


def _plain(params: SamplingParams, vocab: int) -> bool:
    """Sampling that `batch_sample` does for many rows at once: no penalties, bias, top-k, min-p or logprobs."""
    return (
        not params.adjusts_logits
        and not params.min_p
        and not 0 < params.top_k < vocab
        and not params.logprobs
        and not params.top_logprobs
    )


def batch_sample(seqs: list, logits: Tensor) -> list[Sample | None]:
    """The next token of many sequences (each with `.params`, `.generator`, `.draft`; row i of logits
    [R, V] is seqs[i]'s) in a few tensor ops instead of a dozen per row, in seqs' order. Rows with drafts to
    verify or with penalties, a bias, top-k, min-p or logprobs get None: they are left to `sample`. Each row
    stays a function of its own logits and its own generator only (row-wise ops, one uniform per row), so
    seeded requests keep their outputs."""
    out: list[Sample | None] = [None] * len(seqs)
    # decided once per request: its n samples share one SamplingParams
    batchable: dict[int, bool] = {}
    for seq in seqs:
        if id(seq.params) not in batchable:
            batchable[id(seq.params)] = _plain(seq.params, logits.shape[-1])
    plain = [i for i, seq in enumerate(seqs) if not seq.draft and batchable[id(seq.params)]]
    greedy = [i for i in plain if seqs[i].params.greedy]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            out[i] = Sample(t)
    rows = [i for i in plain if not seqs[i].params.greedy]
    if rows:
        drawn = [seqs[i] for i in rows]
        temps = floats(seq.params.temperature for seq in drawn)[:, None]
        probs = torch.softmax((logits if len(rows) == len(seqs) else logits[rows]) / temps, dim=-1)
        top_p = floats(seq.params.top_p for seq in drawn)[:, None]
        if bool((top_p < 1).any()):  # rows at 1.0 keep everything, as in `processed_probs`
            probs = _top_p(probs, top_p.masked_fill(top_p >= 1, float("inf")))
        probs = probs / probs.sum(-1, keepdim=True)
        for i, t in zip(rows, _inverse_cdf(probs, [seq.generator for seq in drawn]), strict=True):
            out[i] = Sample(t)
    return out


def verify_draft(
    logits: Tensor,
    draft: int,
    draft_probs: Tensor | None,
    params: SamplingParams,
    output_ids: list[int],
    generator: random.Random,
) -> tuple[Sample, bool]:
    """Speculative sampling (Leviathan et al. 2023): accept the draft with probability min(1, p/q), else draw
    from the normalised residual max(0, p - q); the output distribution is exactly p. Greedy: accept iff
    the draft is the argmax. Returns the token to emit and whether it was the draft."""
    logits = apply_penalties(logits.float(), output_ids, params)
    if params.greedy:
        token = int(logits.argmax())
        return _annotate(token, logits, params), token == draft
    p = processed_probs(logits, params)
    if generator.random() * draft_probs[draft] < p[draft]:
        return _annotate(draft, logits, params), True
    residual = (p - draft_probs).clamp(min=0)
    token = draw(residual if residual.sum() > 0 else p, generator)
    return _annotate(token, logits, params), False
