"""Inference engine vs transformers `generate`, same weights, side by side in one run.

    python benchmarks/engine.py --preset small --new-tokens 64 [--checkpoint runs/base] [--compile]

Prints decode throughput at batch 1 and 32 (ratio), cache bytes per token, prefix-cache TTFT, MTP
speculation (acceptance, batch-1 speed-up) and a `vllm bench serve`-style latency table. Timed pairs
alternate for `--rounds` rounds and the medians are compared, since a shared CPU drifts within minutes.
MTP drafts are judged on what the model was trained for: `--task` prompts when the checkpoint has a
tokenizer (random ids otherwise, where a draft has little to go on).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from nanoseek import LLM, DeepSeekV3, ModelConfig, SamplingParams, load_model, save_model
from nanoseek.engine.cache import LatentStore
from nanoseek.tasks import get_task
from nanoseek.tokenizer import load_tokenizer


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - t


def ours_generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return time.perf_counter() - t


def hf_cache_bytes_per_token(hf, vocab: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(torch.randint(0, vocab, (1, 64)), cache=cache, use_cache=True)
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += t.numel() * t.element_size()
    return total / 64


def latency_table(llm: LLM, vocab: int, n: int, new_tokens: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    count: dict[str, int] = {}
    itl: list[float] = []
    prev: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(n):
        plen = int(torch.randint(16, 128, (1,), generator=g))
        llm.add_request(
            torch.randint(0, vocab, (plen,), generator=g).tolist(),
            SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
            request_id=f"b{i}",
        )
    while llm.has_unfinished():
        deltas = llm.step()
        now = time.perf_counter()
        for d in deltas:
            r = d.request_id
            if r not in first:
                first[r] = now - t0
            else:
                itl.append(now - prev[r])
            prev[r] = last[r] = now
            count[r] = count.get(r, 0) + len(d.token_ids)
    dur = time.perf_counter() - t0
    ttft = sorted(first.values())
    tpot = sorted((last[r] - t0 - first[r]) / max(count[r] - 1, 1) for r in first)
    itl.sort()

    def pct(xs, q):
        return xs[min(int(q * len(xs)), len(xs) - 1)] * 1e3

    total_out = sum(count.values())
    print(f"\n---------- serving-style run: {n} requests at once, {new_tokens} output tokens each ----------")
    print(f"{'Benchmark duration (s):':<40}{dur:>10.2f}")
    print(f"{'Total generated tokens:':<40}{total_out:>10}")
    print(f"{'Output token throughput (tok/s):':<40}{total_out / dur:>10.1f}")
    for name, xs in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)):
        print(f"{'Mean ' + name + ' (ms):':<40}{statistics.mean(xs) * 1e3:>10.2f}")
        print(f"{'Median ' + name + ' (ms):':<40}{pct(xs, 0.5):>10.2f}")
        print(f"{'P99 ' + name + ' (ms):':<40}{pct(xs, 0.99):>10.2f}")


def timed_stream(llm: LLM, prompt, params: SamplingParams) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds from the first token to the last)."""
    tokens, t0 = [], time.perf_counter()
    first = last = t0
    for delta in llm.stream(prompt, params):
        last = time.perf_counter()
        if not tokens:
            first = last
        tokens += delta.token_ids
    return tokens, first - t0, last - first


def mtp_speedup(model: DeepSeekV3, args) -> None:
    """Batch-1 greedy generation with and without MTP drafts, prompt by prompt, alternating. Decode speed
    is tokens after the first over the time after the first (TPOT); end to end adds the prefill, where MTP
    also fills its own layer's cache."""
    tokenizer = load_tokenizer(args.checkpoint) if args.checkpoint else None
    if tokenizer is not None:
        task, rng = get_task(args.task), random.Random(0)
        prompts, what = [task.sample(rng).prompt for _ in range(args.mtp_prompts)], f"{args.task} prompts"
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens)  # each stops at its own end
    else:
        prompts = torch.randint(0, model.config.vocab_size, (args.mtp_prompts, args.prompt_len)).tolist()
        what = "random prompts"
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    llms = {
        "plain": LLM(model, tokenizer, compile=args.compile),
        "MTP": LLM(model, tokenizer, speculative=True, compile=args.compile),
    }
    for llm in llms.values():  # compile every kind of decode batch first
        llm.warm_up()
        timed_stream(llm, prompts[0], params)
    decode = {k: [] for k in llms}
    total = {k: [] for k in llms}
    tokens = 0
    for _ in range(args.rounds):
        sums = {k: [0.0, 0.0] for k in llms}
        outs = {}
        for p in prompts:
            for name, llm in llms.items():
                outs[name], ttft, rest = timed_stream(llm, p, params)
                sums[name][0] += ttft
                sums[name][1] += rest
            if outs["plain"] != outs["MTP"]:
                raise AssertionError("greedy speculative decoding changed the output")
            tokens += len(outs["plain"])
        for name, (ttft, rest) in sums.items():
            decode[name].append(rest)
            total[name].append(ttft + rest)
    tokens /= args.rounds
    dec = {k: (tokens - len(prompts)) / statistics.median(v) for k, v in decode.items()}
    e2e = {k: tokens / statistics.median(v) for k, v in total.items()}
    st = llms["MTP"].spec_stats
    ttft = {k: [] for k in llms}  # the MTP layer also fills its cache during a prefill
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for _ in range(2 * args.rounds + 1):
        long = torch.randint(0, model.config.vocab_size, (1000,)).tolist()
        for name, llm in llms.items():
            t = time.perf_counter()
            llm.generate(long, one)
            ttft[name].append(time.perf_counter() - t)
    print(
        f"\nTTFT of a 1000-token prompt, medians of {2 * args.rounds + 1}: {statistics.median(ttft['plain']) * 1e3:.1f} "
        f"ms plain, {statistics.median(ttft['MTP']) * 1e3:.1f} ms with MTP speculation"
    )
    print(
        f"MTP speculation, batch 1, {len(prompts)} {what} ({tokens / len(prompts):.0f} tokens each, identical "
        f"outputs), medians of {args.rounds} rounds: acceptance {st['accepted'] / max(st['drafted'], 1):.1%}; "
        f"decode {dec['plain']:.1f} -> {dec['MTP']:.1f} tok/s ({dec['MTP'] / dec['plain']:.2f}x); end to end with "
        f"prefill {e2e['plain']:.1f} -> {e2e['MTP']:.1f} tok/s ({e2e['MTP'] / e2e['plain']:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--checkpoint", help="a trained checkpoint (for a meaningful MTP acceptance rate)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed runs per comparison (medians)")
    ap.add_argument("--task", default="addition@2", help="prompts for the MTP run (the demo base's task)")
    ap.add_argument("--mtp-prompts", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="torch.compile the engine's decode forwards")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        if args.checkpoint:
            model = load_model(args.checkpoint)
        else:
            model = DeepSeekV3(ModelConfig.preset(args.preset)).eval()
        save_model(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cfg = model.config
    vocab = cfg.vocab_size
    print(
        f"model: {cfg.num_params() / 1e6:.2f}M params ({'trained ' + args.checkpoint if args.checkpoint else 'random ' + args.preset}), "
        f"{torch.get_num_threads()} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"nanoseek decode {'compiled' if args.compile else 'eager'}"
    )
    print(f"\n{'batch':>6}{'nanoseek tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}")
    for batch in (1, 32):
        prompts = torch.randint(0, vocab, (batch, args.prompt_len)).tolist()
        ours_generate(LLM(model, compile=args.compile), prompts, 4)  # warm-up (and compilation)
        hf_generate(hf, prompts, 4)
        t_ours, t_hf = [], []
        for _ in range(args.rounds):
            t_ours.append(ours_generate(LLM(model, compile=args.compile), prompts, args.new_tokens))
            t_hf.append(hf_generate(hf, prompts, args.new_tokens))
        t_ours, t_hf = statistics.median(t_ours), statistics.median(t_hf)
        tok = batch * args.new_tokens
        print(f"{batch:>6}{tok / t_ours:>16.1f}{tok / t_hf:>20.1f}{t_hf / t_ours:>7.2f}x")

    ours_b = LatentStore.bytes_per_token(cfg, torch.float32, mtp=True)
    main_b = LatentStore.bytes_per_token(cfg, torch.float32)
    print(
        f"\ncache bytes/token (fp32): nanoseek {main_b} main layers (+{ours_b - main_b} MTP layer when speculating) = "
        f"{cfg.num_hidden_layers} x {cfg.latent_dim} x 4, the MLA minimum; transformers "
        f"{hf_cache_bytes_per_token(hf, vocab):.0f}; decompressed K/V would be "
        f"{cfg.num_hidden_layers * cfg.decompressed_cache_dim * 4}"
    )

    # prefix cache: a 1000-token prompt whose first 90% was seen before, against a fresh one (alternating)
    llm = LLM(model, max_batched_tokens=2048, compile=args.compile)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(torch.randint(0, vocab, (1000,)).tolist(), one)  # warm-up
    misses, hits = [], []
    for _ in range(2 * args.rounds + 1):  # single TTFTs swing more than the throughput runs
        long = torch.randint(0, vocab, (1000,)).tolist()
        t = time.perf_counter()
        llm.generate(long, one)
        misses.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = llm.generate(long[:900] + torch.randint(0, vocab, (100,)).tolist(), one)[0]
        hits.append(time.perf_counter() - t)
    miss, hit = statistics.median(misses), statistics.median(hits)
    print(
        f"\nprefix cache TTFT, 1000-token prompt, medians of {len(hits)}: uncached {miss * 1e3:.1f} ms, 90% cached "
        f"({out.num_cached_tokens} tokens hit) {hit * 1e3:.1f} ms -> {miss / hit:.1f}x lower"
    )

    if model.mtp:
        mtp_speedup(model, args)

    llm = LLM(model, compile=args.compile)
    llm.warm_up()  # every kind of decode batch the run will see, compiled before it starts
    latency_table(llm, vocab, n=32, new_tokens=args.new_tokens)


if __name__ == "__main__":
    main()
