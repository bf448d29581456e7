import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, require_cxx_compiler

import nanoseek.kernels as kernels
import nanoseek.kernels.folded as folded_kernels
from nanoseek import LatentCache, ModelConfig
from nanoseek.model import MLA, Gate, segment_positions_and_mask


@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None}, {"attention_bias": True}])
@pytest.mark.parametrize("absorb_max_queries", [0, 1, 64])  # all decompressed; chunks only; all absorbed
# the model's own functions, or the engine's kernels with W_UK / W_UV applied per head or folded in
@pytest.mark.parametrize("job,fold", [("reference", False), ("decode", False), ("decode", True)])
def test_cached_attention_matches_ordinary_path(changes, absorb_max_queries, job, fold, monkeypatch):
    monkeypatch.setattr(MLA, "absorb_max_queries", absorb_max_queries)
    monkeypatch.setattr(folded_kernels, "MAX_GROWTH", float("inf") if fold else 0.0)
    c = ModelConfig.preset("tiny").replace(**changes)
    m = random_model(c).prepare(job)
    assert all((mla.folded is not None) == fold for mla in m.modules() if isinstance(mla, MLA))
    ids = torch.randint(0, c.vocab_size, (3, 20))
    with torch.no_grad():
        full = m(ids)
        cache = LatentCache(c, batch=3, max_len=32)
        chunks = [m(ids[:, :7], cache=cache), m(ids[:, 7:12], cache=cache)]  # prefill chunks, then one by one
        chunks += [m(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.nbytes_per_token() == (c.num_hidden_layers + 1) * c.latent_dim * 4


def test_absorbed_decoding_follows_in_place_weight_updates():
    """The folded decoding weights are derived once: an optimizer step and a plain in-place edit must both
    reach the next cached forward once `refold` is called, into the same tensors."""
    from nanoseek.train.loop import make_optimizer

    c = ModelConfig.preset("tiny")
    m = random_model(c).prepare("decode")
    folded = [mla.folded for mla in m.modules() if isinstance(mla, MLA)]
    tensors = [(f.wq, f.wo) for f in folded]
    assert all(f is not None for f in folded)
    ids = torch.randint(0, c.vocab_size, (2, 6))
    opt = make_optimizer(m, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    def refold():
        for f in folded:
            f.refold()

    def check():
        with torch.inference_mode():
            full = m(ids)
            cache = LatentCache(c, batch=2, max_len=8)
            steps = [m(ids[:, t : t + 1], cache=cache) for t in range(6)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)

    check()
    m(ids).square().mean().backward()
    opt.step()
    refold()
    check()
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(2)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # refolded under autocast ...
        refold()
    check()  # ... must still serve fp32 decoding
    m.prepare("decode")  # prepared again: the same tensors, which compiled graphs read
    assert [(mla.folded.wq, mla.folded.wo) for mla in m.modules() if isinstance(mla, MLA)] == tensors


def test_a_model_moved_to_another_dtype_and_prepared_again_decodes_with_its_new_weights():
    c = ModelConfig.preset("tiny")
    m = random_model(c).prepare("decode").to(torch.bfloat16).prepare("decode")
    ids = torch.randint(0, c.vocab_size, (2, 6))
    with torch.inference_mode():
        full = m(ids).float()
        cache = LatentCache(c, batch=2, max_len=8, dtype=torch.bfloat16)
        steps = torch.cat([m(ids[:, t : t + 1], cache=cache) for t in range(6)], 1).float()
    torch.testing.assert_close(steps, full, rtol=0.05, atol=0.05)


def test_gate_bias_changes_choice_not_weights():
    c = ModelConfig.preset("tiny").replace(n_group=1, topk_group=1, num_experts_per_tok=2)
    gate = Gate(c)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    x = torch.zeros(1, c.hidden_size)
    x[0, 0] = 1.0
    scores = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]))
    w, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [0, 1]
    gate.e_score_correction_bias[5] = 1.0  # pushes expert 5 (score 0.12) above expert 1 (0.88)
    w, idx, _ = gate(x)
    assert sorted(idx[0].tolist()) == [0, 5]
    sel = scores[[0, 5]]
    want = sel / sel.sum() * c.routed_scaling_factor  # unbiased scores, normalised, scaled
    got = w[0][idx[0].argsort()]
    torch.testing.assert_close(got, want)


def test_group_limited_routing_keeps_topk_groups():
    c = ModelConfig.preset("tiny").replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = Gate(c)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(64, c.hidden_size)
    _, idx, scores = gate(x)
    groups = scores.view(64, 4, 2).topk(2, -1).values.sum(-1).topk(2, -1).indices
    for t in range(64):
        assert set((idx[t] // 2).tolist()) <= set(groups[t].tolist())


def test_latent_cache_of_another_dtype_serves_an_fp32_model():
    c = ModelConfig.preset("tiny")
    m = random_model(c)
    ids = torch.randint(0, c.vocab_size, (2, 6))
    with torch.no_grad():
        full = m(ids)
        cache = LatentCache(c, batch=2, max_len=8, dtype=torch.bfloat16)
        steps = [m(ids[:, :2], cache=cache)] + [m(ids[:, t : t + 1], cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=5e-2, atol=5e-2)


def test_router_stats_and_balance_loss_against_float64():
    c = ModelConfig.preset("tiny")
    m = random_model(c)
    ids = torch.randint(0, c.vocab_size, (2, 16))
    out = m(ids, router_stats=True)
    n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert out.expert_load.shape == (n_moe, c.n_routed_experts)
    assert out.expert_load.sum().item() == n_moe * 2 * 16 * c.num_experts_per_tok
    # recompute layer 1's balance loss by hand
    captured = {}
    layer = m.model.layers[1]
    layer.mlp.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
    out = m(ids, router_stats=True)
    x = captured["x"]
    _, idx, scores = layer.mlp.gate(x.reshape(-1, c.hidden_size))
    s, idx = scores.double().view(2, 16, -1), idx.view(2, 16, -1)
    e, k = c.n_routed_experts, c.num_experts_per_tok
    total = 0.0
    for b in range(2):
        f = torch.bincount(idx[b].reshape(-1), minlength=e).double() * e / (k * 16)
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        total += (f * p).sum() / 2
    assert out.balance_loss.item() == pytest.approx(total.item(), rel=1e-5)
    out.balance_loss.backward()  # differentiable through the scores
    assert layer.mlp.gate.weight.grad is not None and layer.mlp.gate.weight.grad.abs().sum() > 0


def test_mtp_logits_follow_the_definition():
    c = ModelConfig.preset("tiny")
    m = random_model(c)
    ids = torch.randint(0, c.vocab_size, (2, 10))
    out = m(ids, mtp=True)
    assert out.logits.shape == (2, 10, c.vocab_size)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 9, c.vocab_size)
    mtp = m.mtp[0]
    pos = torch.arange(9)
    freqs = m.rope(pos)
    x = mtp.eh_proj(
        torch.cat([mtp.enorm(m.model.embed_tokens(ids[:, 1:])), mtp.hnorm(out.hidden[:, :9])], -1)
    )
    h = x + mtp.self_attn(mtp.input_layernorm(x), freqs)
    h = h + mtp.mlp(mtp.post_attention_layernorm(h))
    torch.testing.assert_close(out.mtp_logits[0], m.lm_head(mtp.shared_head.norm(h)))


def test_forward_rejects_bad_shapes():
    m = random_model(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.zeros(5, dtype=torch.long))


def test_packed_segments_equal_separate_documents():
    """Two documents packed in one row with `segments` give the logits (and MTP logits) of each alone."""
    model = random_model(ModelConfig.preset("tiny"))
    a, b = torch.randint(0, 512, (1, 7)), torch.randint(0, 512, (1, 9))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 9])
    out = model(packed, segments=segments, mtp=True)
    alone_a, alone_b = model(a, mtp=True), model(b, mtp=True)
    torch.testing.assert_close(out.logits[:, :7], alone_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:, 7:], alone_b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mtp_logits[0][:, 7:], alone_b.mtp_logits[0], atol=1e-5, rtol=1e-5)
    positions, mask = segment_positions_and_mask(segments)
    assert positions.tolist() == [list(range(7)) + list(range(9))] and not mask[0, 0, 8, 3]


@pytest.mark.parametrize("packed", [False, True])
def test_compiled_training_step_matches_eager(packed, monkeypatch, request):
    """torch.compile(model) trains, prepared for it: loss and every gradient (the routed experts' through the
    grouped matmul made opaque to the compiler, with its own backward; attention as blocked matmuls over two
    blocks and a short one, packed documents too) match the eager model, MTP and router stats on."""
    require_cxx_compiler()
    torch.manual_seed(0)
    traced = []
    blocked = kernels.blocked_causal_attention

    def spy(q, k, v, scale, mask=None, blocks=4):
        traced.append(mask is not None)
        return blocked(q, k, v, scale, mask, blocks)

    # the kernels are chosen once per job and cached: chosen afresh with the spy, and again after it
    monkeypatch.setattr(kernels, "blocked_causal_attention", spy)
    kernels._select.cache_clear()
    request.addfinalizer(kernels._select.cache_clear)
    model = random_model(ModelConfig.preset("tiny")).train().prepare("train", compiled=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 150))
    segments = torch.tensor([[0] * 70 + [1] * 80, [0] * 150]) if packed else None

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        out = forward(ids, mtp=True, router_stats=True, segments=segments)
        loss = (
            F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
            + out.mtp_logits[0].mean()
            + out.balance_loss
        )
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager = loss_and_grads(model)
    assert not traced  # eagerly, the fused kernel
    compiled_loss, compiled = loss_and_grads(torch.compile(model))
    assert traced and set(traced) == {packed}
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    assert compiled.keys() == eager.keys() and any("experts.gate_up" in n for n in eager)
    for n in eager:
        assert torch.allclose(compiled[n], eager[n], atol=1e-5, rtol=1e-4), n
