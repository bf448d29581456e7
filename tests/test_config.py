import json

import pytest

from nanoseek import ModelConfig
from nanoseek.model import rope_inv_freq, softmax_scale, yarn_correction_range


def test_v3_parameter_counts():
    c = ModelConfig.preset("v3")
    assert abs(c.num_params() / 1e9 - 671) < 0.5
    assert 11.0 < c.num_mtp_params() / 1e9 < 12.0
    assert abs(c.num_active_params() / 1e9 - 37) < 1.0
    assert c.latent_dim == 576 and c.decompressed_cache_dim == 40960


def test_presets_sizes_match_instantiated_models():
    from nanoseek import DeepSeekV3

    for name in ["tiny", "small", "dense-small"]:
        c = ModelConfig.preset(name)
        m = DeepSeekV3(c)
        n = sum(p.numel() for p in m.parameters()) + sum(
            b.numel() for k, b in m.named_buffers() if "bias" in k
        )
        assert n == c.num_params(mtp=True), name
    assert ModelConfig.preset("tiny").num_params(mtp=True) < 1_000_000
    small = ModelConfig.preset("small")
    assert (
        small.n_shared_experts
        and small.n_routed_experts
        and small.q_lora_rank
        and small.num_nextn_predict_layers == 1
    )


def test_flops_per_token_is_6n_plus_attention():
    c = ModelConfig.preset("v3")
    assert c.train_flops_per_token(1) > 6 * 36e9
    assert c.train_flops_per_token(4096) > c.train_flops_per_token(1)
    assert c.decode_flops_per_token(4096) > 2 * 36e9


def test_yarn_v3_hand_computed():
    c = ModelConfig.preset("v3")
    assert yarn_correction_range(c) == (10, 23)
    assert softmax_scale(c) == pytest.approx(0.135234, abs=1e-6)
    inv, attn_factor = rope_inv_freq(c)
    base = [10000 ** (-2 * i / 64) for i in range(32)]
    for i in range(32):
        ramp = min(max((i - 10) / 13, 0.0), 1.0)
        want = base[i] * (1 - ramp) + base[i] / 40 * ramp
        assert inv[i].item() == pytest.approx(want, rel=1e-5)
    assert attn_factor == 1.0


def test_config_json_round_trip_keeps_unknown_fields(tmp_path):
    c = ModelConfig.preset("tiny").replace(extra={"my_field": [1, 2], "quantization_config": {"fmt": "e4m3"}})
    c.save(tmp_path)
    back = ModelConfig.from_json(tmp_path)
    assert back == c
    assert json.loads((tmp_path / "config.json").read_text())["my_field"] == [1, 2]


def test_rope_parameters_spelling(tmp_path):
    d = ModelConfig.preset("tiny").to_dict()
    d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 5000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = ModelConfig.from_json(tmp_path)
    assert c.rope_theta == 5000.0 and c.yarn["factor"] == 4.0
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = ModelConfig.from_json(tmp_path)
    assert c.rope_scaling is None and c.rope_theta == 500000.0


@pytest.mark.parametrize(
    "field,value",
    [("hidden_size", "64"), ("q_lora_rank", 1.5), ("norm_topk_prob", "yes"), ("rope_scaling", [1])],
)
def test_config_wrong_types_are_named(tmp_path, field, value):
    d = ModelConfig.preset("tiny").to_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_json(tmp_path)


def test_config_bad_json_and_bad_preset(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.preset("tiny").replace(n_group=3)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"n_group": 0}, "n_group"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"n_shared_experts": -1}, "n_shared_experts"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"rope_scaling": {"type": "yarn"}}, "YaRN needs a numeric factor"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "only YaRN"),
    ],
)
def test_impossible_values_are_named(changes, field):
    """Right types, impossible values: a ValueError naming the field, not a ZeroDivisionError or KeyError
    when the model is built (or a scaling silently ignored)."""
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("tiny").replace(**changes)
