"""Training step (forward + backward + AdamW) of a preset: nanoseek vs transformers, same weights and batch.

    python benchmarks/train_step.py --preset small --batch 8 --seq 256 --steps 6 [--compile]

Reports tokens/s of each (median over interleaved steps), the ratio, and model FLOPs utilisation:
achieved FLOP/s (6 x active matmul params + attention, per token) over a 1024x1024 fp32 matmul's rate
measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from nanoseek import DeepSeekV3, ModelConfig, save_model
from nanoseek.train.loop import make_optimizer
from nanoseek.train.pretrain import next_token_loss


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def make_step(model, logits_of, loss_of=next_token_loss):
    opt = make_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)  # the trainer's, for both

    def step(ids):
        loss = loss_of(logits_of(model, ids[:, :-1]), ids, None, None, 1)  # the pretraining loss, for both
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--compile", action="store_true", help="also time nanoseek under torch.compile")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
    ours = DeepSeekV3(cfg).train().prepare("train")
    runners = {"nanoseek": make_step(ours, lambda m, x: m(x))}
    if args.compile:  # a second copy of the same weights, so both see the same updates' shapes and data
        twin = DeepSeekV3(cfg).train().prepare("train", compiled=True)
        twin.load_state_dict(ours.state_dict())
        compiled = torch.compile(twin)
        # as `nanoseek pretrain --compile` trains: the loss compiled too
        runners["nanoseek compiled"] = make_step(
            twin, lambda m, x: compiled(x), torch.compile(next_token_loss)
        )
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory() as d:
            save_model(ours, d)
            hf = AutoModelForCausalLM.from_pretrained(
                d, dtype=torch.float32, attn_implementation="sdpa"
            ).train()
        runners["transformers"] = make_step(hf, lambda m, x: m(x).logits)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    for run in runners.values():
        run(ids)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks = []  # the matmul rate is measured in every round too: a shared CPU drifts within seconds
    for _ in range(args.steps):
        peaks.append(matmul_flops(reps=5))
        for name, run in runners.items():  # interleaved so machine noise hits both alike
            t = time.perf_counter()
            run(ids)
            times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    step_flops = tokens * cfg.train_flops_per_token(args.seq)
    print(
        f"preset {args.preset}: {cfg.num_params() / 1e6:.2f}M params, {cfg.num_active_params() / 1e6:.2f}M active, "
        f"batch {args.batch} x {args.seq}, {torch.get_num_threads()} threads"
    )
    print(f"1024x1024 fp32 matmul: {statistics.median(peaks) / 1e9:.1f} GFLOP/s (median of the rounds)")
    print(f"{'impl':<18}{'step s (median)':>16}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU vs matmul':>15}")
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens / med
        mfu = statistics.median(
            step_flops / t / p for t, p in zip(ts, peaks)
        )  # each step against its round's rate
        print(f"{name:<18}{med:>16.3f}{tps[name]:>12.0f}{step_flops / med / 1e9:>10.1f}{mfu:>15.1%}")
    for name in [n for n in tps if n != "transformers" and "transformers" in tps]:
        print(f"speed-up {name} / transformers: {tps[name] / tps['transformers']:.2f}x")


if __name__ == "__main__":
    main()
