"""Expert parallelism (V3 report §3.2): each MoE layer's routed experts split across the ranks of an
expert-parallel group, tokens sent to the ranks that hold their chosen experts with all-to-all and sent back
weighted.

Layout: N = D x E ranks (torchrun). Rank r is rank r % E of expert-parallel group r // E and holds experts
[(r % E) * n / E, (r % E + 1) * n / E) of every MoE layer; the D ranks holding the same experts are that
shard's replicas. Everything else (attention, shared experts, embeddings, router, MTP) stays data-parallel
under DDP over all N ranks. Expert gradients are summed over the ranks whose tokens used them (the
all-to-all's backward brings them to the holder), then over the replicas, and divided by N like DDP's
average, so N ranks take the step one process takes over the same global batch.

Experts are contiguous per rank, so with n_group a multiple of E each group of the gate lives on one rank
and `topk_group` bounds the ranks a token is sent to (V3's node-limited routing). A token goes once to each
rank holding any of its experts, with its weights for them; that rank returns one weighted sum.

Checkpoints hold the whole model and the whole optimizer state (gathered on save, sliced on resume), so a
run resumes with any expert-parallel degree, or none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ModelConfig
from ..model import DeepSeekV3, MoE

FLAG = "--expert-parallel"
EXPERT_SUFFIXES = (".experts.gate_up", ".experts.down")
ID_DTYPE = torch.int32  # the local expert ids sent with each row


def check_expert_parallel(
    degree: int, world: int, config: ModelConfig | None = None, fsdp: bool = False
) -> None:
    """Refuse a degree that cannot split this model's experts over this many processes (before any work)."""
    if degree == 1:
        return
    if degree < 1:
        raise ValueError(f"{FLAG}: must be >= 1, got {degree}")
    if world == 1:
        raise ValueError(
            f"{FLAG} {degree}: needs {degree} or a multiple of {degree} processes; launch with "
            f"torchrun --nproc_per_node={degree} -m nanoseek.cli ..."
        )
    if world % degree:
        raise ValueError(
            f"{FLAG} {degree}: must divide the number of processes ({world}): the ranks are "
            "data parallel x expert parallel"
        )
    if fsdp:
        raise ValueError(f"{FLAG} and --fsdp cannot be combined: expert parallelism runs under DDP")
    if config is not None:
        if not config.n_routed_experts or not any(
            config.is_moe_layer(i) for i in range(config.num_hidden_layers)
        ):
            raise ValueError(f"{FLAG} {degree}: the model has no routed experts to split")
        if config.n_routed_experts % degree:
            raise ValueError(f"{FLAG} {degree}: must divide n_routed_experts ({config.n_routed_experts})")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; the backward sends the gradients back the way they came, so
    every rank takes part in it, whatever it received."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def _exchange(x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


def moe_modules(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


class ExpertParallel:
    """Shards `model`'s routed experts for this rank and becomes every MoE layer's `dispatcher`.

    Every rank must construct it (it creates the process groups). `rank`/`world` are the global ones.
    """

    def __init__(self, model: nn.Module, degree: int, rank: int, world: int):
        moes = moe_modules(model)
        n_experts = moes[0][1].n_experts if moes else 0
        if not n_experts or n_experts % degree:
            raise ValueError(f"{FLAG} {degree}: the model has no routed experts divisible by {degree}")
        check_expert_parallel(degree, world)
        self.degree, self.world = degree, world
        self.rank = rank % degree  # within the expert-parallel group
        self.n_experts, self.local = n_experts, n_experts // degree
        # A group of its own even when it spans the world: DDP reduces on the default group during the
        # backward, and collectives of one group must be issued in the same order on every rank.
        self.group = self.replicas = None
        for g in range(world // degree):
            ranks = list(range(g * degree, (g + 1) * degree))
            pg = dist.new_group(ranks)
            if rank in ranks:
                self.group = pg
        if world > degree:
            for j in range(degree):
                ranks = list(range(j, world, degree))
                pg = dist.new_group(ranks)
                if rank in ranks:
                    self.replicas = pg
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        self.expert_names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, moe in moes:
            for attr in ("gate_up", "down"):
                full = getattr(moe.experts, attr)
                shard = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
                setattr(moe.experts, attr, shard)
                self.expert_names.append(f"{name}.experts.{attr}".lstrip("."))
                self.params.append(shard)
            moe.dispatcher = self
        # DDP must leave the experts alone: each rank holds different ones (reduced in `reduce_grads`)
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, self.expert_names)
        self._meter = torch.zeros(
            4, dtype=torch.float64
        )  # bytes, bytes without the group limit, tokens, layers

    # ---- the dispatch -----------------------------------------------------------------------------
    @torch.compiler.disable
    def __call__(
        self, moe: MoE, flat: Tensor, weights: Tensor, idx: Tensor, scores: Tensor, out: Tensor
    ) -> Tensor:
        """out + each token's weighted routed experts, computed on the ranks that hold them.
        flat [T, d] tokens, weights/idx [T, K] from the gate, scores [T, E] (for the traffic meter)."""
        t, k = idx.shape
        d = flat.shape[1]
        owner = idx // self.local  # [T, K] the rank holding each chosen expert
        wants = torch.zeros(t, self.degree, dtype=torch.bool, device=idx.device).scatter_(1, owner, True)
        dest, token = wants.t().nonzero(as_tuple=True)  # one row per (rank, token), grouped by rank
        on_dest = owner.index_select(0, token) == dest[:, None]  # [P, K] the slots that rank computes
        local_ids = torch.where(on_dest, idx.index_select(0, token) - dest[:, None] * self.local, -1).to(
            ID_DTYPE
        )
        w = torch.where(on_dest, weights.index_select(0, token), 0.0)
        # the weights travel with the token (cast to its dtype, as the local path casts them), so their
        # gradient comes back through the same all-to-all
        payload = torch.cat([flat.index_select(0, token), w.to(flat.dtype)], dim=1)
        send_counts = wants.sum(0)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        ids = _exchange(local_ids, send, recv, self.group)
        x_in, w_in = _AllToAll.apply(payload, send, recv, self.group).split([d, k], dim=1)
        row, slot = (ids >= 0).nonzero(as_tuple=True)
        expert = ids[row, slot].long()
        order = expert.argsort(stable=True)  # the (row, slot) pairs grouped by local expert
        row, slot, expert = row[order], slot[order], expert[order]
        if row.numel():
            counts = expert.new_zeros(self.local).index_add_(0, expert, torch.ones_like(expert))
            ys = moe.kernels.grouped_experts(
                x_in.index_select(0, row), counts, moe.experts.gate_up, moe.experts.down
            )
            ys = ys * w_in[row, slot][:, None]
            y = torch.zeros_like(x_in).index_add(0, row, ys)
        else:  # nothing received: still part of the graph, so that this rank joins the backward's all-to-all
            y = x_in * 0
        back = _AllToAll.apply(y, recv, send, self.group)
        if torch.is_grad_enabled():
            self._measure(moe, send, scores, t, k, d, flat.element_size(), y.element_size())
        return out.index_add(0, token, back.to(out.dtype))

    def _measure(
        self, moe: MoE, send: list[int], scores: Tensor, t: int, k: int, d: int, x_bytes: int, y_bytes: int
    ) -> None:
        """Forward bytes this rank's tokens move between ranks (dispatch rows and their expert ids out, combine
        rows back; summed over the ranks, the bytes sent), and what routing without the group limit would
        have moved."""
        row_bytes = (d + k) * x_bytes + k * torch.tensor([], dtype=ID_DTYPE).element_size() + d * y_bytes
        remote = sum(send) - send[self.rank]
        with torch.no_grad():
            free = (scores.detach() + moe.gate.e_score_correction_bias).topk(k, dim=-1).indices // self.local
            ranks = torch.zeros(t, self.degree, dtype=torch.bool, device=scores.device).scatter_(
                1, free, True
            )
            remote_free = int(ranks.sum()) - int(ranks[:, self.rank].sum())
        self._meter += torch.tensor([remote * row_bytes, remote_free * row_bytes, t, 1], dtype=torch.float64)

    def step_metrics(self) -> dict[str, float]:
        """The all-to-all traffic since the last call, over all ranks (every rank must call it)."""
        m = self._meter.clone()
        self._meter.zero_()
        if self.world > 1:
            m = m.to(self._device())
            dist.all_reduce(m)
            m = m.cpu()
        bytes_, free, tokens, _ = m.tolist()
        if not tokens:
            return {}
        # forward bytes per token per MoE layer; the backward sends as much again
        return {
            "ep_a2a_bytes_per_token": bytes_ / tokens,
            "ep_a2a_bytes_per_token_no_limit": free / tokens,
            "ep_a2a_bytes_step": 2 * bytes_,
        }

    def _device(self) -> torch.device:
        return self.params[0].device

    # ---- gradients ---------------------------------------------------------------------------------
    def reduce_grads(self) -> None:
        """Each expert's gradient summed over its replicas and divided by the world size, as DDP averages
        the others. An expert no token reached gets a zero gradient, as it does in one process (where its
        slice of the stacked weights does), and takes the same optimizer step on every replica."""
        for p in self.params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.replicas is not None:
                dist.all_reduce(p.grad, group=self.replicas)
            p.grad.div_(self.world)

    def clip_grad_norm_(self, params: list[Tensor], max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the whole model: the experts' share of the squared norm is
        summed over the group, which holds each expert once."""
        experts = {id(p) for p in self.params}
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]

        def square_sum(gs: list[Tensor]) -> Tensor:
            if not gs:
                return torch.zeros((), dtype=torch.float32, device=self._device())
            return torch.stack([torch.linalg.vector_norm(g, 2.0).float() for g in gs]).square().sum()

        dense_sq = square_sum([p.grad for p in with_grad if id(p) not in experts])
        shard_sq = square_sum([p.grad for p in with_grad if id(p) in experts])
        dist.all_reduce(shard_sq, group=self.group)
        total = (dense_sq + shard_sq).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return float(total)

    # ---- checkpoints -------------------------------------------------------------------------------
    def _gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.degree)]
        dist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts).cpu()

    def _is_expert(self, name: str) -> bool:
        return name in self.expert_names

    def full_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A model state dict with every expert gathered (every rank must call it)."""
        return {
            k: self._gather(v) if self._is_expert(k) else v.detach().to("cpu", copy=True)
            for k, v in state.items()
        }

    def full_model(self, model: DeepSeekV3, main: bool) -> DeepSeekV3 | None:
        """The whole model on the main rank (a CPU copy), None elsewhere; every rank must call it."""
        state = self.full_state(model.state_dict())
        if not main:
            return None
        with torch.device("meta"):
            full = DeepSeekV3(model.config)
        full.load_state_dict(state, strict=True, assign=True)
        if model.config.tie_word_embeddings:
            full.lm_head.weight = full.model.embed_tokens.weight
        full.inv_freq = model.inv_freq.detach().cpu().clone()
        return full.train(model.training)

    def full_optimizer_state(self, sd: dict) -> dict:
        """An optimizer state dict keyed by parameter name with the experts' moments gathered."""
        state = {
            name: {
                k: self._gather(v) if self._is_expert(name) and torch.is_tensor(v) and v.dim() else v
                for k, v in st.items()
            }
            for name, st in sd["state"].items()
        }
        return {**sd, "state": state}

    def _slice(self, t: Tensor) -> Tensor:
        if t.dim() == 0 or t.shape[0] != self.n_experts:
            raise ValueError(
                f"{FLAG}: expected a tensor of all {self.n_experts} experts, got shape {tuple(t.shape)}"
            )
        return t[self.rank * self.local : (self.rank + 1) * self.local].clone()

    def local_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A whole model state dict cut to this rank's experts."""
        return {k: self._slice(v) if self._is_expert(k) else v for k, v in state.items()}

    def local_optimizer_state(self, sd: dict) -> dict:
        """A whole optimizer state dict (keyed by parameter name) cut to this rank's experts."""
        state = {
            name: {
                k: self._slice(v) if self._is_expert(name) and torch.is_tensor(v) and v.dim() else v
                for k, v in st.items()
            }
            for name, st in sd["state"].items()
        }
        return {**sd, "state": state}

    def share_dense(self, full: DeepSeekV3, model: DeepSeekV3) -> None:
        """Make the whole copy `full` use the sharded `model`'s own parameters and buffers for everything
        but the experts, so that it follows the training at once; its experts follow `gather_experts_into`."""
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        for prefix, module in full.named_modules():
            for name in list(module._parameters):
                key = f"{prefix}.{name}".lstrip(".")
                if module._parameters[name] is not None and not self._is_expert(key):
                    module._parameters[name] = params[key]
            for name in list(module._buffers):
                key = f"{prefix}.{name}".lstrip(".")
                if key in buffers:
                    module._buffers[name] = buffers[key]

    def gather_experts_into(self, full: DeepSeekV3, model: DeepSeekV3) -> None:
        """Copy every expert of the sharded `model` into the whole model `full` (every rank must call it)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in full.named_parameters():
                if self._is_expert(name):
                    p.copy_(self._gather(params[name]).to(p.device, p.dtype))
