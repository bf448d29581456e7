"""The `nanoseek` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError
from .config import PRESETS, ModelConfig
from .device import DEVICES


def describe(config: ModelConfig, name: str) -> str:
    """Parameter counts, FLOPs per token and latent-cache size of a config, as printed by `nanoseek info`."""
    ratio = config.latent_dim / config.decompressed_cache_dim
    return "\n".join(
        [
            f"{name}: {config.num_params() / 1e6:,.2f}M parameters (+{config.num_mtp_params() / 1e6:,.2f}M MTP), "
            f"{config.num_active_params() / 1e6:,.2f}M activated per token",
            f"  training FLOPs/token at seq 4096: {config.train_flops_per_token(4096):.3e}; "
            f"decode FLOPs/token at context 4096: {config.decode_flops_per_token(4096):.3e}",
            f"  MLA cache per token per layer: {config.latent_dim} values vs {config.decompressed_cache_dim} "
            f"decompressed ({config.latent_dim}/{config.decompressed_cache_dim} = {ratio:.2%})",
        ]
    )


def cmd_info(args: argparse.Namespace) -> None:
    for name in args.preset or list(PRESETS):
        print(describe(ModelConfig.preset(name), name))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(config_from(DemoConfig, args))


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

    pretrain(config_from(PretrainConfig, args), config_from(TrainConfig, args), args.out, resume=args.resume)


def cmd_grpo(args: argparse.Namespace) -> None:
    from .train.grpo import GRPOConfig, GRPOTrainer
    from .train.loop import TrainConfig

    GRPOTrainer(args.init, config_from(GRPOConfig, args), config_from(TrainConfig, args), args.out).train(
        resume=args.resume
    )


def cmd_sft(args: argparse.Namespace) -> None:
    from .train.loop import TrainConfig
    from .train.sft import SFTConfig, sft

    sft(
        config_from(SFTConfig, args, eval_problems=0),
        config_from(TrainConfig, args),
        args.out,
        resume=args.resume,
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from .engine import LLM
    from .train.distill import SampleConfig, print_rates, rejection_sample, write_jsonl

    records, rates = rejection_sample(LLM(args.model, device=args.device), config_from(SampleConfig, args))
    write_jsonl(args.out, records)
    print_rates(rates, len(records))
    print(f"wrote {args.out}")


def cmd_distill(args: argparse.Namespace) -> None:
    from .train.distill import DistillConfig, SampleConfig, distill

    distill(config_from(DistillConfig, args, sample=config_from(SampleConfig, args)), args.out, args.seed)


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

    llm = LLM(args.checkpoint, device=args.device)
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


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help=f"{DEVICES}; auto: a GPU if there is one (bf16), else the CPU (fp32)"
    )


def _engine_flags(p: argparse.ArgumentParser) -> None:
    _device_flag(p)
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode forwards: faster decoding once compiled (10-45 s, cached on disk)",
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import LLM, SamplingParams

    llm = LLM(args.checkpoint, speculative=args.speculative, compile=args.compile, device=args.device)
    if args.compile:
        print(COMPILING, file=sys.stderr, flush=True)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    for delta in llm.stream(args.prompt, params):
        print(delta.text, end="", flush=True)
    print()


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export

    out = export(
        args.checkpoint,
        args.out,
        target=args.target,
        dtype=None if args.dtype == "auto" else args.dtype,
        check=not args.no_check,
    )
    print(f"exported {args.checkpoint} for {args.target} -> {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from .engine import LLM
    from .kernels import freeze_after_compiling
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
    llm = LLM(
        args.checkpoint,
        max_num_seqs=args.max_concurrency,
        max_batched_tokens=args.max_num_batched_tokens,
        cache_memory_mb=args.cache_memory_mb,
        speculative=args.speculative,
        compile=args.compile,
        device=args.device,
    )
    if args.compile:
        print(COMPILING, flush=True)
        llm.warm_up()
        freeze_after_compiling()  # the server lives as long as its graphs: no full collection walks them
    app = create_app(
        llm,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_pending=args.max_concurrency + args.max_queue,
        chat_template=chat_template,
    )
    print(
        f"serving {args.checkpoint} as {args.served_model_name!r}: chat page at http://{args.host}:{args.port}/"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def cmd_push(args: argparse.Namespace) -> None:
    from .hub import push

    info = push(
        args.checkpoint,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
    )
    print(
        f"pushed {args.checkpoint} to {args.repo_id}"
        + (f"@{args.revision}" if args.revision else "")
        + (f": {info}" if info else "")
    )


HUB_ID = "or a Hugging Face Hub id org/name[@revision]"


def _report_to(value: str) -> str:
    """--report-to checked at parse time, before any data or model is built."""
    from .train.report import check_available, parse_report_to

    try:
        check_available(parse_report_to(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default (none where there is nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (
            action.required
            or action.default is None
            or isinstance(action.default, bool)
            or action.default == argparse.SUPPRESS
        ):
            return action.help or ""
        return super()._get_help_string(action)


def add_options(
    p: argparse.ArgumentParser,
    cls: type,
    *,
    only: set[str] | None = None,
    skip: set[str] = frozenset(),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Flags for the fields of a config dataclass made with `config.option`: name, type, default, choices
    and help come from the field (`defaults` overrides a default for this command); `config_from` reads
    them back. A bool field is a switch: `--name` when it defaults to False, `--no-name` when to True; a
    `tuple[str, ...]` field is a repeatable flag."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in skip or (only is not None and f.name not in only):
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind = _without_none(hints[f.name])
        name = f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if kind is bool:
            flag = f.metadata["flag"] or (f"--no-{name}" if default else f"--{name}")
            kw.update(action="store_false" if default else "store_true", default=default)
            if default:  # the field says what is on; the flag turns it off
                kw["help"] = f"turn off: {kw['help']}"
        else:
            flag = f.metadata["flag"] or f"--{name}"
            args = typing.get_args(kind)
            if (
                typing.get_origin(kind) is tuple and args[-1] is Ellipsis
            ):  # repeatable; none given: the default
                kw.update(
                    action="append",
                    type=args[0],
                    default=None,
                    help=f"{kw['help']} (default: {' '.join(map(str, default))})",
                )
            elif typing.get_origin(kind) is tuple:
                kw.update(nargs=len(args), type=args[0], default=default)
            else:
                kw.update(type=_PARSERS.get(f.name, kind), default=default, choices=f.metadata["choices"])
            if default is dataclasses.MISSING:
                kw.update(required=True, default=None)
        p.add_argument(flag, **kw)


def config_from(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The config dataclass from the parsed flags `add_options` made (fields without a flag keep their
    defaults; `fixed` sets fields this command decides)."""
    values = dict(fixed)
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if f.name not in values and value is not None and "help" in f.metadata:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _without_none(hint: Any) -> Any:
    """`X | None` -> X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


_PARSERS: dict[str, Callable[[str], Any]] = {"report_to": _report_to}  # fields checked as they are parsed


def load_config_file(path: str) -> dict[str, Any]:
    """A --config file's flags: a JSON or YAML mapping of flag names (dashes or underscores) to values."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config: cannot read {path} ({e})") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config: {path} is not valid YAML ({e})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: {path} is not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _file_value(action: argparse.Action, value: Any) -> Any:
    """A --config value checked as the flag would check it on the command line."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag}: must be true or false, got {value!r}")
        return value  # the file names the field (doc_mask: false), not the switch (--no-doc-mask)
    parse = action.type or str
    if isinstance(action, argparse._AppendAction) or action.nargs is not None:
        value = [parse(str(v)) for v in (value if isinstance(value, list) else [value])]
    elif isinstance(value, (dict, list)):
        raise ValueError(f"{flag}: must be a single value, got {value!r}")
    else:
        value = parse(str(value))
    if action.choices is not None and any(
        v not in action.choices for v in (value if isinstance(value, list) else [value])
    ):
        raise ValueError(f"{flag}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    action.required = False
    return value


# ---- each command's flags -------------------------------------------------------------------------
def _info_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", action="append", choices=sorted(PRESETS), help="repeatable; default: every preset"
    )


def _demo_flags(p: argparse.ArgumentParser) -> None:
    from .demo import DemoConfig

    add_options(p, DemoConfig)


def _tokenizer_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", required=True, help=".txt/.jsonl/.parquet files")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokens in the vocabulary")
    p.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")


def _pretrain_flags(p: argparse.ArgumentParser) -> None:
    from .train.loop import TrainConfig
    from .train.pretrain import PretrainConfig

    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics, the final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_options(p, PretrainConfig)
    add_options(p, TrainConfig)


def _grpo_flags(p: argparse.ArgumentParser) -> None:
    from .train.grpo import GRPO_TRAIN_DEFAULTS, GRPOConfig
    from .train.loop import TrainConfig

    p.add_argument(
        "--init", required=True, help=f"checkpoint directory (with tokenizer) to start from, {HUB_ID}"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_options(p, GRPOConfig)
    add_options(p, TrainConfig, skip={"fsdp"}, defaults=GRPO_TRAIN_DEFAULTS)


def _sft_flags(p: argparse.ArgumentParser) -> None:
    from .train.loop import TrainConfig
    from .train.sft import SFT_TRAIN_DEFAULTS, SFTConfig

    p.add_argument(
        "--init", required=True, help=f"checkpoint directory (with tokenizer) to fine-tune, {HUB_ID}"
    )
    p.add_argument("--data", required=True, help="JSONL of {messages: [...]} with optional reasoning_content")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_options(
        p, SFTConfig, only={"seq_len", "batch_size", "mtp_lambda", "eval_every", "strict", "val_fraction"}
    )
    add_options(p, TrainConfig, skip={"compile"}, defaults=SFT_TRAIN_DEFAULTS)


def _sample_flags(p: argparse.ArgumentParser) -> None:
    from .train.distill import SampleConfig

    p.add_argument("--model", required=True, help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--out", required=True, help="output JSONL")
    add_options(p, SampleConfig)
    _device_flag(p)


def _distill_flags(p: argparse.ArgumentParser) -> None:
    from .train.distill import DistillConfig, SampleConfig

    p.add_argument("--out", required=True, help="output directory")
    add_options(p, DistillConfig)
    add_options(p, SampleConfig)


def _cost_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="v3", choices=sorted(PRESETS), help="the model counted")
    p.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 14.8e12")
    p.add_argument("--gpu", default="h800", help="GPU type (its peak dense BF16 FLOP/s)")
    p.add_argument("--mfu", type=float, help="utilisation (default: V3's implied)")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length (attention FLOPs)")
    p.add_argument("--price", type=float, default=2.0, help="dollars per GPU-hour")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--task", action="append", help="repeatable; default: every built-in task")
    p.add_argument("--n", type=int, default=200, help="held-out problems per task")
    p.add_argument("--k", type=int, default=0, help="samples per problem for pass@1 and cons@k")
    p.add_argument("--max-new-tokens", type=int, default=96, help="completion length limit")
    p.add_argument("--seed", type=int, default=0, help="picks the held-out problems (as training's --seed)")
    p.add_argument(
        "--template", choices=["chat", "r1zero"], default="chat", help="the prompt format trained on"
    )
    p.add_argument("--out", help="JSONL of every sample")
    _device_flag(p)


def _generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--prompt", required=True, help="the prompt text (rendered as is)")
    p.add_argument("--max-tokens", type=int, default=128, help="completion length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    _engine_flags(p)


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=f"checkpoint directory {HUB_ID}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 requests")
    p.add_argument("--served-model-name", default="nanoseek", help="the model name clients ask for")
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template to render chat requests with (default: the checkpoint's)",
    )
    p.add_argument("--max-concurrency", type=int, default=64, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="further requests that may wait (then 429)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="tokens one engine step may compute (prefill chunks + decodes)",
    )
    p.add_argument("--cache-memory-mb", type=float, default=256, help="memory of the paged latent cache")
    _engine_flags(p)
    p.add_argument("--threads", type=int, help="torch threads for the engine (default: CPU cores - 1)")
    p.add_argument("--log-level", default="info", help="uvicorn's log level")


def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=f"source checkpoint directory {HUB_ID}")
    p.add_argument("out", help="directory to write the export to (config.json, weights, tokenizer)")
    p.add_argument(
        "--for",
        dest="target",
        required=True,
        choices=["vllm"],
        help="vllm: MLA widened, function-preserving, to kv_lora_rank 512 + qk_rope_head_dim 64 "
        "unless already so (the 576-wide latent vLLM's CPU backend requires; its GPU backends "
        "take it too)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weight dtype of the export (auto: the source's; FP8 sources as bfloat16)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip comparing the export's logits with the source's on a few tokens before writing",
    )


def _push_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (its model, tokenizer and config are uploaded)")
    p.add_argument("repo_id", help="org/name of the Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument(
        "--revision",
        "--branch",
        dest="revision",
        help="branch to push to (created if missing; default: main)",
    )
    p.add_argument("--commit-message", help="default: 'Upload DIR with nanoseek'")
    p.add_argument("--license", help="license id for the model card's metadata (e.g. mit, apache-2.0)")


# (command, help, what it runs, its flags); "tokenizer train" is `train` within `nanoseek tokenizer`
COMMANDS: tuple[
    tuple[str, str, Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None]], ...
] = (
    ("info", "parameter counts, FLOPs and cache size of presets", cmd_info, _info_flags),
    ("demo", "R1-Zero in miniature: pretrain, GRPO, evaluate, report (built-in data)", cmd_demo, _demo_flags),
    (
        "tokenizer train",
        "train a byte-level BPE with the chat/reasoning special tokens",
        cmd_tokenizer,
        _tokenizer_train_flags,
    ),
    ("pretrain", "pretrain a DeepSeek-V3-style base model (torchrun-ready)", cmd_pretrain, _pretrain_flags),
    ("grpo", "reinforcement learning with GRPO on a verifiable task (torchrun-ready)", cmd_grpo, _grpo_flags),
    (
        "sft",
        "supervised fine-tuning on chat JSONL (loss on assistant tokens; torchrun-ready)",
        cmd_sft,
        _sft_flags,
    ),
    ("sample", "rejection sampling: verified-correct samples as SFT JSONL", cmd_sample, _sample_flags),
    (
        "distill",
        "rejection-sample a teacher and SFT a small dense student on it",
        cmd_distill,
        _distill_flags,
    ),
    ("cost", "FLOPs, GPU-hours and dollars of a training run", cmd_cost, _cost_flags),
    ("eval", "greedy / pass@1 / cons@k accuracy on held-out task problems", cmd_eval, _eval_flags),
    ("generate", "stream a completion to the terminal", cmd_generate, _generate_flags),
    ("serve", "OpenAI/DeepSeek-compatible API server with a chat page", cmd_serve, _serve_flags),
    (
        "export",
        "write a checkpoint in the shape another engine needs (same outputs)",
        cmd_export,
        _export_flags,
    ),
    (
        "push",
        "upload a checkpoint to the Hugging Face Hub with a generated model card",
        cmd_push,
        _push_flags,
    ),
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line, and each command's parser by name (a group's subcommand under the group's)."""
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, Any] = {}
    commands: dict[str, argparse.ArgumentParser] = {}
    for path, help, func, flags in COMMANDS:
        *group, name = path.split()
        within = sub
        if group:
            if group[0] not in groups:
                g = sub.add_parser(group[0], help=f"{group[0]} tools", description=f"{group[0]} tools")
                groups[group[0]] = g.add_subparsers(dest="action", required=True, help="what to do")
            within = groups[group[0]]
        p = within.add_parser(name, help=help, description=help, formatter_class=_Help)
        p.add_argument(
            "--config",
            metavar="FILE",
            help="a JSON or YAML file of flags (names with dashes or underscores); flags given on the "
            "command line win",
        )
        p.set_defaults(func=func)
        flags(p)
        commands[group[0] if group else name] = p
    return parser, commands


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line's arguments, with a --config file's values as the command's defaults."""
    parser, commands = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config
    name = next((a for a in argv if not a.startswith("-")), None)
    if path is not None and name in commands:  # the file's values become the command's defaults
        p = commands[name]
        try:
            values = load_config_file(path)
        except ValueError as e:
            p.error(str(e))
        # a key is a field (balance_alpha, doc_mask) or a flag's name (alpha); not a switch's negation
        actions = {a.dest: a for a in p._actions}
        actions |= {
            o.lstrip("-").replace("-", "_"): a
            for a in p._actions
            for o in a.option_strings
            if not isinstance(a, argparse._StoreFalseAction)
        }
        unknown = sorted(set(values) - set(actions) - {"config", "func"})
        if unknown:
            p.error(f"--config: {path} sets {', '.join(unknown)}, which `nanoseek {name}` does not take")
        try:
            p.set_defaults(**{actions[k].dest: _file_value(actions[k], v) for k, v in values.items()})
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            p.error(f"--config: {path}: {e}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
