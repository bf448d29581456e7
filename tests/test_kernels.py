"""Every fast path in nanoseek.kernels against the reference function of nanoseek.model it replaces."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

import nanoseek.kernels.compiled as compiled_forms
from nanoseek import LLM, ModelConfig, SamplingParams
from nanoseek.kernels import JOBS, GroupedMask, blocked_causal_attention, select
from nanoseek.kernels.experts import GROUPED_MM_CPU, grouped_experts_loop, grouped_experts_mm
from nanoseek.kernels.linear import FUSED_LINEAR_MAX_ROWS, small_row_linear
from nanoseek.kernels.paged import PagedContext, paged_attention_available, paged_latent_attention
from nanoseek.kernels.rope import apply_real_rope, real_rotations
from nanoseek.model import (
    REFERENCE,
    MoE,
    apply_rope,
    latent_attention,
    rotations,
    segment_positions_and_mask,
)

CPU = torch.device("cpu")
# (job, compiled) of every kernel set; compiled ones are run eagerly with torch.compile's tracing faked, so
# that the forms a compiled graph takes are checked without compiling
PREPARED = [("reference", False), ("train", False), ("train", True), ("decode", False), ("decode", True)]


def use(module: torch.nn.Module, job: str, compiled: bool) -> None:
    kernels = select(REFERENCE, job, CPU, compiled)
    for m in module.modules():
        if hasattr(m, "kernels"):
            m.kernels = kernels


@pytest.mark.parametrize("shape", [(2, 9), (1, 1), (1, 2)])  # decode-sized batches run their experts directly
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("job,compiled", PREPARED)
def test_moe_matches_per_token_reference(shape, grad, job, compiled, monkeypatch):
    """Output, and with grad on every gradient, against a float64 loop over tokens and their experts, for
    every form of `routed_experts`: the reference loop over experts; sorted by expert with index_select /
    index_add; to and from expert order by gathers (gathering in the backward too); each token's experts
    run directly, or gathered."""
    monkeypatch.setattr(compiled_forms, "is_compiling", lambda: compiled)
    c = ModelConfig.preset("tiny")
    d, inter = c.hidden_size, c.moe_intermediate_size
    moe = MoE(c)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ref_moe = copy.deepcopy(moe).double()
    use(moe, job, compiled)
    x = torch.randn(*shape, d, requires_grad=grad)
    x64 = x.detach().double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = moe(x).reshape(-1, d)
        flat = x64.reshape(-1, d)
        w, idx, _ = ref_moe.gate(flat)
        gu, dn = ref_moe.experts.gate_up, ref_moe.experts.down
        rows = []
        for t in range(flat.shape[0]):
            row = ref_moe.shared_experts(flat[t])
            for k in range(c.num_experts_per_tok):
                e = idx[t, k]
                row = row + w[t, k] * (dn[e] @ (F.silu(gu[e, :inter] @ flat[t]) * (gu[e, inter:] @ flat[t])))
            rows.append(row)
        ref = torch.stack(rows)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    if grad:
        g = torch.randn_like(ref)
        y.backward(g.float())
        ref.backward(g)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
        for (name, p), p64 in zip(moe.named_parameters(), ref_moe.parameters(), strict=True):
            torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype,fp8", [(torch.bfloat16, False), (torch.float32, True)])
def test_direct_experts_match_sorted_experts_in_low_precision(dtype, fp8):
    """The decode kernels' direct path (in-place adds into the shared experts' output) against the training
    kernels' sorted path on the same tokens, in bf16 and with FP8 expert matmuls."""
    from nanoseek.fp8 import apply_fp8

    c = ModelConfig.preset("tiny")
    m = random_model(c).to(dtype)
    if fp8:
        apply_fp8(m)
    moe = m.model.layers[1].mlp
    x = torch.randn(1, 2, c.hidden_size, dtype=dtype)
    with torch.no_grad():
        direct = m.prepare("decode").model.layers[1].mlp(x)
        grouped = m.prepare("train").model.layers[1].mlp(x)
    assert moe.kernels.expert_linear is not F.linear if fp8 else moe.kernels.expert_linear is F.linear
    assert direct.dtype == grouped.dtype == dtype
    torch.testing.assert_close(direct, grouped, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not GROUPED_MM_CPU, reason="this torch has no CPU torch._grouped_mm")
@pytest.mark.parametrize("traced", [False, True])
def test_grouped_matmul_matches_a_matmul_per_expert(traced, monkeypatch):
    """torch._grouped_mm (traced: the op compiled graphs see, with its own backward) against one matmul
    pair per expert, an expert with no rows included: output and gradients."""
    monkeypatch.setattr(compiled_forms, "is_compiling", lambda: traced)
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    leaves = [torch.randn(9, 16), torch.randn(4, 2 * 8, 16), torch.randn(4, 16, 8)]
    results = []
    for grouped in (grouped_experts_mm, grouped_experts_loop):
        xs, gu, dn = (t.clone().requires_grad_() for t in leaves)
        y = grouped(xs, counts, gu, dn)
        y.square().sum().backward()
        results.append([y.detach(), xs.grad, gu.grad, dn.grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_blocked_causal_attention_matches_float64(packed):
    """Blocks of queries (the last one short) against their keys only: output and every gradient as a
    float64 causal softmax attention, with a value head narrower than q's, within packed documents too."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 37, 12, requires_grad=True), torch.randn(2, 3, 37, 12, requires_grad=True)
    v = torch.randn(2, 3, 37, 8, requires_grad=True)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    q64, k64, v64 = leaves64
    scores = (q64 @ k64.transpose(-1, -2)) * 0.3
    mask = segment_positions_and_mask(torch.tensor([[0] * 20 + [1] * 17, [0] * 37]))[1] if packed else None
    hide = torch.ones(37, 37, dtype=torch.bool).triu(1) if mask is None else ~mask
    ref = scores.masked_fill(hide, float("-inf")).softmax(-1) @ v64
    out = blocked_causal_attention(q, k, v, 0.3, mask, blocks=3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, REFERENCE.causal_attention(q, k, v, 0.3, mask), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    for t, t64 in zip((q, k, v), leaves64, strict=True):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5)
    short = q[:, :, :5].detach()  # blocks of 2: the last one empty
    torch.testing.assert_close(
        blocked_causal_attention(short, short, short, 0.3, None, blocks=4),
        REFERENCE.causal_attention(short, short, short, 0.3),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("job, compiled", PREPARED)
def test_grouped_attention_matches_the_packed_row_reference(job, compiled, monkeypatch):
    """Groups of 5, 9 and 2 tokens packed into one row without padding, each attending causally within
    itself, its first two tokens a prefix every later token sees (as GRPO packs a prompt and its
    completions): output and every gradient as the reference over the whole row's dense mask, whichever
    kernels (compiled training attends under the mask's additive form); the padding slots of the groups'
    layout change nothing."""
    monkeypatch.setattr(compiled_forms, "is_compiling", lambda: compiled)
    torch.manual_seed(0)
    segments = torch.tensor([[0, 0, 1, 1, 2, -1, -1, -1, -1], [0, 0, 1, 1, 1, 2, 2, 3, 3], [0, 0] + [-1] * 7])
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    within = causal & ((segments[:, None, :] == segments[:, :, None]) | (segments[:, None, :] == 0))
    mask = GroupedMask.of(within[:, None], [5, 9, 2])
    assert mask.rows.tolist() == [0] * 5 + [1] * 9 + [2] * 2
    assert mask.cols.tolist() == [0, 1, 2, 3, 4, *range(9), 0, 1]
    assert (mask.tokens[mask.rows, mask.cols] == torch.arange(16)).all() and (mask.tokens == 16).sum() == 11
    assert mask.bias.equal(torch.zeros(3, 1, 9, 9).masked_fill(~within[:, None], float("-inf")))
    dense = mask.dense()[0, 0]
    assert dense.shape == (16, 16) and not dense[:5, 5:].any() and not dense[14:, :14].any()
    assert dense[5:14, 5:14].equal(within[1])
    leaves = [torch.randn(1, 3, 16, d, requires_grad=True) for d in (12, 12, 8)]
    attend = select(REFERENCE, job, CPU, compiled).causal_attention
    out = attend(*leaves, 0.3, mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = REFERENCE.causal_attention(*ref_leaves, 0.3, mask.dense())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_leaves, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for bad in ([5, 10, 2], [5, 9], [5, 0, 2]):
        with pytest.raises(ValueError, match="lengths"):
            GroupedMask.of(within[:, None], bad)


def test_paged_attention_kernel_is_built_and_chosen_for_cpu_decoding():
    """The C++ kernel builds here (it needs only the compiler torch.compile needs), and decoding on CPU
    chooses it: were the build broken, decoding would quietly gather the context instead."""
    assert paged_attention_available()
    decode = select(REFERENCE, "decode", torch.device("cpu"))
    assert decode.paged_context and decode.latent_attention is not latent_attention
    assert not select(REFERENCE, "train", torch.device("cpu")).paged_context
    # the engine's decode steps run it, on their context left in place
    llm = LLM(random_model(ModelConfig.preset("tiny")), cache_memory_mb=1)
    with torch.profiler.profile() as prof:
        llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert any(e.name == "nanoseek::paged_latent_attention" for e in prof.events())


@pytest.mark.parametrize(("heads", "rank", "rope"), [(4, 512, 64), (3, 40, 8), (9, 64, 16)])
@pytest.mark.parametrize("compiled", [False, True])
def test_paged_attention_matches_gathered_reference(heads, rank, rope, compiled):
    """One query a row over a paged store, rows of different lengths (one of length 1: only its new
    latent), head counts and widths off the kernel's tiles of 4 heads and 16 floats: as the reference
    over the gathered context with the length mask as bias; eagerly and inside a compiled graph."""
    torch.manual_seed(heads)
    width, block, lens = rank + rope, 4, [1, 7, 13, 20, 5]
    b, t = len(lens), max(lens)
    data = torch.randn(64 * block, width)
    tables = torch.randperm(64)[: b * 5].view(b, 5)
    slots = (tables[:, :, None] * block + torch.arange(block)).view(b, -1)[:, :t]
    new, q = torch.randn(b, width), torch.randn(b, heads, width) / width**0.5
    context = data[slots].clone()
    context[torch.arange(b), torch.tensor(lens) - 1] = new
    bias = torch.zeros(b, 1, t).masked_fill_(torch.arange(t) >= torch.tensor(lens)[:, None, None], -torch.inf)
    ref = latent_attention(q, context, bias, rank)
    fn = paged_latent_attention
    if compiled:
        fn = torch.compile(fn, fullgraph=True, dynamic=True)
    paged = PagedContext(data, slots, torch.tensor(lens), new)
    out = fn(q, paged, None, rank, reference=latent_attention)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a gathered context goes to the reference
    torch.testing.assert_close(fn(q, context, bias, rank, reference=latent_attention), ref)


@pytest.mark.parametrize("rows", range(1, FUSED_LINEAR_MAX_ROWS + 2))
@pytest.mark.parametrize("bias", [False, True])
def test_small_row_linear_matches_linear(rows, bias):
    torch.manual_seed(rows)
    x, w = torch.randn(1, rows, 24), torch.randn(40, 24)
    b = torch.randn(40) if bias else None
    torch.testing.assert_close(small_row_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_real_rope_matches_complex_rope():
    torch.manual_seed(0)
    angles = torch.randn(2, 5, 1, 4) * 10
    x = torch.randn(2, 5, 3, 8, dtype=torch.bfloat16)
    out = apply_real_rope(x, real_rotations(angles, 1.3))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rope(x, rotations(angles, 1.3)), rtol=0, atol=0)


def test_prepare_chooses_once_for_every_module_and_keeps_fp8_experts():
    from nanoseek.fp8 import apply_fp8

    m = random_model(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="job"):
        m.prepare("serve")
    assert m.prepare("decode", compiled=True).kernels.job == "decode"
    decode = m.kernels  # switching jobs and back gives the same objects: compiled graphs keep their guards
    assert m.prepare("train").kernels is not decode and m.prepare("decode").kernels is decode
    assert {id(mod.kernels) for mod in m.modules() if hasattr(mod, "kernels")} == {id(m.kernels)}
    apply_fp8(m)
    assert (m.kernels.job, m.kernels.compiled) == ("decode", True) and m.kernels.expert_linear is not F.linear
    fp8_linear = m.kernels.expert_linear
    for job in JOBS:
        assert m.prepare(job).kernels.expert_linear is fp8_linear


def test_cuda_experts_take_grouped_mm_in_bf16_only(monkeypatch):
    """On a GPU whose torch._grouped_mm works, `select` runs the experts through grouped_experts_cuda,
    which equals the loop in bf16 (through the grouped matmul) and in fp32 (the loop itself, the kernel's
    only type there being bf16). The choice is checked with the probe faked; the sums run on the CPU,
    whose grouped matmul takes the same arguments."""
    import nanoseek.kernels as kernels
    from nanoseek.kernels.experts import grouped_experts_cuda

    monkeypatch.setattr(kernels, "grouped_mm_on_cuda", lambda index: True)
    kernels._select.cache_clear()  # choices are cached by their arguments: the probe is faked
    assert select(REFERENCE, "train", torch.device("cuda", 0)).grouped_experts is grouped_experts_cuda
    monkeypatch.setattr(kernels, "grouped_mm_on_cuda", lambda index: False)
    kernels._select.cache_clear()
    assert select(REFERENCE, "train", torch.device("cuda", 0)).grouped_experts.func is grouped_experts_loop
    kernels._select.cache_clear()
    if not GROUPED_MM_CPU:
        pytest.skip("this torch build has no CPU torch._grouped_mm")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    xs, gate_up, down = torch.randn(9, 16), torch.randn(4, 32, 16), torch.randn(4, 16, 16)
    want = grouped_experts_loop(xs, counts, gate_up, down)
    torch.testing.assert_close(grouped_experts_cuda(xs, counts, gate_up, down), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_experts_cuda(xs, counts, gate_up, down)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.5)
