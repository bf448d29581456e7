"""`nanoseek demo` over several seeds: is the R1-Zero lift a property of the recipe or of one seed?

    python benchmarks/demo_seeds.py [--seeds 0-4] [--out runs/demo_seeds] [-- demo options...]

Runs `nanoseek demo --seed S` for each seed in its own process (as a user would), then prints one row per
seed: held-out greedy accuracy and pass@1 of the base, after GRPO and of the supervised control (same base,
same wall time), the lifts, mean completion length before and after, the share of the base's and the RL
model's greedy completions that think (a non-empty <think>), and minutes. The last rows are the medians
and the minima of the lifts. Options after `--` go to every demo run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from nanoseek.tasks import parse_ranges


def think_share(samples: list[dict], model: str) -> float:
    """Share of greedy completions with something inside <think> (the prompt opens it)."""
    rows = [s for s in samples if s["model"] == model and s["mode"] == "greedy"]
    return sum(bool(s["completion"].split("</think>")[0].strip()) for s in rows) / max(len(rows), 1)


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nanoseek.cli", "demo", "--seed", str(seed), "--out", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    summary["think"] = {m: think_share(samples, m) for m in ("base", "rl")}
    return summary


def table(rows: dict[int, dict]) -> str:
    head = (
        f"{'seed':>4} | {'greedy base→RL (SFT)':>22} | {'pass@1 base→RL (SFT)':>22} | {'lift g/p':>9} | "
        f"{'RL−SFT':>6} | {'tokens':>11} | {'thinks':>11} | {'min':>4}"
    )
    lines = [head, "-" * len(head)]
    lifts_g, lifts_p, margins = [], [], []
    for seed, s in rows.items():
        b, r, c = s["base"], s["rl"], s["sft_control"]
        lg, lp, m = r["greedy"] - b["greedy"], r["pass@1"] - b["pass@1"], r["greedy"] - c["greedy"]
        lifts_g.append(lg), lifts_p.append(lp), margins.append(m)
        lines.append(
            f"{seed:>4} | {b['greedy']:>6.0%} → {r['greedy']:>4.0%} ({c['greedy']:>4.0%}) | "
            f"{b['pass@1']:>6.0%} → {r['pass@1']:>4.0%} ({c['pass@1']:>4.0%}) | "
            f"{100 * lg:>+4.0f}/{100 * lp:>+3.0f} | {100 * m:>+6.0f} | "
            f"{b['mean_len']:>4.1f} → {r['mean_len']:>4.1f} | {s['think']['base']:>4.0%} → {s['think']['rl']:>4.0%} | "
            f"{s['seconds'] / 60:>4.1f}"
        )
    for name, f in (("median", statistics.median), ("min", min)):
        lines.append(
            f"{name:>6}: greedy lift {100 * f(lifts_g):+.0f}, pass@1 lift {100 * f(lifts_p):+.0f}, "
            f"RL − SFT control {100 * f(margins):+.0f} points"
        )
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0-4", help="seeds: 0-4 or 0,2,5 (default 0-4)")
    p.add_argument("--out", default="runs/demo_seeds", help="one demo directory per seed under it")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    rows = {}
    for seed in parse_ranges(args.seeds):
        rows[seed] = run_seed(seed, Path(args.out) / f"seed{seed}", extra)
        print(table(rows), flush=True)
    print("\ndemo options:", " ".join(extra) or "(defaults)")
    print(table(rows))
    (Path(args.out) / "table.txt").write_text(table(rows) + "\n")


if __name__ == "__main__":
    main()
