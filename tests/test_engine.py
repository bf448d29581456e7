import random

import pytest
import torch
from conftest import random_model, require_cxx_compiler

from nanoseek import LLM, ModelConfig, SamplingParams
from nanoseek.engine.cache import LatentStore


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return random_model(ModelConfig.preset("tiny"))


def naive_greedy(model, prompt, n):
    """Full recompute every step over the plain model: the reference for the cache and the scheduler."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def prompts(k, seed=0, lo=2, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        for _ in range(k)
    ]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


# prefill chunks: all short (absorbed attention); long ones after cached context, padded rows, and one
# fresh unpadded prompt (decompressed: masked, then plain causal)
@pytest.mark.parametrize("budget,hi,n", [(32, 60, 4), (100, 150, 4), (256, 60, 4), (256, 150, 1)])
def test_greedy_matches_naive_recompute(model, budget, hi, n):
    llm = LLM(model, block_size=4, max_batched_tokens=budget)
    ps = prompts(n, hi=hi)
    for p, out in zip(ps, llm.generate(ps, GREEDY)):
        assert out.token_ids == naive_greedy(model, p, 12)
        assert out.outputs[0].finish_reason == "length"


def test_alone_equals_in_batch_of_32(model):
    ps = prompts(32, seed=3)
    batched = LLM(model, block_size=8).generate(ps, GREEDY)
    for i in [0, 7, 31]:
        alone = LLM(model, block_size=8).generate([ps[i]], GREEDY)[0]
        assert alone.token_ids == batched[i].token_ids


def test_prefix_cache_on_off_identical_and_reports_hits(model):
    shared = prompts(1, seed=5, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(3, seed=6, lo=2, hi=10)]
    on, off = LLM(model, block_size=4), LLM(model, block_size=4, prefix_caching=False)
    first = on.generate(ps[0], GREEDY)[0]
    assert first.num_cached_tokens == 0
    rest_on, rest_off = on.generate(ps[1:], GREEDY), off.generate(ps[1:], GREEDY)
    assert [o.token_ids for o in rest_on] == [o.token_ids for o in rest_off]
    assert all(o.num_cached_tokens == 40 for o in rest_on)
    assert all(o.num_cached_tokens == 0 for o in rest_off)


def test_preemption_under_tiny_cache_is_exact(model):
    ps = prompts(6, seed=7, lo=20, hi=30)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    roomy = LLM(model, block_size=4).generate(ps, params)
    per_token = LatentStore.bytes_per_token(model.config, torch.float32)
    tight = LLM(model, block_size=4, cache_memory_mb=70 * per_token / 2**20)  # room for ~1.2 sequences
    assert tight.capacity == 68
    assert tight.runner.store.data.shape[0] == model.config.num_hidden_layers  # no MTP layer
    outs = tight.generate(ps, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.blocks.num_free == len(tight.blocks.ref)  # nothing leaked
    # a request preempted mid-prefill recomputes its own blocks: that is no prefix-cache hit
    llm = LLM(model, block_size=4, max_batched_tokens=8, cache_memory_mb=48 * per_token / 2**20)
    llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(30):
        llm.step()
    late = llm.add_request(prompts(1, seed=99, lo=20, hi=21)[0], SamplingParams(temperature=0, max_tokens=4))
    while llm.has_unfinished():
        llm.step()
    assert llm.scheduler.num_preemptions > 0 and llm._result(late).num_cached_tokens == 0


def test_chunked_prefill_does_not_stall_decoding(model):
    llm = LLM(model, block_size=4, max_batched_tokens=16)
    short = llm.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    llm.step()
    long = llm.add_request(prompts(1, seed=8, lo=200, hi=201)[0], GREEDY)
    steps_with_short_token = 0
    for _ in range(8):  # the 200-token prompt needs ~13 steps of 16-token chunks
        deltas = llm.step()
        steps_with_short_token += any(d.request_id == short for d in deltas)
        assert not any(d.request_id == long for d in deltas)
    assert steps_with_short_token == 8


def test_seeded_sampling_reproducible_regardless_of_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=15, seed=123, ignore_eos=True)
    ps = prompts(8, seed=9)
    alone = LLM(model).generate([ps[2]], params)[0].token_ids
    mixed = LLM(model).generate(
        ps,
        [SamplingParams(temperature=0.7, max_tokens=9)] * 2
        + [params]
        + [SamplingParams(temperature=1.2, max_tokens=20)] * 5,
    )
    assert mixed[2].token_ids == alone
    other = (
        LLM(model)
        .generate(
            [ps[2]],
            SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=15, seed=124, ignore_eos=True),
        )[0]
        .token_ids
    )
    assert other != alone
    # negative seeds are seeds of their own (modulo 2**64): -1's three samples and 7 vs -7 all differ
    hot = dict(temperature=1.5, max_tokens=15, ignore_eos=True)
    three = [
        o.token_ids for o in LLM(model).generate([ps[2]], SamplingParams(n=3, seed=-1, **hot))[0].outputs
    ]
    assert len({tuple(t) for t in three}) == 3
    assert (
        LLM(model).generate([ps[2]], SamplingParams(seed=7, **hot))[0].token_ids
        != LLM(model).generate([ps[2]], SamplingParams(seed=-7, **hot))[0].token_ids
    )


def test_n_samples_share_the_prompt_cache(model):
    llm = LLM(model, block_size=4)
    p = prompts(1, seed=10, lo=30, hi=31)[0]
    schedule, prefilled = llm.scheduler.schedule, []

    def counting():
        batch = schedule()
        prefilled.extend(n for _, n in batch.prefills)
        return batch

    llm.scheduler.schedule = counting
    out = llm.generate(p, SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=0, ignore_eos=True))[0]
    assert len(out.outputs) == 4 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert sum(prefilled) == len(p)  # the prompt is computed once, not once per sample
    # each sample is what a lone request with that sample's seed gives (seed + index)
    for o in out.outputs:
        lone = LLM(model, block_size=4).generate(
            p, SamplingParams(temperature=1.0, max_tokens=10, seed=o.index, ignore_eos=True)
        )[0]
        assert lone.token_ids == o.token_ids
    assert llm.blocks.num_free == len(llm.blocks.ref)


def test_n_samples_respect_max_num_seqs(model):
    """Samples 2..n fork from the first once its prompt is cached; with no decode slot free they wait
    like any request (and find the prompt in the prefix cache), and still give their seeds' outputs."""
    llm = LLM(model, block_size=4, max_num_seqs=2)
    p = prompts(1, seed=12, lo=30, hi=31)[0]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=0, ignore_eos=True)
    rid, most = llm.add_request(p, params), 0
    while llm.has_unfinished():
        llm.step()
        most = max(most, len(llm.scheduler.running))
    out = llm._result(rid)
    assert most == 2
    for o in out.outputs:
        lone = LLM(model, block_size=4).generate(
            p, SamplingParams(temperature=1.0, max_tokens=6, seed=o.index, ignore_eos=True)
        )[0]
        assert lone.token_ids == o.token_ids
    assert out.num_cached_tokens == 0 and llm.blocks.num_free == len(llm.blocks.ref)


def test_logprobs_match_full_forward(model):
    llm = LLM(model)
    p = prompts(1, seed=11)[0]
    out = llm.generate(
        p,
        SamplingParams(temperature=0.8, max_tokens=6, seed=1, logprobs=True, top_logprobs=3, ignore_eos=True),
    )[0].outputs[0]
    with torch.no_grad():
        logits = model(torch.tensor([p + out.token_ids]))[0, len(p) - 1 : -1]
    want = torch.log_softmax(logits / 0.8, -1)
    got = torch.tensor(out.logprobs)
    torch.testing.assert_close(got, want[torch.arange(6), torch.tensor(out.token_ids)], rtol=1e-4, atol=1e-4)
    assert [t for t, _ in out.top_logprobs[0]] == want[0].topk(3).indices.tolist()


@pytest.mark.parametrize("speculative", [False, True])
def test_prompt_logprobs_match_full_forward_in_chunks_and_after_a_prefix_hit(model, speculative):
    """Prompt logprobs are the model's own log-softmax at every prompt position (the first is None), the
    same when the prompt is prefilled in chunks, when its prefix is already cached, and for n samples."""
    p = prompts(1, seed=12, lo=40, hi=41)[0]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([p]))[0, :-1].float(), -1)
    chosen = want[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    llm = LLM(model, block_size=4, max_batched_tokens=16, speculative=speculative)
    llm.generate(p, GREEDY)  # the prompt's blocks are now in the prefix cache
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2, n=2)
    out = llm.generate([p, p[:1]], params)
    assert out[0].prompt_logprobs[0] is None and out[0].prompt_top_logprobs[0] == []
    torch.testing.assert_close(torch.tensor(out[0].prompt_logprobs[1:]), chosen, rtol=1e-4, atol=1e-4)
    assert [[t for t, _ in top] for top in out[0].prompt_top_logprobs[1:]] == want.topk(2).indices.tolist()
    assert out[0].num_cached_tokens == 0  # scored prompts are computed, not read from the cache
    assert out[0].token_ids == llm.generate(p, GREEDY)[0].token_ids[:3]
    assert out[1].prompt_logprobs == [None]
    assert llm.generate(p, GREEDY)[0].prompt_logprobs is None


def test_logit_bias_moves_the_chosen_token(model):
    llm = LLM(model)
    p = prompts(1, seed=13)[0]
    free = llm.generate(p, GREEDY)[0].token_ids
    forced = llm.generate(
        p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={7: 100})
    )
    assert free != [7] * 12 and forced[0].token_ids == [7] * 12
    banned = llm.generate(
        p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logit_bias={free[0]: -100})
    )
    assert banned[0].token_ids[0] != free[0]
    with pytest.raises(ValueError, match="logit_bias"):
        llm.add_request(p, SamplingParams(logit_bias={model.config.vocab_size: 1}))


def test_prefill_runs_the_last_layer_only_where_it_samples(model):
    """Only sampled positions need the last layer's output (its latents come from its input): a prompt
    prefilled in chunks runs it once, at the last prompt token; with MTP drafting every position needs it."""
    p = prompts(1, seed=12, lo=50, hi=51)[0]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for speculative, want in ((False, [1, 1, 1]), (True, [16, 16, 16, 2])):
        llm = LLM(model, block_size=4, max_batched_tokens=16, speculative=speculative)
        seen = []
        hook = model.model.layers[-1].register_forward_pre_hook(
            lambda _, args, seen=seen: seen.append(args[0].shape[1])
        )
        try:
            out = llm.generate(p, params)[0]
        finally:
            hook.remove()
        assert out.token_ids == naive_greedy(model, p, 3)
        assert seen[: len(want)] == want  # the prefill's calls; then one or two tokens per decode step


def test_interleaved_streams_each_get_all_their_deltas(model):
    llm = LLM(model, block_size=4)
    a, b = prompts(2, seed=15)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    got = {0: [], 1: []}
    for da, db in zip(llm.stream(a, params), llm.stream(b, params)):  # each stream's steps advance both
        got[0] += da.token_ids
        got[1] += db.token_ids
    assert got[0] == naive_greedy(model, a, 10)[: len(got[0])] and got[1] == naive_greedy(model, b, 10)
    with pytest.raises(ValueError, match="prompt"):
        next(llm.stream([a, []], params))  # a bad prompt: the good one before it is not left running
    assert not llm.has_unfinished() and llm.blocks.num_free == len(llm.blocks.ref)


def test_stream_and_abort_free_the_cache(model):
    llm = LLM(model, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    got = []
    stream = llm.stream(prompts(1, seed=12)[0], params)
    for d in stream:
        got += d.token_ids
        if len(got) == 5:
            break
    stream.close()
    assert len(got) == 5
    assert llm.blocks.num_free == len(llm.blocks.ref) and not llm.has_unfinished()
    rid = llm.add_request([5, 6, 7], params)
    llm.step()
    llm.abort(rid)
    assert llm.blocks.num_free == len(llm.blocks.ref)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop": [1]}, "stop"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {"1": 1}}, "logit_bias"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []  # None is "none", as in vLLM
    assert SamplingParams(temperature=1e-300).greedy  # below 1e-5 the scaled logits would overflow


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"max_batched_tokens": 0}, "max_batched_tokens"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"cache_memory_mb": 0}, "cache_memory_mb"),
        ({"cache_memory_mb": float("inf")}, "cache_memory_mb"),
        ({"max_num_seqs": True}, "max_num_seqs"),
    ],
)
def test_bad_engine_settings_are_refused(model, kwargs, field):
    """A zero budget would never schedule a prompt: generate() would spin forever instead of failing."""
    with pytest.raises(ValueError, match=field):
        LLM(model, **kwargs)


def test_bad_prompts_leave_the_engine_serving(model):
    llm = LLM(model)
    ok = llm.add_request([1, 2, 3], GREEDY)
    for prompt, params, field in [
        ([], GREEDY, "prompt"),
        ([1] * 600, GREEDY, "prompt"),
        ([1, 999], GREEDY, "prompt"),
        ([-1], GREEDY, "prompt"),
        ("text", GREEDY, "tokenizer"),
        ([1], SamplingParams(stop=["x"]), "stop"),
        ([1], SamplingParams(max_tokens=10_000), "max_tokens"),
        (torch.tensor(5), GREEDY, "must be a string or a list of token ids"),
    ]:
        with pytest.raises(ValueError, match=field):
            llm.add_request(prompt, params)
    while llm.has_unfinished():
        llm.step()
    assert llm._result(ok).token_ids == naive_greedy(model, [1, 2, 3], 12)


def test_mtp_speculation_greedy_identical(model):
    ps = prompts(6, seed=13)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    plain = LLM(model, block_size=4).generate(ps, params)
    spec_llm = LLM(model, block_size=4, speculative=True)
    spec = spec_llm.generate(ps, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert spec_llm.spec_stats["drafted"] > 50
    assert spec_llm.blocks.num_free == len(spec_llm.blocks.ref)


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_mtp_drafts_are_what_the_uncached_mtp_forward_predicts(model, penalty):
    """Every draft is the argmax of `model(ids, mtp=True)`'s (penalised) MTP logits at the last position,
    through rejections (the MTP cache slots past a rejected draft are rewritten) and batches of mixed
    lengths: greedy rows draft inside the verifying forward, rows with penalties in a forward of their own."""
    from nanoseek.engine.sampling import apply_penalties

    llm = LLM(model, block_size=4, speculative=True)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=penalty)
    for p in prompts(5, seed=3):
        llm.add_request(p, params)
    checked = []
    while llm.has_unfinished():
        llm.step()
        for seq in llm.scheduler.running:
            if seq.draft:
                with torch.no_grad():
                    logits = model(torch.tensor([seq.tokens]), mtp=True).mtp_logits[0][0, -1]
                logits = apply_penalties(logits, seq.output_ids, params)
                assert logits[seq.draft[0]] >= logits.max() - 1e-4
                checked.append(seq.draft[0])
    assert (
        len(checked) >= 5 * 10 and llm.spec_stats["accepted"] < llm.spec_stats["drafted"]
    )  # rejections seen


def test_forked_samples_get_the_prompts_mtp_latents_too(model):
    """n > 1: the samples fork from the first once its prompt is cached, copying the partial tail block;
    the MTP layer writes its latents after that (when drafting), and the copy must include them."""
    llm = LLM(model, block_size=4, speculative=True)
    llm.add_request(prompts(1, seed=5, lo=7, hi=8)[0], SamplingParams(n=2, temperature=0, max_tokens=4), "r")
    llm.step()  # the prompt's prefill; the second sample forks
    parent, child = llm._requests["r"]
    assert parent.table[0] == child.table[0] and parent.table[1] != child.table[1]  # shared head, copied tail
    tail = (
        slice(parent.table[1] * 4, parent.table[1] * 4 + 3),
        slice(child.table[1] * 4, child.table[1] * 4 + 3),
    )
    data = llm.runner.store.data
    torch.testing.assert_close(data[:, tail[1]], data[:, tail[0]], rtol=0, atol=0)


def oracle_drafts(llm: LLM, ref: list[int]) -> LLM:
    """Make `llm` draft the true continuation `ref`: its MTP drafts are replaced after every step."""
    step = llm.step

    def oracle_step():
        deltas = step()
        for s in llm.scheduler.running:
            if s.draft and len(s.output_ids) < len(ref):
                s.draft = [ref[len(s.output_ids)]]
        return deltas

    llm.step = oracle_step
    return llm


def test_mtp_speculation_with_perfect_drafts_emits_two_tokens_per_step(model):
    """Oracle drafts (the true next tokens) are all accepted: half the steps, same output, exact cache."""
    p = [3, 1, 4, 1, 5]
    ref = naive_greedy(model, p, 20)
    llm = oracle_drafts(LLM(model, block_size=4, speculative=True), ref)
    rid = llm.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    steps = 0
    while llm.has_unfinished():
        llm.step()
        steps += 1
    assert llm._result(rid).token_ids == ref
    # one prefill step, then two tokens per step: 1 + 2 * 9 = 19, and the 20th from step 11
    assert steps == 11 and llm.spec_stats["accepted"] == llm.spec_stats["drafted"] == 10


def test_speculative_sampling_preserves_distribution():
    from nanoseek.engine.sampling import draw, verify_draft

    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    params = SamplingParams(temperature=1.0)
    p = torch.softmax(logits, -1)
    q = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    g = random.Random(0)
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        d = draw(q, g)
        s, _ = verify_draft(logits, d, q, params, [], g)
        counts[s.token] += 1
    chi2 = (((counts - n * p) ** 2) / (n * p)).sum().item()
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001


def test_mtp_speculative_sampling_seeded_and_preemption_safe(model):
    """A preempted sequence keeps its draft (drawn from its generator) and verifies it after the recompute,
    so seeded samples do not depend on preemption; nor, with no draft before the first token, on chunking."""
    ps = prompts(6, seed=14, lo=20, hi=30)
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=25, seed=7, ignore_eos=True)
    roomy = LLM(model, block_size=4, speculative=True).generate(ps, params)
    alone = LLM(model, block_size=4, speculative=True).generate([ps[3]], params)[0]
    assert alone.token_ids == roomy[3].token_ids
    per_token = LatentStore.bytes_per_token(model.config, torch.float32, mtp=True)
    tight = LLM(model, block_size=4, speculative=True, cache_memory_mb=70 * per_token / 2**20)
    assert tight.capacity == 68 and tight.runner.store.data.shape[0] == model.config.num_hidden_layers + 1
    greedy = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    assert [o.token_ids for o in tight.generate(ps, greedy)] == [
        o.token_ids for o in LLM(model, block_size=4).generate(ps, greedy)
    ]
    assert tight.scheduler.num_preemptions > 0
    tight = LLM(
        model, block_size=4, speculative=True, cache_memory_mb=70 * per_token / 2**20, max_batched_tokens=7
    )
    assert [o.token_ids for o in tight.generate(ps, params)] == [o.token_ids for o in roomy]
    assert tight.scheduler.num_preemptions > 0


def test_speculation_with_n_samples_after_a_prefill_chunk_one_token_short(model):
    """The chunk ends one token before the prompt's end: the sequence then decodes its last prompt token.
    No draft is made before the first token, so the samples fork from that token's logits."""
    p = prompts(1, seed=16, lo=9, hi=10)[0]
    llm = LLM(model, block_size=4, speculative=True, max_batched_tokens=8)
    out = llm.generate(p, SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert [o.token_ids for o in out.outputs] == [naive_greedy(model, p, 8)] * 2


def test_reset_prefix_cache_also_covers_samples_not_forked_yet(model):
    """A trainer changes the weights (and says so) while an n = 2 request is mid-prefill: its second sample,
    forked later, must not register the stale prompt blocks for later requests to hit."""
    m = random_model(ModelConfig.preset("tiny"))
    p = prompts(1, seed=5, lo=40, hi=41)[0]
    llm = LLM(m, block_size=4, max_batched_tokens=16)
    rid = llm.add_request(p, SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True))
    llm.step()  # the first chunk, with the old weights
    with torch.no_grad():
        for w in m.parameters():
            w.add_(torch.randn_like(w) * 0.02)
    llm.update_weights()
    while llm.has_unfinished():
        llm.step()
    llm.abort(rid)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.num_cached_tokens == 0 and out.token_ids == naive_greedy(m, p, 8)


def test_batch_sample_draws_what_sample_draws():
    """The batched sampler (many rows in a few tensor ops) picks the token the one-row sampler picks
    for the same logits and generator state, for greedy, temperature and top-p rows mixed in one batch."""
    from types import SimpleNamespace

    from nanoseek.engine.sampling import batch_sample, sample

    torch.manual_seed(0)
    logits = torch.randn(12, 300) * 3
    params = [
        SamplingParams(temperature=t, top_p=p)
        for t, p in [(0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 1.0), (1.0, 0.95)] * 2
    ]
    for trial in range(5):
        rows = [
            SimpleNamespace(params=p, draft=[], generator=random.Random(100 * trial + i))
            for i, p in enumerate(params)
        ]
        batched = batch_sample(rows, logits)
        for i, p in enumerate(params):
            alone = sample(logits[i], p, [], random.Random(100 * trial + i))
            assert batched[i].token == alone.token, (trial, i)
    # rows the batch path leaves to `sample`: penalties, top-k, logprobs, drafts to verify
    special = [
        SimpleNamespace(params=SamplingParams(temperature=1.0, presence_penalty=0.5), draft=[]),
        SimpleNamespace(params=SamplingParams(temperature=1.0, top_k=5), draft=[]),
        SimpleNamespace(params=SamplingParams(temperature=0, logprobs=True), draft=[]),
        SimpleNamespace(params=SamplingParams(temperature=0), draft=[3]),
    ]
    assert batch_sample(special, logits[:4]) == [None] * 4


# ---- text: incremental detokenisation, UTF-8 and stop strings ------------------------------------------
@pytest.fixture(scope="module")
def text_llm():
    """A random model over a byte-level tokenizer whose vocabulary holds partial multi-byte characters."""
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox é ü 😀 jumps over 0123 the lazy dög ñ 🚀"] * 20, 300)
    torch.manual_seed(3)
    return LLM(random_model(ModelConfig.preset("tiny").replace(vocab_size=tok.get_vocab_size())), tok)


def test_streamed_text_is_the_full_decode_and_never_ends_in_a_broken_character(text_llm):
    params = SamplingParams(temperature=1.5, max_tokens=60, ignore_eos=True, seed=0)
    prompts_ = ["the quick", "é ü", "😀", "fox"]
    streamed = {}
    for d in text_llm.stream(prompts_, params):
        if d.finish_reason is None:
            assert not d.text.endswith("\ufffd")  # a character split across tokens waits for its last byte
        streamed[d.request_id] = streamed.get(d.request_id, "") + d.text
    outs = text_llm.generate(prompts_, params)
    for out, text in zip(outs, streamed.values()):
        assert text == out.text == text_llm.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert any(ord(c) > 127 for out in outs for c in out.text)  # multi-byte characters were exercised
    # generate() decodes once at the end, stream() as it goes: the same text, without a stop token's
    stop = SamplingParams(temperature=1.5, max_tokens=60, seed=0, stop_token_ids=[outs[0].token_ids[7]])
    whole = text_llm.generate(prompts_[0], stop)[0]
    assert whole.outputs[0].finish_reason == "stop"
    assert (
        whole.text
        == "".join(d.text for d in text_llm.stream(prompts_[0], stop))
        == text_llm.tokenizer.decode(whole.token_ids[:-1], skip_special_tokens=False)
    )


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(text_llm):
    free = text_llm.generate("the", SamplingParams(temperature=1.5, max_tokens=60, ignore_eos=True, seed=1))[
        0
    ]
    tok = text_llm.tokenizer
    pieces = [tok.decode([t], skip_special_tokens=False) for t in free.token_ids]
    # a stop string made of the last character of one token and the first of the next
    k = next(
        i
        for i in range(5, len(pieces) - 1)
        if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[k][-1] + pieces[k + 1][0]
    want = free.text[: free.text.index(stop)]
    params = SamplingParams(temperature=1.5, max_tokens=60, ignore_eos=True, seed=1, stop=[stop])
    deltas = list(text_llm.stream("the", params))
    assert "".join(d.text for d in deltas) == want == text_llm.generate("the", params)[0].text
    assert deltas[-1].finish_reason == "stop"


def test_a_stop_string_in_the_first_of_two_speculated_tokens_ends_the_output_there(text_llm):
    """Perfect drafts put two tokens in a step; the output must still end at the token completing a stop
    string, exactly as without speculation."""
    model, tok = text_llm.model, text_llm.tokenizer
    free = text_llm.generate("the", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    spec = oracle_drafts(LLM(model, tok, speculative=True), free.token_ids)
    checked = 0
    for i in range(3, 20):
        piece = tok.decode(free.token_ids[i : i + 1], skip_special_tokens=False)
        if (
            not piece.strip()
            or "\ufffd" in piece
            or piece in free.text[: free.text.index(piece) + len(piece) - 1]
        ):
            continue
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[piece])
        plain, fast = text_llm.generate("the", params)[0], spec.generate("the", params)[0]
        assert (fast.token_ids, fast.text) == (plain.token_ids, plain.text) and plain.outputs[
            0
        ].finish_reason == "stop"
        checked += 1
    assert checked >= 3 and spec.spec_stats["accepted"] > 0


def test_stop_string_is_found_while_a_split_character_is_held_back(text_llm):
    """A token like "d\\xc3" completes the stop string "d" and starts a character: the stop counts at once."""
    from nanoseek.engine.detokenizer import Detokenizer

    tok = text_llm.tokenizer
    pieces = {i: tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size())}
    split = next(
        i for i, p in pieces.items() if len(p) > 1 and p.endswith("\ufffd") and "\ufffd" not in p[:-1]
    )
    stop = pieces[split][:-1]
    text = Detokenizer(tok, [stop])
    assert text.update([split], finished=False) == "" and text.stopped and text.text == ""


def test_sequence_window_is_a_slice_of_tokens_and_drafts():
    from nanoseek.engine.scheduler import Sequence

    seq = Sequence("r", 0, [1, 2, 3], GREEDY, random.Random(), output_ids=[4, 5], draft=[6, 7])
    whole = seq.tokens + seq.draft
    for start in range(len(whole) + 1):
        for n in range(len(whole) + 2 - start):
            assert seq.window(start, n) == whole[start : start + n]


def test_causal_prefill_never_builds_the_attention_bias(model):
    """A fresh prompt longer than the absorbed path's limit attends with the kernel's causal mode: the
    [B, S, T] bias (4 MB for 1000 tokens) must not be built. A chunk after cached context needs it."""
    from nanoseek.engine.cache import LatentStore, PagedBatch
    from nanoseek.model import MLA

    store = LatentStore(model.config, num_blocks=16, block_size=16, dtype=torch.float32)
    n = MLA.absorb_max_queries + 10
    fresh = PagedBatch(store, [list(range(8))], [0], [n])
    with torch.no_grad():
        model.hidden_states(torch.randint(0, model.config.vocab_size, (1, n)), fresh.positions, fresh)
        assert fresh._bias is None
        fresh.commit()
        later = PagedBatch(store, [list(range(8))], [n], [n])
        model.hidden_states(torch.randint(0, model.config.vocab_size, (1, n)), later.positions, later)
    assert (
        later.bias is not None
        and bool(later.bias[0, 0, n + 1 :].isinf().all())
        and later.bias[0, 0, : n + 1].eq(0).all()
    )


def test_compiled_decode_matches_eager(model):
    """compile=True runs decode steps (and MTP drafts) through torch.compile: the same tokens and logprobs
    as the eager engine, greedy and seeded sampling, plain and speculative, in a batch of mixed lengths
    (compiled graphs for one row and for several); the sampled run also forks n = 2 samples per prompt in a
    cache too small for them all (preemption), and frees every block."""
    require_cxx_compiler()
    ps = prompts(4, seed=17, lo=20)
    for params, tight in (
        (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True), False),
        (SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, ignore_eos=True, seed=5, n=2), True),
    ):
        for speculative in (False, True):  # a tight cache has room for about two of the eight samples
            per_token = LatentStore.bytes_per_token(model.config, torch.float32, speculative)
            memory = 90 * per_token / 2**20 if tight else 256
            llms = [
                LLM(model, block_size=4, cache_memory_mb=memory, speculative=speculative, compile=c)
                for c in (False, True)
            ]
            eager, compiled = (llm.generate(ps, params) for llm in llms)
            for e, c in zip(eager, compiled):
                assert [o.token_ids for o in c.outputs] == [o.token_ids for o in e.outputs]
                assert c.outputs[0].logprobs == pytest.approx(e.outputs[0].logprobs, abs=1e-4)
            assert llms[1].blocks.num_free == len(llms[1].blocks.ref)
            if tight:
                assert llms[1].scheduler.num_preemptions > 0


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's `eager` backend: traces and guards as the engine's graphs do, without
    inductor's code generation (seconds instead of minutes), for tests of which graphs exist and what
    they read."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))


@pytest.mark.parametrize("speculative", [False, True])
def test_warm_up_builds_every_decode_graph(model, eager_compile, speculative):
    """After `warm_up` a compiled engine never compiles again, whatever the batch: one row, rows of one
    length (no attention bias), rows of different lengths, greedy or sampled."""
    llm = LLM(model, block_size=4, compile=True, speculative=speculative)
    llm.warm_up()
    sampled = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        for ps in (prompts(1, seed=21), prompts(5, seed=22, lo=9, hi=10), prompts(6, seed=23)):
            assert [o.token_ids for o in llm.generate(ps, GREEDY)] == [naive_greedy(model, p, 12) for p in ps]
            assert all(len(o.token_ids) == 12 for o in llm.generate(ps, sampled))


def test_compiled_engine_follows_weights_changed_in_place(eager_compile):
    """A compiled step reads MLA's folded weights as graph inputs, refreshed eagerly before each step (not
    refolded inside the graph): a weight changed in place, as a trainer changes it, must change what the
    compiled engine generates exactly as it changes the eager engine's output."""
    torch.manual_seed(2)
    m = random_model(ModelConfig.preset("tiny"))
    compiled, eager = LLM(m, compile=True), LLM(m)
    compiled.generate(prompts(2, seed=30, lo=2, hi=10), GREEDY)  # short prefills fold every layer's weights
    ps = prompts(3, seed=31, lo=50, hi=60)  # long ones take the decompressed path, which folds nothing
    before = [o.token_ids for o in compiled.generate(ps, GREEDY)]
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(-1.5)
    for llm in (compiled, eager):
        llm.update_weights()
    after = [o.token_ids for o in compiled.generate(ps, GREEDY)]
    assert after == [o.token_ids for o in eager.generate(ps, GREEDY)] != before


def test_penalties_and_truncations_against_hand_computed_values():
    """presence/frequency penalties (OpenAI's formula), top-k, top-p and min-p on known distributions."""
    from nanoseek.engine.sampling import apply_penalties, processed_probs

    got = apply_penalties(
        torch.zeros(6), [1, 1, 3], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    )
    assert got.tolist() == [0.0, -0.5 - 2 * 0.25, 0.0, -0.5 - 0.25, 0.0, 0.0]
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    logits = probs.log()
    keep = lambda **kw: (processed_probs(logits, SamplingParams(temperature=1.0, **kw)) > 0).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.8) == [True, True, True, False, False]  # 0.4 + 0.3 < 0.8: the third one reaches it
    assert keep(min_p=0.3) == [True, True, True, False, False]  # >= 0.3 x 0.4 = 0.12
    renorm = processed_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(renorm[:2].double(), torch.tensor([0.4, 0.3], dtype=torch.float64) / 0.7)


def test_penalties_and_stop_token_ids_change_what_the_engine_generates(model):
    p = prompts(1, seed=21, lo=12, hi=13)[0]
    llm = LLM(model)
    plain = llm.generate(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids
    assert len(set(plain)) < len(plain)  # the random model repeats itself: penalties have work to do
    strict = llm.generate(
        p,
        SamplingParams(
            temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=2.0, frequency_penalty=2.0
        ),
    )[0].token_ids
    assert strict != plain and len(set(strict)) > len(set(plain))
    stop = plain[5]
    out = llm.generate(
        p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    )[0].outputs[0]
    assert out.token_ids == plain[: plain.index(stop) + 1] and out.finish_reason == "stop"


def test_a_prefix_hash_collision_is_caught_by_comparing_the_ids(model, monkeypatch):
    """Every block hashing alike: a prompt that shares no tokens finds the hash but must not reuse the block."""
    from nanoseek.engine import cache

    monkeypatch.setattr(cache, "chain_hash", lambda parent, ids: b"same")
    a, b = prompts(2, seed=23, lo=12, hi=13)
    llm = LLM(model, block_size=4)
    llm.generate(a, GREEDY)
    out = llm.generate(b, GREEDY)[0]
    assert out.num_cached_tokens == 0 and out.token_ids == naive_greedy(model, b, GREEDY.max_tokens)
    assert llm.generate(a, GREEDY)[0].num_cached_tokens == 4  # the first block still matches (ids equal)


def test_a_full_cache_preempts_the_newest_request(model):
    per_token = LatentStore.bytes_per_token(model.config, torch.float32)
    llm = LLM(model, block_size=4, cache_memory_mb=48 * per_token / 2**20)  # room for one and a half
    a, b = prompts(2, seed=25, lo=20, hi=21)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = llm.add_request(a, params)
    llm.step()
    second = llm.add_request(b, params)
    while llm.has_unfinished():
        llm.step()
    (old,), (new,) = llm._requests[first], llm._requests[second]
    assert new.preempted and not old.preempted and llm.scheduler.num_preemptions >= 1
    assert llm._result(first).token_ids == naive_greedy(model, a, 24)
    assert llm._result(second).token_ids == naive_greedy(model, b, 24)


def test_row_values_become_the_tensors_torch_tensor_makes():
    from nanoseek.engine.tensors import floats, int64s

    ints, values = [3, -1, 2**40, 0], [0.1, 1 / 3, 1e-30, 2.5]
    assert torch.equal(int64s(iter(ints)), torch.tensor(ints)) and int64s(ints).dtype == torch.int64
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        made = floats(values, dtype)
        assert made.dtype == dtype and torch.equal(made, torch.tensor(values, dtype=dtype))
    assert int64s([]).shape == (0,) and int64s([]).dtype == torch.int64
    assert floats([]).shape == (0,) and floats([]).dtype == torch.float32
