"""The `nanoseek` command line."""

from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import PRESETS, ModelConfig


def describe(config: ModelConfig, name: str) -> str:
    """Parameter counts, FLOPs per token and latent-cache size of a config, as printed by `nanoseek info`."""
    ratio = config.latent_dim / config.decompressed_cache_dim
    return "\n".join([
        f"{name}: {config.num_params() / 1e6:,.2f}M parameters (+{config.num_mtp_params() / 1e6:,.2f}M MTP), "
        f"{config.num_active_params() / 1e6:,.2f}M activated per token",
        f"  training FLOPs/token at seq 4096: {config.train_flops_per_token(4096):.3e}; "
        f"decode FLOPs/token at context 4096: {config.decode_flops_per_token(4096):.3e}",
        f"  MLA cache per token per layer: {config.latent_dim} values vs {config.decompressed_cache_dim} "
        f"decompressed ({config.latent_dim}/{config.decompressed_cache_dim} = {ratio:.2%})",
    ])


def cmd_info(args: argparse.Namespace) -> None:
    for name in args.preset or list(PRESETS):
        print(describe(ModelConfig.preset(name), name))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo
    run_demo(DemoConfig(out=args.out, task=args.task, pretrain_steps=args.pretrain_steps, grpo_steps=args.grpo_steps,
                        seed=args.seed, with_distill=args.with_distill))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from .data import read_documents
    from .tokenizer import save_tokenizer, train_tokenizer
    docs = [d for path in args.corpus for d in read_documents(path)]
    tok = train_tokenizer(docs, args.vocab_size)
    save_tokenizer(tok, args.out)
    print(f"trained a {tok.get_vocab_size()}-token byte-level BPE on {len(docs)} documents -> {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .train.loop import TrainConfig
    from .train.pretrain import PretrainConfig, pretrain
    pc = PretrainConfig(preset=args.preset, data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        seq_len=args.seq_len, batch_size=args.batch_size, num_docs=args.num_docs,
                        mtp_lambda=args.mtp_lambda, balance_alpha=args.alpha, bias_gamma=args.gamma,
                        dense=args.dense, doc_mask=not args.no_doc_mask, eval_every=args.eval_every,
                        eval_problems=args.eval_problems, val_batches=args.val_batches,
                        tasks=tuple(args.task or PretrainConfig.tasks), scratchpad=args.scratchpad)
    tc = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                     grad_accum=args.grad_accum, precision=args.precision, save_every=args.save_every,
                     seed=args.seed, fsdp=args.fsdp, compile=args.compile,
                     report_to=args.report_to, expert_parallel=args.expert_parallel)
    pretrain(pc, tc, args.out, resume=args.resume)


def cmd_grpo(args: argparse.Namespace) -> None:
    from .train.grpo import GRPOConfig, GRPOTrainer
    from .train.loop import TrainConfig
    cfg = GRPOConfig(task=args.task, group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                     temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high, beta=args.beta,
                     ref_reset_every=args.ref_reset_every, scale_rewards=args.scale_rewards, loss_type=args.loss_type,
                     mu=args.mu, micro_batch_size=args.micro_batch_size, dynamic_sampling=args.dynamic_sampling,
                     mask_truncated=args.mask_truncated, format_weight=args.format_weight,
                     consistency_weight=args.consistency_weight,
                     overlong_cache=args.overlong_cache, eval_every=args.eval_every, eval_problems=args.eval_problems,
                     eval_k=args.eval_k, template=args.template,
                     log_completions_every=args.log_completions_every)
    tc = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, min_lr_ratio=1.0, weight_decay=0.0,
                     save_every=args.save_every, seed=args.seed, precision=args.precision,
                     report_to=args.report_to, expert_parallel=args.expert_parallel)
    GRPOTrainer(args.init, cfg, tc, args.out).train(resume=args.resume)


def cmd_sft(args: argparse.Namespace) -> None:
    from .train.loop import TrainConfig
    from .train.sft import SFTConfig, sft
    sc = SFTConfig(init=args.init, data=args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                   strict=args.strict, eval_every=args.eval_every, eval_problems=0, mtp_lambda=args.mtp_lambda)
    tc = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, grad_accum=args.grad_accum,
                     precision=args.precision, save_every=args.save_every, seed=args.seed, fsdp=args.fsdp,
                     report_to=args.report_to, expert_parallel=args.expert_parallel)
    sft(sc, tc, args.out, resume=args.resume)


def _sample_config(args: argparse.Namespace):
    from .train.distill import SampleConfig
    return SampleConfig(task=args.task, problems=args.problems, n=args.n, keep=args.keep, select=args.select,
                        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)


def cmd_sample(args: argparse.Namespace) -> None:
    from .engine import LLM
    from .train.distill import print_rates, rejection_sample, write_jsonl
    records, rates = rejection_sample(LLM(args.model), _sample_config(args))
    write_jsonl(args.out, records)
    print_rates(rates, len(records))
    print(f"wrote {args.out}")


def cmd_distill(args: argparse.Namespace) -> None:
    from .train.distill import DistillConfig, distill
    distill(DistillConfig(teacher=args.teacher, student_preset=args.student_preset, student_init=args.student_init,
                          sample=_sample_config(args), steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          seq_len=args.seq_len, report_to=args.report_to), args.out, args.seed)


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--problems", type=int, default=400)
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--keep", type=int, default=1, help="verified samples kept per problem")
    p.add_argument("--select", choices=["shortest", "reward"], default="shortest")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)


def cmd_cost(args: argparse.Namespace) -> None:
    from .cost import training_cost, v3_implied_mfu
    mfu = args.mfu if args.mfu is not None else v3_implied_mfu()
    c = training_cost(ModelConfig.preset(args.preset), args.tokens, args.gpu, mfu, args.seq_len, args.price)
    print(f"{args.preset}: {args.tokens:.3g} tokens on {args.gpu} at {mfu:.0%} utilisation: {c.line()}")


def cmd_eval(args: argparse.Namespace) -> None:
    import json
    from .atomic import atomic_write_text
    from .data import held_out_problems
    from .engine import LLM
    from .eval import evaluate
    from .tasks import TASKS, get_task
    llm = LLM(args.checkpoint)
    rows = []
    for name in args.task or sorted(TASKS):
        problems = held_out_problems(name, args.n, args.seed, args.template)
        r = evaluate(llm, get_task(name, args.template), problems, args.max_new_tokens, args.k)
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.as_dict().items()))
        rows += [json.dumps({"task": name, **s}) + "\n" for s in r.samples]
    if args.out:
        atomic_write_text(args.out, "".join(rows))
        print(f"wrote {len(rows)} samples to {args.out}")


COMPILING = "compiling the decode forwards (10-45 s the first time; about 90 s with --speculative) ..."


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode forwards: faster decoding once compiled (10-45 s, cached on disk)")


def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import LLM, SamplingParams
    llm = LLM(args.checkpoint, speculative=args.speculative, compile=args.compile)
    if args.compile:
        print(COMPILING, file=sys.stderr, flush=True)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    for delta in llm.stream(args.prompt, params):
        print(delta.text, end="", flush=True)
    print()


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export
    out = export(args.checkpoint, args.out, target=args.target, dtype=None if args.dtype == "auto" else args.dtype,
                 check=not args.no_check)
    print(f"exported {args.checkpoint} for {args.target} -> {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from .engine import LLM
    from .serve.api import create_app
    from .serve.async_engine import server_threads
    from .tokenizer import read_chat_template
    chat_template = None  # None: the checkpoint's own template (tokenizer_config.json), else the built-in one
    if args.chat_template is not None:  # checked before the model loads, so a typo fails at once
        try:
            chat_template = read_chat_template(args.chat_template)
        except ValueError as e:
            raise ValueError(f"--chat-template: {e}") from None
    torch.set_num_threads(server_threads(args.threads))
    llm = LLM(args.checkpoint, max_num_seqs=args.max_concurrency, max_batched_tokens=args.max_num_batched_tokens,
              cache_memory_mb=args.cache_memory_mb, speculative=args.speculative, compile=args.compile)
    if args.compile:
        print(COMPILING, flush=True)
        llm.warm_up()
    app = create_app(llm, served_model_name=args.served_model_name, api_key=args.api_key,
                     max_pending=args.max_concurrency + args.max_queue, chat_template=chat_template)
    print(f"serving {args.checkpoint} as {args.served_model_name!r}: chat page at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push
    info = push(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                commit_message=args.commit_message, license=args.license)
    print(f"pushed {args.checkpoint} to {args.repo_id}" + (f"@{args.revision}" if args.revision else "")
          + (f": {info}" if info else ""))


HUB_ID = "or a Hugging Face Hub id org/name[@revision]"


def _report_to(value: str) -> str:
    """--report-to checked at parse time, before any data or model is built."""
    from .train.report import check_available, parse_report_to
    try:
        check_available(parse_report_to(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _report_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report-to", default="none", metavar="TRACKERS", type=_report_to,
                   help="also log metrics to: none, tensorboard (OUT/tensorboard), wandb, all, "
                        "or a comma list")


def _expert_parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert-parallel", type=int, default=1, metavar="E",
                   help="under torchrun: split each MoE layer's routed experts across E ranks (all-to-all "
                        "dispatch); the process count must be a multiple of E")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, FLOPs and cache size of presets")
    p.add_argument("--preset", action="append", choices=sorted(PRESETS))
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="R1-Zero in miniature: pretrain, GRPO, evaluate, report (built-in data)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--task", default="addition@2", help="a built-in task, NAME@LEVELS keeps those difficulty levels")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--grpo-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-distill", action="store_true",
                   help="also distil the RL model into a dense student, against GRPO on that student")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE with the chat/reasoning special tokens")
    t.add_argument("--corpus", nargs="+", required=True, help=".txt/.jsonl/.parquet files")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("pretrain", help="pretrain a DeepSeek-V3-style base model (torchrun-ready)")
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--data", default="builtin", help="'builtin' or a .txt/.jsonl/.parquet file")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: train one on the data)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--num-docs", type=int, default=40000)
    p.add_argument("--task", action="append", help="built-in data: a task (repeatable; NAME@LEVELS keeps those "
                   "difficulty levels); default: arithmetic and countdown")
    p.add_argument("--scratchpad", type=float, default=0.25, help="built-in data: share of worked examples "
                   "with step-by-step reasoning")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="fp32")
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--alpha", type=float, default=1e-4, help="sequence-wise balance loss weight")
    p.add_argument("--gamma", type=float, default=0.01, help="gate bias update speed (V3: 0.001)")
    p.add_argument("--dense", action="store_true", help="dense FFN with the same activated parameters")
    p.add_argument("--no-doc-mask", action="store_true", help="let attention cross packed document boundaries")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=4, help="batches of held-out rows per validation")
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP under torchrun")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (a minute to compile)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", required=True)
    _report_flag(p)
    _expert_parallel_flag(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("grpo", help="reinforcement learning with GRPO on a verifiable task (torchrun-ready)")
    p.add_argument("--init", required=True,
                   help=f"checkpoint directory (with tokenizer) to start from, {HUB_ID}")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (a rollout every --mu steps)")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--beta", type=float, default=0.0, help="k3 KL weight against the frozen reference")
    p.add_argument("--ref-reset-every", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--epsilon-low", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=0.28)
    p.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group")
    p.add_argument("--loss-type", choices=["grpo", "dapo", "dr_grpo"], default="dapo")
    p.add_argument("--mu", type=int, default=1, help="updates per rollout batch")
    p.add_argument("--micro-batch-size", type=int, default=64, help="sequences per forward/backward")
    p.add_argument("--dynamic-sampling", action="store_true")
    p.add_argument("--mask-truncated", action="store_true")
    p.add_argument("--format-weight", type=float, default=0.1)
    p.add_argument("--consistency-weight", type=float, default=0.0,
                   help="R1 language-consistency reward: share of reasoning words in Latin script")
    p.add_argument("--overlong-cache", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--eval-k", type=int, default=4)
    p.add_argument("--template", choices=["chat", "r1zero"], default="chat")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="fp32")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    _report_flag(p)
    p.add_argument("--log-completions-every", type=int, default=10, metavar="K",
                   help="every K steps, a rollout batch's completions with each reward and advantage to "
                        "OUT/completions.jsonl and the trackers (0: never)")
    _expert_parallel_flag(p)
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens; torchrun-ready)")
    p.add_argument("--init", required=True,
                   help=f"checkpoint directory (with tokenizer) to fine-tune, {HUB_ID}")
    p.add_argument("--data", required=True, help="JSONL of {messages: [...]} with optional reasoning_content")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    p.add_argument("--strict", action="store_true", help="stop at the first malformed line instead of skipping")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp8"], default="fp32")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--resume", action="store_true")
    _report_flag(p)
    _expert_parallel_flag(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("sample", help="rejection sampling: verified-correct samples as SFT JSONL")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output JSONL")
    add_sample_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("distill", help="rejection-sample a teacher and SFT a small dense student on it")
    p.add_argument("--teacher", required=True, help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--student-preset", default="dense-small", choices=sorted(PRESETS))
    p.add_argument("--student-init", help=f"a student base checkpoint (same tokenizer) {HUB_ID}; "
                   "default: from scratch")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    add_sample_args(p)
    _report_flag(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("cost", help="FLOPs, GPU-hours and dollars of a training run")
    p.add_argument("--preset", default="v3", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=float, required=True)
    p.add_argument("--gpu", default="h800")
    p.add_argument("--mfu", type=float, help="utilisation (default: V3's implied)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("eval", help="greedy / pass@1 / cons@k accuracy on held-out task problems")
    p.add_argument("checkpoint", help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--task", action="append", help="repeatable; default: every built-in task")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--k", type=int, default=0, help="samples per problem for pass@1 and cons@k")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=["chat", "r1zero"], default="chat", help="the prompt format trained on")
    p.add_argument("--out", help="JSONL of every sample")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="stream a completion to the terminal")
    p.add_argument("checkpoint", help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    _engine_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI/DeepSeek-compatible API server with a chat page")
    p.add_argument("checkpoint", help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 requests")
    p.add_argument("--served-model-name", default="nanoseek")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to render chat requests with (default: the checkpoint's)")
    p.add_argument("--max-concurrency", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="further requests that may wait (then 429)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024,
                   help="tokens one engine step may compute (prefill chunks + decodes)")
    p.add_argument("--cache-memory-mb", type=float, default=256)
    _engine_flags(p)
    p.add_argument("--threads", type=int, help="torch threads for the engine (default: CPU cores - 1)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a checkpoint in the shape another engine needs (same outputs)")
    p.add_argument("checkpoint", help="source checkpoint directory")
    p.add_argument("out", help="directory to write the export to (config.json, weights, tokenizer)")
    p.add_argument("--for", dest="target", required=True, choices=["vllm"],
                   help="vllm: MLA widened, function-preserving, to kv_lora_rank 512 + qk_rope_head_dim 64 "
                        "unless already so (the 576-wide latent vLLM's CPU backend requires; its GPU backends "
                        "take it too)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weight dtype of the export (auto: the source's; FP8 sources as bfloat16)")
    p.add_argument("--no-check", action="store_true",
                   help="skip comparing the export's logits with the source's on a few tokens before writing")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a checkpoint to the Hugging Face Hub with a generated model card")
    p.add_argument("checkpoint", help="checkpoint directory (its model, tokenizer and config are uploaded)")
    p.add_argument("repo_id", help="org/name of the Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", "--branch", dest="revision", help="branch to push to (created if missing; "
                   "default: main)")
    p.add_argument("--commit-message", help="default: 'Upload DIR with nanoseek'")
    p.add_argument("--license", help="license id for the model card's metadata (e.g. mit, apache-2.0)")
    p.set_defaults(func=cmd_push)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
