"""FP8 numbers of V3 report §3.3 in miniature: quantisation error, and on a GPU the FP8 GEMM's speed.

    python benchmarks/fp8.py            # error of 4096x4096 weights/activations vs float64 (any machine);
                                        # on CUDA also FP8 vs BF16 throughput of 4096-wide linear layers
    python benchmarks/pretrain.py fp8   # the training-loss comparison (fp8 vs bf16)

On CUDA it tries `torch._scaled_mm` with DeepSeek's scaling (1x128 activation tiles, 128x128 weight
blocks) and, for comparison, with per-tensor and row-wise scales; each row says which path ran.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from nanoseek.fp8 import (
    _SCALED_MM,
    dequantize_activation,
    dequantize_weight,
    fp8_linear,
    quantize_activation,
    quantize_weight,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def errors(device: str) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(4096, 4096, generator=g, dtype=torch.float64) * 0.02).to(device)
    x = torch.randn(4096, 4096, generator=g, dtype=torch.float64)
    x[:, ::512] *= 50  # a few outlier channels, as real activations have
    x = x.to(device)
    print(f"{'4096x4096 vs float64':<48}{'relative error':>16}")
    for pow2 in (False, True):
        tag = " (power-of-two scales)" if pow2 else ""
        wq, ws = quantize_weight(w, pow2=pow2)
        xq, xs = quantize_activation(x, pow2=pow2)
        print(f"{'weight, 128x128 blocks' + tag:<48}{rel(dequantize_weight(wq, ws), w):>16.4%}")
        print(f"{'activation, 1x128 tiles' + tag:<48}{rel(dequantize_activation(xq, xs), x):>16.4%}")
    # per-tensor scaling for contrast: one outlier channel sets the scale for everything
    s = x.abs().max() / 448
    per_tensor = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s
    print(f"{'activation, one per-tensor scale':<48}{rel(per_tensor, x):>16.4%}")
    xf, wf = x.float()[:1024], w.float()
    print(f"{'FP8 linear output (1024 tokens)':<48}{rel(fp8_linear(xf, wf), x[:1024] @ w.t()):>16.4%}")


def timeit(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def gpu(m: int = 8192, k: int = 4096, n: int = 4096) -> None:
    dev = "cuda"
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; y = x[{m}x{k}] @ w[{n}x{k}].T")
    x = torch.randn(m, k, device=dev)
    w = torch.randn(n, k, device=dev) * 0.02
    xb, wb = x.bfloat16(), w.bfloat16()
    ref = x.double() @ w.double().t()
    flops = 2 * m * n * k
    t_bf16 = timeit(lambda: F.linear(xb, wb))
    print(f"{'path':<44}{'ms':>8}{'TFLOP/s':>10}{'vs bf16':>9}{'rel err':>10}")
    print(
        f"{'bf16 F.linear':<44}{t_bf16 * 1e3:>8.3f}{flops / t_bf16 / 1e12:>10.0f}{1:>8.2f}x"
        f"{rel(F.linear(xb, wb), ref):>10.4%}"
    )
    xq, xs = quantize_activation(x)
    wq, ws = quantize_weight(w)
    f8 = torch.float8_e4m3fn
    one = torch.ones((), device=dev)
    candidates = {
        "scaled_mm, 1x128 x 128x128 blocks (V3)": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(), out_dtype=torch.bfloat16
        ),
        "scaled_mm, per-tensor scales": lambda: torch._scaled_mm(
            (x / (x.abs().max() / 448)).to(f8),
            (w / (w.abs().max() / 448)).to(f8).t(),
            scale_a=one * (x.abs().max() / 448),
            scale_b=one * (w.abs().max() / 448),
            out_dtype=torch.bfloat16,
        ),
        "scaled_mm, row-wise scales": lambda: _rowwise(x, w),
    }
    for name, fn in candidates.items():
        try:
            out = fn()
            t = timeit(fn)
            print(
                f"{name:<44}{t * 1e3:>8.3f}{flops / t / 1e12:>10.0f}{t_bf16 / t:>8.2f}x{rel(out, ref):>10.4%}"
            )
        except Exception as e:  # report what this torch/GPU lacks, keep measuring the rest
            print(f"{name:<44}  not available here: {str(e).splitlines()[0][:90]}")
    t_q = timeit(lambda: quantize_activation(x))
    print(f"{'quantising x into 1x128 tiles (torch ops)':<44}{t_q * 1e3:>8.3f}")
    # the training layer: forward + backward of nanoseek's FP8 linear against bf16 autograd
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    xbr, wbr = xb.clone().requires_grad_(), wb.clone().requires_grad_()
    t_fwd = timeit(lambda: fp8_linear(x, w))
    print(
        f"{'FP8Linear forward (nanoseek), quantising incl.':<44}{t_fwd * 1e3:>8.3f}{flops / t_fwd / 1e12:>10.0f}"
        f"{t_bf16 / t_fwd:>8.2f}x"
    )
    t_ours = timeit(lambda: fp8_linear(xr, wr).sum().backward(), iters=10)
    t_ref = timeit(lambda: F.linear(xbr, wbr).float().sum().backward(), iters=10)
    print(
        f"{'FP8Linear fwd+bwd (nanoseek) vs bf16':<44}{t_ours * 1e3:>8.3f}{3 * flops / t_ours / 1e12:>10.0f}"
        f"{t_ref / t_ours:>8.2f}x"
    )
    print(
        "GEMMs on the tensor cores (b in 128x128 blocks: Fprop, Dgrad; b in 1x128 tiles: Wgrad):", _SCALED_MM
    )


def _rowwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    sx = x.abs().amax(1, keepdim=True) / 448
    sw = w.abs().amax(1, keepdim=True) / 448
    return torch._scaled_mm(
        (x / sx).to(torch.float8_e4m3fn),
        (w / sw).to(torch.float8_e4m3fn).t(),
        scale_a=sx,
        scale_b=sw.t(),
        out_dtype=torch.bfloat16,
    )


def main() -> None:
    errors("cpu")
    if torch.cuda.is_available():
        gpu()
    else:
        print("\n(no CUDA device: the FP8 vs BF16 throughput rows need an H100/H200-class GPU)")


if __name__ == "__main__":
    main()
