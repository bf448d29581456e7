"""The `nanoseek` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, ModelConfig
from .model import DeepSeekV3, LatentCache


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


@torch.no_grad()
def greedy(model: DeepSeekV3, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation through the absorbed-MLA latent cache (the engine does this at scale)."""
    cache = LatentCache(model.config, batch=1, max_len=len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt]), cache=cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([out[-1:]]), cache=cache)
    return out


def cmd_info(args: argparse.Namespace) -> None:
    for name in args.preset or list(PRESETS):
        print(describe(ModelConfig.preset(name), name))


def cmd_demo(args: argparse.Namespace) -> None:
    """Showcase of the core: presets, a save/load round trip in the HF format, a greedy continuation."""
    for name in PRESETS:
        print(describe(ModelConfig.preset(name), name))
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("small")).eval()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        save_model(model, d)
        loaded = load_model(d)
        print(f"\nsaved and re-loaded the small model in the Hugging Face format in {time.perf_counter() - t:.2f}s")
    prompt = [1, 2, 3, 4, 5]
    t = time.perf_counter()
    out = greedy(loaded, prompt, 32)
    print(f"greedy continuation of {prompt} (random weights, 32 tokens in {time.perf_counter() - t:.2f}s): {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts, FLOPs and cache size of presets")
    p.add_argument("--preset", action="append", choices=sorted(PRESETS))
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="run the showcase")
    p.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
