"""The model's fast paths, behind one seam.

`nanoseek.model` computes with the reference functions it defines, in the papers' notation (e.g. the
routed experts as DeepSeek's loop over experts). `select` returns, for a job, the `Kernels` that replace
some of them with faster forms of the same computation; `DeepSeekV3.prepare(job, compiled)` calls it once
and hands the result to every module, so no forward re-decides it. Each fast form's docstring names the
reference it replaces, and tests/test_kernels.py holds it to that reference. This package imports nothing
from the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import (
    BLOCKED_MAX_LEN,
    GroupedMask,
    biased_attention,
    blocked_causal_attention,
    grouped_attention,
    up_to_len,
)
from .compiled import freeze_after_compiling, unfreeze_heap, when_compiled
from .experts import (
    GROUPED_MM_CPU,
    direct_experts,
    gathered_experts,
    gathered_sorted_experts,
    grouped_experts_cuda,
    grouped_experts_loop,
    grouped_experts_mm,
    grouped_mm_on_cuda,
    sorted_experts,
    up_to,
)
from .linear import FUSED_LINEAR_MAX_ROWS, small_row_linear
from .paged import PagedContext, paged_attention_available, paged_latent_attention
from .rope import apply_real_rope, real_rotations

__all__ = [
    "Kernels",
    "GroupedMask",
    "PagedContext",
    "select",
    "when_compiled",
    "freeze_after_compiling",
    "unfreeze_heap",
    "JOBS",
    "FUSED_LINEAR_MAX_ROWS",
    "blocked_causal_attention",
    "grouped_experts_loop",
]

JOBS = ("reference", "train", "decode")

# Eagerly, running each token's K experts directly (a matmul pair per token and expert) beats sorting rows
# by expert and scattering them back up to this many tokens.
DIRECT_MAX_TOKENS = 2
# In a compiled CPU graph the gathered experts fuse into one kernel that reads the weights in place, which
# stays ahead of sorting over a whole decode batch (a GRPO rollout's 256 rows, too, where experts are small).
GATHERED_MAX_TOKENS = 512


@dataclass(frozen=True)
class Kernels:
    """What a model computes with; each field has the signature of the reference function it stands for."""

    job: str  # "reference", "train" or "decode"
    compiled: bool  # prepared for torch.compile
    linear: Callable[..., Tensor]  # (x, weight, bias=None): F.linear, for every projection
    rotations: Callable[[Tensor, float], Tensor]  # (angles, magnitude) -> what apply_rope takes
    apply_rope: Callable[[Tensor, Tensor], Tensor]  # (x, rotations)
    causal_attention: Callable[..., Tensor]  # (q, k, v, scale, mask=None), queries over their own sequence
    expert_linear: Callable[[Tensor, Tensor], Tensor]  # the routed experts' matmul (FP8 swaps it)
    routed_experts: Callable[..., Tensor]  # (x, weights, idx, gate_up, down, out) -> out + routed experts
    grouped_experts: Callable[..., Tensor]  # (xs grouped by expert, counts, gate_up, down) -> their outputs
    latent_attention: Callable[..., Tensor]  # (q, context, bias, rank): MLA's absorbed attention
    paged_context: bool  # latent_attention also reads a PagedContext: a cache may leave the context in place
    fold_absorbed: bool  # MLA's absorbed form with W_UK and W_UV folded in (folded.FoldedMLA), where it pays


def select(
    reference: Kernels,
    job: str,
    device: torch.device,
    compiled: bool = False,
    expert_linear: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Kernels:
    """The kernels for `job` on `device`, `reference` (the model's functions) where no faster form applies.

    "reference" runs the model's functions as written; "train" sorts rows by expert (every expert in one
    grouped matmul on CPU, and on a GPU in bf16); "decode" also runs the experts of a token or two directly,
    folds MLA's absorbed weights and, on CPU, attends over the engine's paged cache in place. `compiled` adds
    the forms that pay inside a compiled graph: rope in real pairs, rows to and from expert order by gathers,
    and on CPU blocked causal attention and, within a `GroupedMask`'s groups, attention under its additive
    form (training), fused small-row projections and gathered experts (decoding). Every job but "reference"
    attends within a `GroupedMask`'s groups in their padded layout (the reference, over the whole packed
    row). `expert_linear` is the routed experts' matmul (F.linear, or FP8's)."""
    if job not in JOBS:
        raise ValueError(f"job: {job!r}, expected one of {', '.join(JOBS)}")
    return _select(reference, job, torch.device(device), compiled, expert_linear or reference.expert_linear)


@cache  # the same choice is the same object: graphs compiled for it pass their guards when a model switches back
def _select(
    reference: Kernels,
    job: str,
    device: torch.device,
    compiled: bool,
    expert_linear: Callable[[Tensor, Tensor], Tensor],
) -> Kernels:
    plain = expert_linear is F.linear  # the grouped and gathered forms call the matmul ops themselves
    cpu = device.type == "cpu"
    kernels = replace(
        reference,
        job=job,
        compiled=compiled,
        expert_linear=expert_linear,
        routed_experts=partial(reference.routed_experts, linear=expert_linear),
        grouped_experts=partial(reference.grouped_experts, linear=expert_linear),
    )
    if job == "reference":
        return kernels
    kernels = replace(
        kernels,
        fold_absorbed=job == "decode",
        causal_attention=grouped_attention(reference.causal_attention),
    )
    grouped = kernels.grouped_experts
    if plain and cpu and GROUPED_MM_CPU:
        grouped = grouped_experts_mm
    elif plain and device.type == "cuda" and grouped_mm_on_cuda(device.index or 0):
        grouped = grouped_experts_cuda
    eager = partial(sorted_experts, grouped=grouped)
    if job == "decode":
        eager = up_to(DIRECT_MAX_TOKENS, partial(direct_experts, linear=expert_linear), eager)
    kernels = replace(kernels, routed_experts=eager, grouped_experts=grouped)
    if cpu and job == "decode" and paged_attention_available():
        paged = partial(paged_latent_attention, reference=reference.latent_attention)
        kernels = replace(kernels, latent_attention=paged, paged_context=True)
    if not compiled:
        return kernels
    traced = partial(gathered_sorted_experts, grouped=grouped)
    if job == "decode":
        few = gathered_experts if plain else partial(direct_experts, linear=expert_linear)
        traced = up_to(GATHERED_MAX_TOKENS if plain and cpu else DIRECT_MAX_TOKENS, few, traced)
    kernels = replace(
        kernels,
        routed_experts=when_compiled(traced, eager),
        rotations=when_compiled(real_rotations, reference.rotations),
        apply_rope=when_compiled(apply_real_rope, reference.apply_rope),
    )
    if cpu and job == "train":
        fused = reference.causal_attention  # also under an additive mask, and beyond BLOCKED_MAX_LEN

        def in_graphs(short: Callable[..., Tensor]) -> Callable[..., Tensor]:
            return when_compiled(up_to_len(BLOCKED_MAX_LEN, short, fused), fused)

        attend = grouped_attention(in_graphs(blocked_causal_attention), in_graphs(biased_attention))
        kernels = replace(kernels, causal_attention=attend)
    if cpu and job == "decode":
        kernels = replace(kernels, linear=when_compiled(small_row_linear, reference.linear))
    return kernels
