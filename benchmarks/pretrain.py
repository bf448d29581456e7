"""Pretraining benchmarks, each side by side in one run on the same data and seed.

    python benchmarks/pretrain.py overhead --steps 20      # whole loop vs bare step; 2 gloo ranks vs 1
    python benchmarks/pretrain.py moe-vs-dense --steps 150 # DeepSeekMoE vs dense, same activated params
    python benchmarks/pretrain.py balance --steps 150      # expert load with gamma 0.01 vs gamma 0
    python benchmarks/pretrain.py fp8 --steps 300 --seeds 3 # --precision fp8 vs bf16: validation loss

Results land under runs/bench/ (metrics.jsonl, plots) and as tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path("runs/bench")


def run(name: str, *args: str, torchrun: int = 0) -> list[dict]:
    out = ROOT / name
    cmd = [sys.executable, "-m", "nanoseek.cli", "pretrain", *args, "--out", str(out)]
    env = dict(os.environ)
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
            "-m",
            "nanoseek.cli",
            "pretrain",
            *args,
            "--out",
            str(out),
        ]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // torchrun))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def median_tps(records: list[dict], skip: int = 3) -> float:
    return statistics.median(r["tokens_per_s"] for r in records[skip:] if "val_loss" not in r)


def bare_step_tps(steps: int, batch: int, seq: int) -> float:
    """The core issue's bare step (forward + backward + AdamW) on the same model, with MTP and balance loss."""
    from nanoseek import DeepSeekV3, ModelConfig
    from nanoseek.train.loop import make_optimizer

    torch.manual_seed(0)
    cfg = ModelConfig.preset("small")
    m = DeepSeekV3(cfg).train().prepare("train")
    opt = make_optimizer(m, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = m(ids[:, :-1], mtp=True, router_stats=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + 0.3 * F.cross_entropy(out.mtp_logits[0].flatten(0, 1), ids[:, 2:].flatten())
        (loss + 1e-4 * out.balance_loss).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times[3:])


def overhead(args) -> None:
    common = [
        "--preset",
        "small",
        "--steps",
        str(args.steps),
        "--eval-every",
        "0",
        "--eval-problems",
        "1",
        "--num-docs",
        "6000",
    ]
    loop = median_tps(run("loop", *common))
    bare = bare_step_tps(args.steps, 16, 256)
    ddp = median_tps(run("ddp2", *common, torchrun=2))
    print(f"{'what':<44}{'tokens/s':>10}{'ratio':>8}")
    print(f"{'bare step (fwd+bwd+AdamW, MTP, balance)':<44}{bare:>10.0f}{1:>8.2f}")
    print(f"{'nanoseek pretrain loop, 1 process':<44}{loop:>10.0f}{loop / bare:>8.2f}")
    print(f"{'nanoseek pretrain loop, 2 gloo processes':<44}{ddp:>10.0f}{ddp / loop:>8.2f} (vs 1 process)")


def curves(a: list[dict], b: list[dict], names: tuple[str, str]) -> None:
    va = {r["step"]: r["val_loss"] for r in a if "val_loss" in r}
    vb = {r["step"]: r["val_loss"] for r in b if "val_loss" in r}
    print(f"{'step':>6}{names[0]:>14}{names[1]:>14}")
    for s in sorted(va):
        print(f"{s:>6}{va[s]:>14.4f}{vb.get(s, float('nan')):>14.4f}")


def moe_vs_dense(args) -> None:
    common = [
        "--preset",
        "small",
        "--steps",
        str(args.steps),
        "--eval-every",
        str(max(args.steps // 6, 1)),
        "--eval-problems",
        "1",
    ]
    moe, dense = run("moe", *common), run("dense", *common, "--dense")
    curves(moe, dense, ("MoE val", "dense val"))
    from nanoseek import ModelConfig
    from nanoseek.train.pretrain import dense_equivalent

    c = ModelConfig.preset("small")
    print(
        f"activated params: MoE {c.num_active_params() / 1e6:.2f}M, dense {dense_equivalent(c).num_active_params() / 1e6:.2f}M"
    )
    fm, fd = moe[-1]["val_loss"], dense[-1]["val_loss"]
    print(f"final val loss: MoE {fm:.4f} vs dense {fd:.4f} (gap {fd - fm:+.4f}, {(fd - fm) / fd:+.1%})")


def balance(args) -> None:
    from nanoseek.plots import plot_series

    common = ["--preset", "small", "--steps", str(args.steps), "--eval-every", "0", "--eval-problems", "1"]
    on, off = run("gamma", *common, "--gamma", "0.01"), run("gamma0", *common, "--gamma", "0")
    steps = [r["step"] for r in on]
    plot_series(
        ROOT / "balance.png",
        "worst MoE layer max/mean expert load",
        {
            "gamma 0.01": (steps, [r["load_max_mean"] for r in on]),
            "gamma 0": ([r["step"] for r in off], [r["load_max_mean"] for r in off]),
        },
        "max / mean",
    )
    print(
        f"final max/mean load (worst layer): gamma 0.01 -> {on[-1]['load_max_mean']:.2f}, "
        f"gamma 0 -> {off[-1]['load_max_mean']:.2f}; plot {ROOT / 'balance.png'}"
    )


def fp8(args) -> None:
    """V3 report §3.3: FP8 training stays within 0.25% relative loss of BF16. Two runs that differ in
    rounding drift apart as any two seeds do, so each seed's pair is compared and the mean is reported."""
    from nanoseek.plots import plot_series

    rows, curves_ = [], {}
    for seed in range(args.seeds):
        common = [
            "--preset",
            "small",
            "--steps",
            str(args.steps),
            "--eval-every",
            str(max(args.steps // 6, 1)),
            "--eval-problems",
            "0",
            "--batch-size",
            "8",
            "--seq-len",
            "128",
            "--val-batches",
            str(args.val_batches),
            "--seed",
            str(seed),
        ]
        recs, secs = {}, {}
        for precision in ("bf16", "fp8"):
            t = time.perf_counter()
            recs[precision] = run(f"{precision}-seed{seed}", *common, "--precision", precision)
            secs[precision] = time.perf_counter() - t
            val = [(r["step"], r["val_loss"]) for r in recs[precision] if "val_loss" in r]
            curves_[f"{precision} seed {seed}"] = ([s for s, _ in val], [v for _, v in val])
        print(f"seed {seed}:")
        curves(recs["bf16"], recs["fp8"], ("bf16 val", "fp8 val"))
        rows.append(
            (seed, recs["bf16"][-1]["val_loss"], recs["fp8"][-1]["val_loss"], secs["bf16"], secs["fp8"])
        )
    plot_series(ROOT / "fp8.png", "validation loss, small preset", curves_)
    where = "CUDA" if torch.cuda.is_available() else "CPU, FP8 GEMMs emulated"
    print(
        f"\n{'seed':>4}{'bf16 val':>10}{'fp8 val':>10}{'fp8 vs bf16':>13}{'bf16 s':>8}{'fp8 s':>8}   ({where})"
    )
    for seed, a, b, ta, tb in rows:
        print(f"{seed:>4}{a:>10.4f}{b:>10.4f}{(b - a) / a:>+13.3%}{ta:>8.0f}{tb:>8.0f}")
    a, b = statistics.mean(r[1] for r in rows), statistics.mean(r[2] for r in rows)
    print(
        f"{'mean':>4}{a:>10.4f}{b:>10.4f}{(b - a) / a:>+13.3%}   (V3 report: under 0.25%); plot {ROOT / 'fp8.png'}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["overhead", "moe-vs-dense", "balance", "fp8"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=1, help="fp8: bf16/fp8 pairs, one per seed")
    ap.add_argument(
        "--val-batches", type=int, default=32, help="fp8: validation batches (8 x 128 tokens each)"
    )
    args = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    {"overhead": overhead, "moe-vs-dense": moe_vs_dense, "balance": balance, "fp8": fp8}[args.which](args)


if __name__ == "__main__":
    main()
