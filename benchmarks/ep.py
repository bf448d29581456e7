"""Expert parallelism (V3 report §3.2): measured in miniature, then V3's all-to-all volume on paper.

    python benchmarks/ep.py                      # both parts
    python benchmarks/ep.py --paper-only         # only the V3 table

Part 1 trains the same model under two gloo processes twice, interleaving the steps: plain DDP (every rank
holds every expert and all-reduces every gradient) and --expert-parallel 2 (each rank holds half the experts
of each MoE layer; tokens travel to them with all-to-all). It reports the median step time and the bytes each
rank sends per step: the gradient all-reduce (a ring all-reduce sends 2(N-1)/N of the reduced bytes per
rank) and the all-to-all (measured: forward dispatch + combine to other ranks, the backward as much again).

Part 2 is arithmetic on V3's configuration: all-to-all bytes per token per MoE layer and per step with FP8
dispatch and BF16 combine, with and without the node limit, against all-gathering every expert's weights.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import tempfile

import torch
import torch.multiprocessing as mp

from nanoseek import DeepSeekV3, ModelConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(args.threads)
    from nanoseek.train.loop import TrainConfig, Trainer
    from nanoseek.train.pretrain import next_token_loss

    config = ModelConfig.preset(args.preset)
    rows = args.batch // 2
    trainers = {}
    for mode, degree in (("DDP", 1), ("EP=2", 2)):
        torch.manual_seed(0)
        model = DeepSeekV3(config).train()
        tc = TrainConfig(steps=args.warmup + args.steps, lr=1e-3, warmup=1, expert_parallel=degree)
        trainers[mode] = Trainer(model, tc, os.path.join(out, mode))

    def loss_fn_of(trainer: Trainer):
        def loss_fn(step: int, micro: int):
            g = torch.Generator().manual_seed(step * 2 + rank)
            ids = torch.randint(config.vocab_size, (rows, args.seq + 1), generator=g)
            o = trainer.wrapped(ids[:, :-1], mtp=True, router_stats=True)
            loss = next_token_loss(o.logits, ids, None, None, 1)
            loss = loss + 0.3 * next_token_loss(o.mtp_logits[0], ids, None, None, 2)
            return loss, {"loss": loss.detach()}

        return loss_fn

    times: dict[str, list[float]] = {m: [] for m in trainers}
    a2a: list[float] = []
    for step in range(args.warmup + args.steps):
        for mode, trainer in trainers.items():
            trainer.cfg.steps = step + 1  # one step per call, the two modes interleaved
            record = trainer.train(loss_fn_of(trainer), progress=False)[-1]
            if step >= args.warmup:
                times[mode].append(record["step_seconds"])
                if "ep_a2a_bytes_step" in record:
                    a2a.append(record["ep_a2a_bytes_step"] / 2)  # per rank
    if rank:
        return
    ep = trainers["EP=2"].ep
    expert_ids = {id(p) for p in ep.params}
    ring = 2 * (2 - 1) / 2  # a ring all-reduce over N ranks sends 2(N-1)/N of the tensor per rank
    full = sum(p.numel() for p in trainers["DDP"].model.parameters())
    held = sum(p.numel() for p in trainers["EP=2"].model.parameters())
    dense = sum(p.numel() for p in trainers["EP=2"].model.parameters() if id(p) not in expert_ids)
    rows_out = [
        ("DDP", statistics.median(times["DDP"]), ring * full * 4, 0.0, full),
        ("EP=2", statistics.median(times["EP=2"]), ring * dense * 4, statistics.mean(a2a), held),
    ]
    print(
        f"\n{args.preset} preset, 2 gloo processes x {args.threads} thread(s), global batch {args.batch} x "
        f"{args.seq} tokens, median of {args.steps} steps after {args.warmup} warm-up (interleaved)"
    )
    print(
        f"{'':<6}{'step ms':>10}{'tokens/s':>10}{'all-reduce MB':>15}{'all-to-all MB':>15}{'sent MB':>10}"
        f"{'params held':>13}"
    )
    for name, t, reduce_b, a2a_b, params in rows_out:
        print(
            f"{name:<6}{t * 1e3:>10.1f}{args.batch * args.seq / t:>10.0f}{reduce_b / 1e6:>15.2f}"
            f"{a2a_b / 1e6:>15.2f}{(reduce_b + a2a_b) / 1e6:>10.2f}{params / 1e6:>12.2f}M"
        )
    print("(MB sent per rank per step; all-to-all measured, remote rows only, forward + backward)")


def v3_table(
    tokens_per_step: float,
    gpus: int,
    pp: int,
    micro_tokens: int,
    node_limit: int,
    gpus_per_node: int,
    ep: int,
) -> None:
    c = ModelConfig.preset("v3")
    d, k, e, inter = c.hidden_size, c.num_experts_per_tok, c.n_routed_experts, c.moe_intermediate_size
    layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers)) + c.num_nextn_predict_layers
    nodes = ep // gpus_per_node
    b_dispatch = d + math.ceil(d / 128) * 4  # FP8: 1 byte a value + one fp32 scale per 1x128 tile
    b_combine = 2 * d  # BF16
    dp = gpus // pp  # ranks that run a given layer, each on its share of the step's tokens
    tokens_per_gpu = tokens_per_step / dp  # through each MoE layer it holds, per step
    layers_per_gpu = layers / pp
    expert_bytes = 3 * d * inter * 2  # gate, up, down of one expert in BF16
    gather = e * expert_bytes  # every expert of one layer
    print(
        f"\nV3 on paper: {e} experts, top-{k}, hidden {d}, EP{ep} over {nodes} nodes of {gpus_per_node}, "
        f"{layers} MoE layers (incl. MTP), {tokens_per_step / 1e6:.1f}M tokens a step on {gpus} GPUs (PP{pp}: "
        f"{tokens_per_gpu:,.0f} tokens per GPU through each of ~{layers_per_gpu:.1f} layers)"
    )
    print(
        f"  dispatch copy b_d = d + 4*ceil(d/128) = {b_dispatch:,} B (FP8 + scales); combine copy "
        f"b_c = 2d = {b_combine:,} B (BF16)"
    )
    rows = []
    for name, copies in (
        (f"EP{ep} all-to-all, {node_limit}-node limit", min(node_limit, nodes)),
        (f"EP{ep} all-to-all, no node limit", min(k, nodes)),
    ):
        per_token = copies * (b_dispatch + b_combine)
        rows.append(
            (name, f"{copies} x (b_d + b_c)", per_token, 2 * per_token * tokens_per_gpu * layers_per_gpu)
        )
    for name, tokens in (
        ("all-gather experts, once a step", tokens_per_gpu),
        (f"all-gather experts, per {micro_tokens}-token micro-batch", micro_tokens),
    ):
        per_layer = 3 * gather  # forward gather, backward gather, gradient reduce-scatter
        rows.append(
            (
                name,
                f"3 x E x 3dI x 2 / {tokens:,.0f}",
                per_layer / tokens,
                per_layer * tokens_per_gpu / tokens * layers_per_gpu,
            )
        )
    print(f"  {'scheme':<46}{'bytes/token/layer':>30}{'':>12}{'GB per GPU per step':>21}")
    for name, formula, per_token, per_step in rows:
        print(f"  {name:<46}{formula:>30}{per_token / 1e3:>10,.1f} KB{per_step / 1e9:>21,.1f}")
    print(
        "  per step = 2 (forward, backward) x bytes/token/layer x tokens per GPU x layers per GPU for the "
        "all-to-all (at most: a token's copy to its own node stays on NVLink);\n  the gathers count "
        f"their own 3 transfers. Holding every expert of a layer takes {gather / 1e9:.1f} GB; EP{ep} holds "
        f"{e // ep} experts a GPU ({e // ep * expert_bytes / 1e9:.2f} GB a layer)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--paper-only", action="store_true")
    ap.add_argument("--v3-tokens-per-step", type=float, default=15360 * 4096, help="V3's final batch size")
    ap.add_argument("--v3-gpus", type=int, default=2048)
    ap.add_argument("--v3-pp", type=int, default=16)
    ap.add_argument("--v3-micro-tokens", type=int, default=4096)
    args = ap.parse_args()
    if not args.paper_only:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_worker, args=(_free_port(), args, out), nprocs=2)
    v3_table(
        args.v3_tokens_per_step,
        args.v3_gpus,
        args.v3_pp,
        args.v3_micro_tokens,
        node_limit=4,
        gpus_per_node=8,
        ep=64,
    )


if __name__ == "__main__":
    main()
