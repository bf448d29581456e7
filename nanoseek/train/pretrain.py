"""Pretraining with the V3 recipe: next-token + lambda x MTP loss, a small sequence-wise balance loss, and
aux-loss-free balancing (gate biases nudged by +-gamma toward the mean expert load after every step).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..atomic import atomic_write_text
from ..checkpoint import load_model
from ..config import PRESETS, ModelConfig, option
from ..cost import GPU_PEAK, PRICE_PER_GPU_HOUR, v3_implied_mfu
from ..data import Batches, builtin_documents, document_ids, held_out_problems, pack, read_documents, tokenize
from ..hub import resolve_checkpoint
from ..model import DeepSeekV3, Gate, MoE
from ..plots import plot_series
from ..tokenizer import EOS, load_tokenizer, save_tokenizer, train_tokenizer
from .expert_parallel import check_expert_parallel
from .loop import TrainConfig, Trainer, setup_distributed


def next_token_loss(
    logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None, seg: torch.Tensor | None, k: int
) -> torch.Tensor:
    """Cross-entropy of logits[:, i] against ids[:, i + k]; with `keep`, only over kept targets inside
    logits[:, i]'s document (`seg`). The others are ignored rather than indexed away, so shapes stay static:
    compiled with the model's training (`TrainConfig.compile`), log-softmax and its backward fuse (a `small`
    step 1.03x faster)."""
    s = logits.shape[1]
    target = ids[:, k : k + s]
    if keep is not None:
        target = target.masked_fill(~(keep[:, k : k + s] & (seg[:, k : k + s] == seg[:, :s])), -100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


@dataclass
class PretrainConfig:
    preset: str = option("small", "model size: a preset of nanoseek.config.PRESETS", choices=tuple(PRESETS))
    data: str = option("builtin", "'builtin' (worked task examples) or a .txt/.jsonl/.parquet file")
    tokenizer: str | None = option(None, "a directory with tokenizer.json (default: train one on the data)")
    init: str | None = option(
        None, "continue from this checkpoint (and its tokenizer) instead of a new model"
    )
    vocab_size: int = option(1024, "size of the tokenizer trained on the data")
    seq_len: int = option(256, "tokens per packed training row")
    batch_size: int = option(16, "rows per optimizer step (global, across ranks and micro-batches)")
    num_docs: int = option(40000, "built-in data: worked examples in the corpus")
    tasks: tuple[str, ...] = option(
        ("arithmetic", "countdown"),
        "built-in data: a task (repeatable; NAME@LEVELS keeps those difficulty levels)",
        flag="--task",
    )
    scratchpad: float = option(0.25, "built-in data: share of worked examples that reason step by step")
    asked: float = option(
        0.0, "built-in data: share of examples whose question asks for the steps (they always show them)"
    )
    mtp_lambda: float = option(0.3, "weight of the multi-token-prediction loss")
    balance_alpha: float = option(1e-4, "sequence-wise balance loss weight", flag="--alpha")
    # V3 used 0.001 over ~500K steps; short CPU runs need faster biases
    bias_gamma: float = option(0.01, "gate bias update speed (aux-loss-free balancing)", flag="--gamma")
    dense: bool = option(False, "dense FFN with the same activated parameters instead of MoE (ablation)")
    doc_mask: bool = option(
        True, "attention stays within each packed document (positions restart per document)"
    )
    eval_every: int = option(50, "validation loss every N steps (0: never)")
    val_batches: int = option(4, "batches of held-out rows per validation")
    eval_problems: int = option(100, "held-out problems per task for the final accuracy")
    held_out: int = option(0, "held-out problems per task kept out of the corpus (at least --eval-problems)")


def dense_equivalent(config: ModelConfig) -> ModelConfig:
    """A dense model with the MoE model's activated FFN parameters (for the DeepSeekMoE ablation): every
    layer gets the mean of the activated FFN widths (dense width, or (top-k + shared) x expert width)."""
    widths = [
        config.moe_intermediate_size * (config.num_experts_per_tok + config.n_shared_experts)
        if config.is_moe_layer(i)
        else config.intermediate_size
        for i in range(config.num_hidden_layers)
    ]
    return config.replace(
        first_k_dense_replace=config.num_hidden_layers + config.num_nextn_predict_layers,
        n_routed_experts=0,
        n_shared_experts=0,
        n_group=1,
        topk_group=1,
        intermediate_size=round(sum(widths) / len(widths)),
    )


def moe_gates(model: DeepSeekV3) -> list[Gate]:
    """Gates in the order the forward pass reports their load (main layers, then MTP)."""
    return [m.mlp.gate for m in list(model.model.layers) + list(model.mtp) if isinstance(m.mlp, MoE)]


@torch.no_grad()
def update_gate_biases(model: DeepSeekV3, load: torch.Tensor, gamma: float) -> None:
    """V3 §2.1.2: b_i -= gamma if expert i is over the mean load, += gamma if under."""
    for gate, layer_load in zip(moe_gates(model), load):
        gate.e_score_correction_bias += gamma * torch.sign(layer_load.float().mean() - layer_load.float())


def build_data(pc: PretrainConfig, out: Path, seed: int, rank: int, world: int, resume: bool = False):
    """Tokenizer (trained on rank 0 if not given; a resumed run keeps the one it started with), packed
    train/val rows, and held-out problems."""
    kept_out = max(pc.eval_problems, pc.held_out)
    excluded = {t: held_out_problems(t, kept_out, seed) for t in pc.tasks} if pc.data == "builtin" else {}
    held_out = {t: ps[: pc.eval_problems] for t, ps in excluded.items()} if pc.eval_problems else {}
    if pc.data == "builtin":
        exclude = {p.question for ps in excluded.values() for p in ps}
        docs = builtin_documents(pc.num_docs, seed, pc.tasks, pc.scratchpad, exclude, pc.asked)
    else:
        docs = read_documents(pc.data)
    given = pc.tokenizer or (pc.init and str(resolve_checkpoint(pc.init)))
    tok_dir = Path(given) if given else out / "tokenizer"
    if given is None and rank == 0 and not (resume and load_tokenizer(tok_dir) is not None):
        texts = ["".join(d) if isinstance(d, tuple) else d for d in docs]
        save_tokenizer(train_tokenizer(texts, pc.vocab_size), tok_dir, model_max_length=pc.seq_len * 4)
    if world > 1:
        dist.barrier()
    tok = load_tokenizer(tok_dir)
    if tok is None:
        raise ValueError(f"tokenizer: no tokenizer.json in {tok_dir}")
    rows = pack(tokenize(tok, docs), pc.seq_len)
    n_val = max(pc.val_batches * pc.batch_size, rows.shape[0] // 20)
    if rows.shape[0] <= n_val:
        raise ValueError(
            f"data: only {rows.shape[0]} sequences of {pc.seq_len + 1} tokens; need more than "
            f"{n_val} (add data or lower --seq-len)"
        )
    return tok, tok_dir, rows[:-n_val], rows[-n_val:], held_out


def pretrain(
    pc: PretrainConfig, tc: TrainConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True
) -> dict:
    """Train a base model into `out` (checkpoints under out/checkpoints); returns the run summary."""
    d = setup_distributed(tc.device)
    config = ModelConfig.preset(pc.preset)
    if pc.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len: {pc.seq_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    # before the tokenizer and data: the model an --init checkpoint holds is checked by the Trainer
    check_expert_parallel(
        tc.expert_parallel,
        d.world,
        None if pc.init else dense_equivalent(config) if pc.dense else config,
        tc.fsdp,
    )
    return train_lm(
        pc, tc, out, build_data(pc, Path(out), tc.seed, d.rank, d.world, resume), resume, progress
    )


def train_lm(
    pc: PretrainConfig,
    tc: TrainConfig,
    out: str | os.PathLike,
    data: tuple,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """The language-model training run shared by pretraining and SFT.

    `data` = (tokenizer, tokenizer dir, train rows, val rows, held-out problems). Rows are token ids
    [N, L+1] (every token is a target; a document ends at its EOS), or [N, 3, L+1] stacking ids, a
    0/1 target mask and document ids (SFT: only assistant tokens are targets).
    """
    out = Path(out)
    d = setup_distributed(tc.device)
    if tc.grad_accum * d.world > pc.batch_size or pc.batch_size % (tc.grad_accum * d.world):
        raise ValueError(
            f"batch_size: {pc.batch_size} must be a multiple of grad_accum x ranks "
            f"({tc.grad_accum} x {d.world})"
        )
    tok, tok_dir, train_rows, val_rows, held_out = data
    config = ModelConfig.preset(pc.preset).replace(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id("<｜begin▁of▁sentence｜>"),
        eos_token_id=tok.token_to_id("<｜end▁of▁sentence｜>"),
    )
    if pc.dense:
        config = dense_equivalent(config)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if pc.init:
        model = load_model(pc.init).train()
        config = model.config
    else:
        model = DeepSeekV3(config).train()
    run_config = {k: v for k, v in asdict(pc).items() if k not in ("eval_every", "eval_problems")}
    run_config["tasks"] = list(pc.tasks)
    trainer = Trainer(model, tc, out, tokenizer_dir=tok_dir, run_config=run_config)
    if resume and not trainer.resume():
        print(f"nanoseek: nothing to resume in {out}/checkpoints; starting fresh")
    elif not resume and trainer.metrics_path.exists() and d.main:
        trainer.metrics_path.unlink()

    micro_rows = pc.batch_size // tc.grad_accum
    batches = Batches(train_rows, micro_rows, tc.seed)
    load_acc: list[torch.Tensor] = []

    eos = tok.token_to_id(EOS)

    def unpack(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if rows.dim() == 3:
            return rows[:, 0], rows[:, 1].bool(), rows[:, 2]
        return rows, None, document_ids(rows, eos) if pc.doc_mask else None

    ce = torch.compile(next_token_loss) if tc.compile else next_token_loss

    def loss_fn(step: int, micro: int):
        ids, keep, seg = unpack(batches.get(step * tc.grad_accum + micro, d.rank, d.world).to(d.device))
        x = ids[:, :-1]
        out_ = trainer.wrapped(
            x,
            mtp=config.num_nextn_predict_layers > 0,
            router_stats=True,  # a ModelOutput
            segments=None if seg is None else seg[:, :-1],
        )
        main = ce(out_.logits, ids, keep, seg, 1)
        loss, metrics = main, {"loss": main.detach()}
        if out_.mtp_logits:
            mtp = sum(ce(lg, ids, keep, seg, k + 1) for k, lg in enumerate(out_.mtp_logits, start=1)) / len(
                out_.mtp_logits
            )
            loss = loss + pc.mtp_lambda * mtp
            metrics["mtp_loss"] = mtp.detach()
        if out_.balance_loss is not None:
            loss = loss + pc.balance_alpha * out_.balance_loss
            metrics["balance_loss"] = out_.balance_loss.detach()
            load_acc.append(out_.expert_load.detach())
        return loss, metrics

    def after_step(step: int, record: dict) -> None:
        if not load_acc:
            return
        load = d.all_reduce(torch.stack(load_acc).sum(0).float())
        load_acc.clear()
        ratio = (load.max(-1).values / load.mean(-1)).tolist()
        record.update({f"load_max_mean_{i}": r for i, r in enumerate(ratio)})
        record["load_max_mean"] = max(ratio)
        update_gate_biases(model, load, pc.bias_gamma)

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        model.eval()
        losses = []
        for b in range(pc.val_batches):
            ids, keep, seg = unpack(val_rows[b * pc.batch_size : (b + 1) * pc.batch_size].to(d.device))
            if ids.shape[0] == 0:
                break
            with trainer.autocast():
                logits = model(ids[:, :-1], segments=None if seg is None else seg[:, :-1])
            losses.append(ce(logits, ids, keep, seg, 1))
        model.train()
        if not losses:
            return {}
        return {"val_loss": float(d.all_reduce(torch.stack(losses).mean(), "mean"))}

    t0 = time.perf_counter()
    tokens_per_step = pc.batch_size * pc.seq_len
    start_step = trainer.step
    trainer.train(loss_fn, after_step, evaluate, pc.eval_every, tokens_per_step, progress)
    seconds = time.perf_counter() - t0
    if trainer.interrupted:
        return {"interrupted": True, "step": trainer.step}
    whole = trainer.finish()
    summary = {
        "steps": trainer.step,
        "seconds": seconds,
        "params": config.num_params(),
        "active_params": config.num_active_params(),
    }
    if d.main:
        summary.update(_report(out, config, pc, (trainer.step - start_step) * tokens_per_step, seconds))
        if held_out:
            summary["accuracy"] = _accuracy(whole.to(d.device), tok, held_out)
        atomic_write_text(out / "pretrain_summary.json", json.dumps(summary, indent=2))
    return summary


def _report(out: Path, config: ModelConfig, pc: PretrainConfig, tokens: int, seconds: float) -> dict:
    """Plots and the run's cost line: FLOPs done, measured FLOP/s, equivalent H800-hours and dollars."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    series = {"train loss": (steps, [r["loss"] for r in records])}
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        series["val loss"] = ([s for s, _ in val], [v for _, v in val])
    plot_series(out / "loss.png", "pretraining loss", series, "cross-entropy")
    load_keys = sorted(k for k in records[-1] if k.startswith("load_max_mean_"))
    if load_keys:
        plot_series(
            out / "expert_load.png",
            "expert load max/mean per MoE layer",
            {
                k.removeprefix("load_max_mean_"): (steps, [r.get(k, float("nan")) for r in records])
                for k in load_keys
            },
            "max / mean load",
        )
    flops = tokens * config.train_flops_per_token(pc.seq_len, mtp=config.num_nextn_predict_layers > 0)
    h800_hours = flops / (GPU_PEAK["h800"] * v3_implied_mfu()) / 3600
    cost = {
        "tokens": tokens,
        "flops": flops,
        "flops_per_s": flops / max(seconds, 1e-9),
        "h800_hours": h800_hours,
        "dollars": h800_hours * PRICE_PER_GPU_HOUR,
    }
    print(
        f"cost: {flops:.3e} FLOPs in {seconds:.0f}s ({cost['flops_per_s'] / 1e9:.1f} GFLOP/s measured) = "
        f"{h800_hours * 3600:.3f} H800-seconds at V3's utilisation, ${cost['dollars']:.6f}"
    )
    return {
        "cost": cost,
        "final_loss": records[-1]["loss"],
        "final_val_loss": val[-1][1] if val else None,
        "final_load_max_mean": records[-1].get("load_max_mean"),
    }


def _accuracy(model: DeepSeekV3, tok, held_out: dict) -> dict:
    from ..engine import LLM
    from ..eval import evaluate
    from ..tasks import get_task

    model.eval()
    llm = LLM(model, tok)
    acc = {name: evaluate(llm, get_task(name), problems).as_dict() for name, problems in held_out.items()}
    for name, r in acc.items():
        print(f"held-out greedy accuracy, {name}: {r['greedy']:.1%} (mean {r['mean_len']:.1f} tokens)")
    return acc
