"""On one GPU: nanoseek against transformers' DeepseekV3ForCausalLM on the same weights, in bf16.

    python benchmarks/gpu.py [--presets small medium] [--steps 8] [--new-tokens 64] [--compile]

Training: a step (forward, backward, AdamW) under bf16 autocast with fp32 master weights, as
`nanoseek pretrain --device cuda` trains (precision auto), for nanoseek and for transformers (sdpa
attention) on the same batch, interleaved; tokens/s and MFU against the GPU's dense bf16 peak (the spec
sheet's figure where the name is known, else a measured 8192^3 bf16 matmul; both printed). `--compile`
adds nanoseek under torch.compile, as `pretrain --compile` trains.
Decoding: greedy, `--new-tokens` tokens after 32-token prompts, batch 1 and 64, output tokens/s of
nanoseek's engine (bf16, the default on a GPU) and of `transformers.generate` (bf16, its default cache),
each checked to have produced the same number of tokens.
`small` is the CPU demo's preset; `medium` (defined here, ~110M parameters) is closer to what a GPU is for.
Finishes in about 3 minutes on an H100 without --compile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from train_step import make_step  # benchmarks/: the step both sides run

from nanoseek import LLM, DeepSeekV3, ModelConfig, SamplingParams, save_model
from nanoseek.cost import GPU_PEAK

MEDIUM = dict(
    vocab_size=32768,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=384,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    kv_lora_rank=128,
    q_lora_rank=256,
    qk_rope_head_dim=32,
    qk_nope_head_dim=64,
    v_head_dim=64,
    max_position_embeddings=4096,
)
SHAPES = {"small": (32, 256), "medium": (16, 1024)}  # training batch x sequence


def config(name: str) -> ModelConfig:
    base = ModelConfig.preset("small")
    return base.replace(**MEDIUM) if name == "medium" else ModelConfig.preset(name)


def bf16_peak() -> tuple[float, str]:
    name = torch.cuda.get_device_name().lower()
    for gpu, peak in GPU_PEAK.items():
        if gpu in name and "pcie" not in name:  # the table holds the SXM parts' peaks
            return peak, f"{gpu.upper()} spec sheet, dense bf16"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t), "measured 8192^3 bf16 matmul"


def hf_twin(model: DeepSeekV3):
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_model(model, d)
        return AutoModelForCausalLM.from_pretrained(
            d, dtype=model.lm_head.weight.dtype, attn_implementation="sdpa"
        )


def train(name: str, args, peak: float) -> None:
    cfg = config(name).replace(num_nextn_predict_layers=0)
    batch, seq = SHAPES[name]
    torch.manual_seed(0)
    ours = DeepSeekV3(cfg).cuda().train().prepare("train")
    runners = {"nanoseek": make_step(ours, lambda m, x: m(x))}
    if args.compile:
        twin = DeepSeekV3(cfg).cuda().train().prepare("train", compiled=True)
        twin.load_state_dict(ours.state_dict())
        compiled = torch.compile(twin)
        runners["nanoseek compiled"] = make_step(twin, lambda m, x: compiled(x))
    hf = hf_twin(ours).cuda().train()
    runners["transformers"] = make_step(hf, lambda m, x: m(x).logits)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(args.steps + 2):  # two warm-up rounds
        for k, run in runners.items():  # interleaved
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                run(ids)  # .item() of the loss waits for the GPU
            if i >= 2:
                times[k].append(time.perf_counter() - t)
    flops = batch * seq * cfg.train_flops_per_token(seq)
    print(
        f"\n{name}: {cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_active_params() / 1e6:.1f}M active; "
        f"training batch {batch} x {seq}, bf16 autocast, median of {args.steps} steps"
    )
    print(f"{'':<20}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:<20}{1e3 * med:>10.1f}{batch * seq / med:>12,.0f}{flops / med / peak:>8.1%}")
    for k in [k for k in times if k != "transformers"]:
        print(
            f"{k} / transformers: {statistics.median(times['transformers']) / statistics.median(times[k]):.2f}x"
        )
    del ours, hf, runners
    torch.cuda.empty_cache()


def decode(name: str, args) -> None:
    cfg = config(name).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).cuda().to(torch.bfloat16).eval()
    hf = hf_twin(model).cuda().eval()
    llm = LLM(model, cache_memory_mb=2048, max_num_seqs=64, max_batched_tokens=4096)
    new = args.new_tokens
    print(f"{name}: greedy decoding, 32-token prompts, {new} new tokens, bf16")
    print(f"{'batch':>6}{'nanoseek tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}")
    for batch in (1, 64):
        prompts = torch.randint(1, cfg.vocab_size, (batch, 32)).tolist()
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        llm.generate(prompts, params)  # warm-up
        ours, theirs = [], []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = llm.generate(prompts, params)
            ours.append(time.perf_counter() - t)
            assert sum(len(o.token_ids) for o in out) == batch * new
            ids = torch.tensor(prompts, device="cuda")
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                gen = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=0,
                )
            torch.cuda.synchronize()
            theirs.append(time.perf_counter() - t)
            assert gen.shape == (batch, 32 + new)
        a, b = batch * new / statistics.median(ours), batch * new / statistics.median(theirs)
        print(f"{batch:>6}{a:>16,.0f}{b:>20,.0f}{a / b:>7.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per side")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--compile", action="store_true", help="also train nanoseek under torch.compile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    import transformers

    peak, source = bf16_peak()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"bf16 peak {peak / 1e12:.0f} TFLOP/s ({source})"
    )
    for name in args.presets:
        train(name, args, peak)
    for name in args.presets:
        decode(name, args)


if __name__ == "__main__":
    main()
