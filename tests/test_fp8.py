"""FP8 block quantisation, the FP8 linear layer and FP8 checkpoints, checked against float64/fp32."""

import json

import pytest
import torch
from conftest import random_model

from nanoseek import ModelConfig, load_model, save_model
from nanoseek.checkpoint import CheckpointError
from nanoseek.fp8 import (
    E4M3,
    E4M3_MAX,
    FP8Linear,
    apply_fp8,
    dequantize_activation,
    dequantize_weight,
    fp8_linear,
    quantize_activation,
    quantize_weight,
    stats,
)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_blocks_ragged_edges_and_scales(pow2):
    w = torch.randn(300, 200, dtype=torch.float64) * torch.logspace(-3, 2, 200, dtype=torch.float64)
    q, scale = quantize_weight(w, pow2=pow2)
    assert q.dtype == E4M3 and q.shape == w.shape and scale.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            qb = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = float(block.abs().max())
            assert float(qb.abs().max()) <= E4M3_MAX  # every block within the e4m3 range of its scale
            if pow2:
                assert float(scale[i, j]).is_integer() or (1 / float(scale[i, j])).is_integer()
                assert amax / float(scale[i, j]) <= E4M3_MAX
            else:  # scale = amax / 448 exactly: the largest element maps to +-448
                assert float(scale[i, j]) == pytest.approx(amax / E4M3_MAX, rel=1e-6)
                assert float(qb.abs().max()) == E4M3_MAX
    assert rel(dequantize_weight(q, scale), w) < 0.04  # 3 mantissa bits: ~2-3% RMS error


def test_activation_tiles_are_1x128():
    x = torch.randn(5, 300) * torch.tensor([1e-3] * 128 + [1e3] * 172)
    q, scale = quantize_activation(x)
    assert scale.shape == (5, 3)
    assert torch.allclose(scale[:, 0], x[:, :128].abs().amax(-1) / E4M3_MAX)
    assert torch.allclose(scale[:, 2], x[:, 256:].abs().amax(-1) / E4M3_MAX)
    assert rel(dequantize_activation(q, scale), x.double()) < 0.04  # small tile not drowned by the big ones


def test_non_finite_activations_are_counted_and_scales_stay_finite():
    x = torch.randn(2, 256)
    x[0, 3], x[1, 200] = float("inf"), float("nan")
    before = stats.nonfinite
    q, scale = quantize_activation(x)
    assert stats.nonfinite - before == 2
    assert torch.isfinite(scale).all()
    assert float(q[0, 3].float()) == E4M3_MAX and torch.isnan(q[1, 200].float())
    x[1, 128:] = float("nan")
    with pytest.raises(ValueError, match=r"tile \(1, 1\).*entirely NaN"):
        quantize_activation(x)


def test_fp8_linear_matches_fp32_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 384, requires_grad=True)
    w = (torch.randn(320, 384) * 0.05).requires_grad_()
    y = fp8_linear(x, w)
    ref = x.detach().double() @ w.detach().double().t()
    assert rel(y, ref) < 5e-2
    gy = torch.randn_like(y)
    y.backward(gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x64 @ w64.t()).backward(gy.double())
    assert rel(x.grad, x64.grad) < 5e-2 and rel(w.grad, w64.grad) < 5e-2
    assert w.grad.dtype == torch.float32  # the master weight and its gradient stay fp32


def test_apply_fp8_keeps_embeddings_head_and_router_high_precision():
    model = random_model(ModelConfig.preset("tiny")).train()
    ids = torch.randint(0, 512, (2, 16))
    ref = model(ids)
    n = apply_fp8(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_b_proj"] == "FP8Linear" and kinds["lm_head"] == "Linear"
    assert not isinstance(model.model.layers[1].mlp.gate, FP8Linear)
    assert n > 10
    out = model(ids)
    assert rel(out, ref) < 5e-2
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.parameters())


def test_fp8_checkpoint_round_trip_and_size(tmp_path):
    model = random_model(ModelConfig.preset("tiny"))
    save_model(model, tmp_path / "fp8", fp8=True)
    save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    from safetensors import safe_open

    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_b_proj.weight").dtype == E4M3
        assert f.get_tensor("model.layers.0.self_attn.q_b_proj.weight_scale_inv").dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    loaded = load_model(tmp_path / "fp8")
    ids = torch.randint(0, 512, (2, 16))
    assert rel(loaded(ids), model(ids)) < 5e-2
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("fp8") < 0.75 * size("bf16")
    save_model(loaded, tmp_path / "again")  # a model loaded from FP8 saves as plain weights
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_fp8_checkpoint_with_wrong_scale_shape_names_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_model(random_model(ModelConfig.preset("tiny")), tmp_path, fp8=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_scale_inv has shape"
    ):
        load_model(tmp_path)
