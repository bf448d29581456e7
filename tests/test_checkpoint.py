import json
import math

import pytest
import torch
from conftest import random_model
from safetensors.torch import load_file, save_file

from nanoseek import CheckpointError, ModelConfig, load_model, save_model
from nanoseek.checkpoint import dequantize_fp8

transformers = pytest.importorskip("transformers")

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
VARIANTS = {
    "moe": {},
    "yarn": {"rope_scaling": YARN},
    "q_lora_null": {"q_lora_rank": None},
    "dense_only": {
        "first_k_dense_replace": 2,
        "n_routed_experts": 0,
        "n_shared_experts": 0,
        "n_group": 1,
        "topk_group": 1,
    },
    "yarn_moe_no_group": {"rope_scaling": YARN, "n_group": 1, "topk_group": 1},
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_transformers_both_directions(tmp_path, variant, capsys):
    c = ModelConfig.preset("tiny").replace(**VARIANTS[variant])
    ours = random_model(c)
    ids = torch.randint(0, c.vocab_size, (2, 48))
    save_model(ours, tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        want = ours(ids)
        assert rel_err(theirs(ids).logits, want) < 1e-4
        theirs.save_pretrained(tmp_path / "theirs")  # transformers writes no MTP weights
        back = load_model(tmp_path / "theirs")
        assert rel_err(back(ids), want) < 1e-4
    assert len(back.mtp) == 0 and "no MTP weights" in capsys.readouterr().err


def test_round_trip_sharded_keeps_mtp_and_bias(tmp_path):
    m = random_model(ModelConfig.preset("tiny"))
    save_model(m, tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.2.eh_proj.weight" in index["weight_map"]  # MTP at layer index num_hidden_layers
    back = load_model(tmp_path)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        a, b = m(ids, mtp=True), back(ids, mtp=True)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.mtp_logits[0], b.mtp_logits[0])
    for (k, v), (_, v2) in zip(m.named_buffers(), back.named_buffers()):
        assert torch.equal(v, v2), k
    save_model(back, tmp_path)  # re-save unsharded: stale shards and index are removed
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_tied_embeddings_stay_tied_and_the_router_stays_fp32(tmp_path, saved_dtype):
    m = random_model(ModelConfig.preset("tiny").replace(tie_word_embeddings=True))
    save_model(m, tmp_path, dtype=saved_dtype)
    back = load_model(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight  # one Parameter: training updates both
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in m.parameters())
    assert {p.dtype for p in back.parameters()} == {torch.float32}
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"model.norm.weight": 5}])
def test_malformed_shard_index(tmp_path, weight_map):
    save_model(random_model(ModelConfig.preset("tiny")), tmp_path, max_shard_size="200KB")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
        load_model(tmp_path)


def quantize_fp8(w):
    """Reference block quantisation in float64: scale = amax / 448 per 128x128 block."""
    out_f, in_f = w.shape
    rows, cols = math.ceil(out_f / 128), math.ceil(in_f / 128)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].double()
            scale = blk.abs().max() / 448.0
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (blk / scale).to(torch.float8_e4m3fn)
            s[i, j] = scale
    return q, s


def test_fp8_dequantisation_against_float64():
    w = torch.randn(300, 200) * torch.linspace(0.1, 10, 200)
    q, s = quantize_fp8(w)
    got = dequantize_fp8(q, s)
    ref = torch.empty(300, 200, dtype=torch.float64)
    col_block = torch.arange(200) // 128
    for r in range(300):
        ref[r] = q[r].double() * s[r // 128, col_block].double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-7, atol=0)
    assert rel_err(got, w) < 0.07  # e4m3 keeps 3 mantissa bits


def test_load_fp8_checkpoint(tmp_path):
    c = ModelConfig.preset("tiny")
    m = random_model(c)
    save_model(m, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_b_proj.weight"
    tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensors[name])
    save_file(tensors, tmp_path / "model.safetensors")
    back = load_model(tmp_path)
    torch.testing.assert_close(
        back.model.layers[0].self_attn.q_b_proj.weight,
        dequantize_fp8(tensors[name], tensors[name + "_scale_inv"]),
    )
    tensors[name + "_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_b_proj.weight_scale_inv has shape"):
        load_model(tmp_path)
    stray = "model.layers.0.self_attn.o_proj.weight"  # a scale next to a weight that is not FP8
    save_file(
        {**tensors, name + "_scale_inv": torch.ones(1, 1), stray + "_scale_inv": torch.ones(1, 1)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(CheckpointError, match="unexpected tensor .*o_proj.weight_scale_inv"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="FP8 tensor norm.weight has shape"):
        dequantize_fp8(torch.ones(4).to(torch.float8_e4m3fn), torch.ones(1), "norm.weight")


@pytest.fixture
def saved(tmp_path):
    save_model(random_model(ModelConfig.preset("tiny")), tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def _rewrite(path, tensors):
    save_file(tensors, path / "model.safetensors")


def _drop_o_proj(t):
    del t["model.layers.0.self_attn.o_proj.weight"]


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (_drop_o_proj, "missing tensors: model.layers.0.self_attn.o_proj.weight"),
        (
            lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
            "unexpected tensors: model.layers.0.self_attn.extra.weight",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(65)}),
            r"model.norm.weight has shape \(65,\), expected \(64,\)",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
            "model.norm.weight has unsupported dtype",
        ),
    ],
)
def test_bad_tensors_are_named(saved, corrupt, message):
    path, t = saved
    corrupt(t)
    _rewrite(path, t)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_truncated_and_corrupt_files(saved):
    path, _ = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt, truncated"):
        load_model(path)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope")
    ModelConfig.preset("tiny").save(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    save_model(random_model(ModelConfig.preset("tiny")), tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
