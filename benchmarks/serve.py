"""`nanoseek serve` under load, `vllm bench serve`-style: random prompts, fixed concurrency, streaming.

    python benchmarks/serve.py [--checkpoint runs/demo/rl] [--requests 32] [--input-len 128] [--output-len 64] [--compile]

The engine alone (`LLM.generate` in this process, the bound) on every core and on the server's torch
threads, then `nanoseek serve` in its own process, as a deployment runs it, loaded by this client at
concurrency 1 and 16 — in alternating rounds, since a shared CPU drifts — then with a repeated 1k-token
system prompt (prefix-cache hits) against fresh ones (misses). Prints TTFT / TPOT / ITL p50/p99 and output
tokens/s per run, and the median ratios the README quotes. The server leaves a core to its HTTP event loop
(and here to this client), so the overhead is given against both engine-alone runs: the first is the
cost of serving on this machine, the second the cost of the HTTP layer itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
import httpx
import torch

from nanoseek import LLM, DeepSeekV3, ModelConfig, SamplingParams, save_model
from nanoseek.data import builtin_documents
from nanoseek.serve.async_engine import server_threads
from nanoseek.tokenizer import save_tokenizer, train_tokenizer


@dataclass
class Record:
    start: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0


async def one_request(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> Record:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = Record(time.perf_counter())
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if b'"usage"' in line:  # the final chunk (text is JSON-escaped: no bare quotes)
                rec.tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                rec.chunks.append(time.perf_counter())
    return rec


async def run_load(
    url: str, prompts: list[list[int]], max_tokens: int, concurrency: int
) -> tuple[list[Record], float]:
    """`vllm bench serve`'s client in miniature: aiohttp (C-accelerated, as vLLM's), so that on a 2-core
    machine the client takes as little of the CPU the server is measured on as it can."""
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:

        async def bounded(p):
            async with limit:
                return await one_request(session, url, p, max_tokens)

        t = time.perf_counter()
        records = await asyncio.gather(*(bounded(p) for p in prompts))
        return records, time.perf_counter() - t


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] * 1e3


def summarise(name: str, records: list[Record], duration: float) -> dict[str, float]:
    ttft = [r.chunks[0] - r.start for r in records]
    tpot = [(r.chunks[-1] - r.chunks[0]) / max(r.tokens - 1, 1) for r in records]
    itl = [b - a for r in records for a, b in zip(r.chunks, r.chunks[1:])]
    out = sum(r.tokens for r in records)
    row = {
        "tok/s": out / duration,
        "TTFT p50": pct(ttft, 0.5),
        "TTFT p99": pct(ttft, 0.99),
        "TPOT p50": pct(tpot, 0.5),
        "TPOT p99": pct(tpot, 0.99),
        "ITL p50": pct(itl, 0.5),
        "ITL p99": pct(itl, 0.99),
    }
    print(f"{name:<28}" + "".join(f"{v:>10.1f}" for v in row.values()))
    return row


def build_model(args) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if args.checkpoint:
        return args.checkpoint, None
    tmp = tempfile.TemporaryDirectory()
    docs = [p + c for p, c in builtin_documents(2000, seed=0)]
    tok = train_tokenizer(docs, 1024)
    torch.manual_seed(0)
    save_model(DeepSeekV3(ModelConfig.preset(args.preset)).eval(), tmp.name)
    save_tokenizer(tok, tmp.name)
    return tmp.name, tmp


@contextmanager
def server_process(
    path: str, concurrency: int, max_pending: int, threads: int | None, batched_tokens: int, compile: bool
):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanoseek.cli",
            "serve",
            path,
            "--port",
            str(port),
            "--max-concurrency",
            str(concurrency),
            "--max-queue",
            str(max_pending),
            "--max-num-batched-tokens",
            str(batched_tokens),
            "--log-level",
            "warning",
            *(["--threads", str(threads)] if threads else []),
            *(["--compile"] if compile else []),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(3000):  # up to 5 minutes: a compiling server builds its graphs before it listens
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint", help="checkpoint directory with tokenizer (default: a random small model)"
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="alternating engine / server runs (medians)")
    ap.add_argument(
        "--max-batched-tokens", type=int, default=2048, help="per engine step, engine and server alike"
    )
    ap.add_argument("--server-threads", type=int, help="the server's --threads (default: its own, cores - 1)")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the decode steps, engine and server alike"
    )
    args = ap.parse_args()
    path, _tmp = build_model(args)
    llm = LLM(
        path, max_num_seqs=args.concurrency, max_batched_tokens=args.max_batched_tokens, compile=args.compile
    )
    vocab = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:  # fresh random ids: no accidental prefix hits
        return torch.randint(16, vocab, (n, length), generator=g).tolist()

    print(
        f"model {path}: {llm.config.num_params() / 1e6:.2f}M params, {torch.get_num_threads()} threads, "
        f"{'compiled' if args.compile else 'eager'} decoding; "
        f"{args.requests} requests, input {args.input_len}, output {args.output_len} tokens"
    )
    print(
        f"{'run':<28}"
        + "".join(
            f"{h:>10}"
            for h in ("tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99")
        )
        + "   (ms)"
    )
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    c = args.concurrency
    cores = torch.get_num_threads()
    threads_served = server_threads(args.server_threads)  # as `nanoseek serve` sets them
    engine: dict[int, list[float]] = {cores: [], threads_served: []}
    for threads in engine:  # as the server builds its graphs before it listens; the thread count is a guard
        torch.set_num_threads(threads)
        llm.warm_up()
    served: dict[int, list[float]] = {1: [], c: []}
    with server_process(
        path, c, args.requests, args.server_threads, args.max_batched_tokens, args.compile
    ) as url:
        # a shared CPU drifts by tens of percent within minutes: alternate the runs, compare medians
        for _ in range(args.rounds):
            for threads, rates in engine.items():
                torch.set_num_threads(threads)
                t = time.perf_counter()
                llm.generate(prompts(args.requests, args.input_len), params)
                rates.append(args.requests * args.output_len / (time.perf_counter() - t))
                print(f"{f'engine alone, {threads} thread(s)':<28}{rates[-1]:>10.1f}")
            torch.set_num_threads(cores)
            for conc in (1, c):
                records, dur = asyncio.run(
                    run_load(url, prompts(args.requests, args.input_len), args.output_len, conc)
                )
                served[conc].append(summarise(f"server, concurrency {conc}", records, dur)["tok/s"])
        system = prompts(1, args.system_len)[0]
        asyncio.run(
            run_load(url, [system + prompts(1, 16)[0]], 4, 1)
        )  # put the shared system prompt in cache
        miss, _ = asyncio.run(
            run_load(url, [p + q for p, q in zip(prompts(8, args.system_len), prompts(8, 16))], 4, 1)
        )
        hit, _ = asyncio.run(run_load(url, [system + q for q in prompts(8, 16)], 4, 1))
    e, e_server, one, many = (
        statistics.median(x) for x in (engine[cores], engine[threads_served], served[1], served[c])
    )
    print(
        f"\nmedians of {args.rounds} rounds: engine alone {e:.1f} ({cores} threads), {e_server:.1f} "
        f"({threads_served}, as in the server); server at concurrency 1 {one:.1f} and {c} {many:.1f} output tok/s"
    )
    print(f"concurrency {c} vs 1: {many / one:.2f}x output tokens/s")
    print(
        f"server overhead at concurrency {c} vs the engine alone: {1 - many / e:.1%} on {cores} threads, "
        f"{1 - many / e_server:.1%} on the server's {threads_served}"
    )
    ttft_miss = statistics.median(r.chunks[0] - r.start for r in miss)
    ttft_hit = statistics.median(r.chunks[0] - r.start for r in hit)
    print(
        f"{args.system_len}-token system prompt, median TTFT: miss {ttft_miss * 1e3:.1f} ms, hit "
        f"{ttft_hit * 1e3:.1f} ms -> {ttft_miss / ttft_hit:.1f}x lower on hits"
    )


if __name__ == "__main__":
    main()
