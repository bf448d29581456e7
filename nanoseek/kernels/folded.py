"""MLA's absorbed projections with W_UK and W_UV folded into the weights around them (decoding)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Folding trades FLOPs for fewer operations (one matmul each way instead of a projection and a per-head
# einsum): worth it while the folded weights stay close to the size of those they replace, as in the small
# presets, not for V3's shapes, where they would be several times larger.
MAX_GROWTH = 1.5


def fold_pays(mla: Any) -> bool:
    """Whether the folded weights of `mla` (an MLA module) stay within MAX_GROWTH of the weights they replace."""
    h, nope, rope, v, r = mla.n_heads, mla.nope, mla.rope, mla.v_dim, mla.kv_rank
    q_in, d = mla.q_up().weight.shape[1], mla.o_proj.weight.shape[0]
    plain = h * (nope + rope) * q_in + d * h * v + h * (nope + v) * r
    return h * (r + rope) * q_in + d * h * r <= MAX_GROWTH * plain


class FoldedMLA:
    """Replaces `MLA.absorb_query` and `MLA.absorb_output` (nanoseek.model) for decoding.

    The query weight [H*(rank+rope), q_in] holds W_UK and the softmax scale, the output weight [d, H*rank]
    holds W_UV, both derived from `mla`'s parameters once and again at `refold()` (whoever changes them in
    place calls it: the engine's runner, when told the weights changed). Refolding writes into the same
    tensors, so compiled graphs, which read them as inputs, see the new values without recompiling. For
    inference: no gradient flows through them."""

    def __init__(self, mla: Any):
        self.mla = mla
        self.wq = self.wo = torch.empty(0)
        self.refold()

    def refold(self) -> None:
        """Fold `mla`'s parameters as they are now."""
        mla = self.mla
        q_w, kv_w, o_w = mla.q_up().weight, mla.kv_b_proj.weight, mla.o_proj.weight
        h, nope, rope, v, r = mla.n_heads, mla.nope, mla.rope, mla.v_dim, mla.kv_rank
        # plain fp32 arithmetic, whatever inference mode or autocast the caller is in
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(q_w.device.type, enabled=False):
            kv, q = kv_w.float().view(h, nope + v, r), q_w.float().view(h, nope + rope, -1)
            q_lat = kv[:, :nope].transpose(1, 2) @ q[:, :nope]  # [H, rank, q_in]: q_in -> q_nope W_UK
            wq = torch.cat([q_lat, q[:, nope:]], dim=1).reshape(h * (r + rope), -1) * mla.scale
            wo = (
                (o_w.float().view(-1, h, v).transpose(0, 1) @ kv[:, nope:]).transpose(0, 1).reshape(-1, h * r)
            )
            for name, new in (("wq", wq.to(q_w.dtype)), ("wo", wo.to(o_w.dtype))):
                old = getattr(self, name)
                if (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device):
                    old.copy_(new)
                else:  # first fold, or the parameters moved or changed dtype: compiled graphs recompile
                    setattr(self, name, new)

    def absorb_query(self, q_in: Tensor) -> tuple[Tensor, Tensor]:
        b, s, _ = q_in.shape
        q = self.mla.kernels.linear(q_in, self.wq).view(b, s, self.mla.n_heads, -1)
        return q[..., : self.mla.kv_rank], q[..., self.mla.kv_rank :]

    def absorb_output(self, o_lat: Tensor) -> Tensor:
        return self.mla.kernels.linear(o_lat.flatten(2), self.wo, self.mla.o_proj.bias)
