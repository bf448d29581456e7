import json

import pytest
import torch
from conftest import random_model

from nanoseek import LLM, CheckpointError, ModelConfig, SamplingParams, load_model, save_model
from nanoseek.cli import main
from nanoseek.export import ExportError, export
from nanoseek.model import rope_inv_freq, softmax_scale

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
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": None},
    "yarn": {"rope_scaling": YARN},
    "yarn_no_q_lora": {"rope_scaling": YARN, "q_lora_rank": None},
    "yarn_mscale_bias": {
        "rope_scaling": {**YARN, "mscale": 0.7, "mscale_all_dim": 0.5},
        "attention_bias": True,
    },
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_keeps_the_logits_in_nanoseek_and_transformers(tmp_path, variant):
    c = ModelConfig.preset("tiny").replace(**VARIANTS[variant])
    src = random_model(c)
    if c.attention_bias:
        with torch.no_grad():
            for name, p in src.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    save_model(src, tmp_path / "src")
    export(tmp_path / "src", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (512, 64)

    ids = torch.randint(0, c.vocab_size, (2, 80))  # past YaRN's original 64 positions
    out = load_model(tmp_path / "out")
    assert len(out.mtp) == 1
    with torch.no_grad():
        want, got = src(ids, mtp=True), out(ids, mtp=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.mtp_logits[0], want.mtp_logits[0], atol=1e-4, rtol=0)

    # rope pair j of the source's width has the frequency of pair 8j of the export's (8 = 64 / 8)
    (f_src, a_src), (f_out, a_out) = rope_inv_freq(c), rope_inv_freq(out.config)
    torch.testing.assert_close(f_out[::8], f_src, rtol=1e-6, atol=0)
    assert a_out == pytest.approx(a_src) and softmax_scale(out.config) != softmax_scale(c)
    if c.yarn:  # the correction range had to be re-targeted for the wider head
        assert out.config.rope_scaling["beta_fast"] != YARN["beta_fast"]

    transformers = pytest.importorskip("transformers")
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(theirs(ids).logits, want.logits) < 1e-4


def test_export_decodes_the_same_through_the_cache(tmp_path):
    """The absorbed path against a latent cache (decoding) sees the widened latent too."""
    from nanoseek import LatentCache

    c = ModelConfig.preset("tiny").replace(rope_scaling=YARN)
    src = random_model(c)
    save_model(src, tmp_path / "src")
    out = load_model(export(tmp_path / "src", tmp_path / "out"))
    ids = torch.randint(0, c.vocab_size, (1, 12))
    with torch.no_grad():
        logits = []
        for model in (src, out):
            cache = LatentCache(model.config, 1, 16)
            model(ids[:, :8], cache=cache)
            logits.append(torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(8, 12)], dim=1))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)
    assert cache.data.shape[-1] == 576


def test_export_generates_the_same_greedy_tokens_and_carries_the_tokenizer(tiny_base, tmp_path):
    out = export(tiny_base, tmp_path / "out")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names

    def read(path):
        return json.loads(path.read_text())

    template = read(tiny_base / "tokenizer_config.json")["chat_template"]
    assert read(out / "tokenizer_config.json")["chat_template"] == template  # the source's template is kept
    added = {t["content"]: t["special"] for t in read(out / "tokenizer.json")["added_tokens"]}
    assert added["<think>"] is False and added["<｜end▁of▁sentence｜>"] is True  # R1's conventions
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["What is 2 + 3", "7 * 8 =", "Compute 12 - 5"]
    want = [o.token_ids for o in LLM(tiny_base).generate(prompts, params)]
    got = [o.token_ids for o in LLM(out).generate(prompts, params)]
    assert got == want


def test_already_576_wide_is_copied_unchanged(tmp_path):
    c = ModelConfig.preset("tiny").replace(
        kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=2, num_key_value_heads=2
    )
    src = random_model(c)
    save_model(src, tmp_path / "src")
    out = load_model(export(tmp_path / "src", tmp_path / "out"))
    for (k, a), (_, b) in zip(src.state_dict().items(), out.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"kv_lora_rank": 520}, "kv_lora_rank above 512"),
        ({"qk_rope_head_dim": 128}, "qk_rope_head_dim above 64"),
        ({"qk_rope_head_dim": 24}, "qk_rope_head_dim must divide 64"),
        ({"rope_interleave": False}, "rope_interleave"),
    ],
)
def test_shapes_it_cannot_preserve_are_refused(tmp_path, changes, message):
    save_model(random_model(ModelConfig.preset("tiny").replace(**changes)), tmp_path / "src")
    with pytest.raises(ExportError, match=message):
        export(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        export(tmp_path / "empty", tmp_path / "out")
    save_model(random_model(ModelConfig.preset("tiny")), tmp_path / "src")
    with pytest.raises(ExportError, match="must not overwrite its source"):
        export(tmp_path / "src", tmp_path / "src")
    with pytest.raises(ExportError, match="target 'sglang'"):
        export(tmp_path / "src", tmp_path / "out", target="sglang")


def test_cli_export_end_to_end(tiny_base, tmp_path, capsys):
    main(["export", str(tiny_base), str(tmp_path / "out"), "--for", "vllm", "--dtype", "bfloat16"])
    assert "exported" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["torch_dtype"]) == (512, 64, "bfloat16")
    assert load_model(tmp_path / "out", dtype=None).model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out2"), "--for", "vllm"])
    assert e.value.code == 2 and "not a checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the target is required
        main(["export", str(tiny_base), str(tmp_path / "out3")])
