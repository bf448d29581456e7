"""Paged MLA latent cache: fixed-size blocks, reference counts, and hashed full blocks for prefix caching.

Each slot holds, per layer, only the `kv_lora_rank + qk_rope_head_dim` latent of absorbed MLA. A full
block is identified by a chained hash (parent block's hash + its token ids); a hit is confirmed by
comparing the ids, and the block is shared by reference count. The hash is BLAKE2b, not Python's
`hash`, so that a prompt crafted to collide with another's prefix cannot read its latents (vLLM moved to
sha256 for the same reason). Freed blocks keep their hash and are reused least-recently-freed first,
so a popular prefix survives as long as memory allows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from itertools import chain

import torch
from torch import Tensor

from ..config import ModelConfig
from ..kernels import PagedContext, when_compiled
from .tensors import int64s


def chain_hash(parent: bytes | None, ids: tuple[int, ...]) -> bytes:
    """The chained hash of a full block: its parent's hash and its token ids."""
    return hashlib.blake2b((parent or b"") + array("q", ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Allocates cache blocks to sequences; knows nothing of tensors."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.block_ids: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None and self.by_hash.get(h) == block:
            del self.by_hash[h]  # its old content is about to be overwritten
        self.block_hash[block] = self.block_ids[block] = None
        self.ref[block] = 1
        return block

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks already holding a prefix of token_ids (full blocks only), with their references taken."""
        if not self.prefix_caching:
            return []
        blocks, h = [], None
        for i in range(len(token_ids) // self.block_size):
            ids = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(h, ids)
            block = self.by_hash.get(h)
            if block is None or self.block_ids[block] != ids:
                break
            if self.ref[block] == 0:
                del self.free[block]
            self.ref[block] += 1
            blocks.append(block)
        return blocks

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append blocks to `table` until it holds num_tokens; False (and no change) if memory is short."""
        if num_tokens <= len(table) * self.block_size:  # every decode step asks, for every row: mostly this
            return True
        need = -(-num_tokens // self.block_size) - len(table)
        if need > len(self.free):
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def seal(
        self, table: list[int], token_ids: list[int], done: int = 0, h: bytes | None = None
    ) -> tuple[int, bytes | None]:
        """Register the hashes of the full blocks table[done:] holding `token_ids` (a whole number of
        blocks; block `done`'s parent hash is h); returns the new (done, h) so each block is hashed once."""
        full = len(token_ids) // self.block_size
        for k in range(full if self.prefix_caching else 0):
            ids = tuple(token_ids[k * self.block_size : (k + 1) * self.block_size])
            h = chain_hash(h, ids)
            block = table[done + k]
            if self.block_hash[block] is None:
                self.block_hash[block], self.block_ids[block] = h, ids
                self.by_hash.setdefault(h, block)
        return done + full, h

    def reset_hashes(self) -> None:
        """Forget every cached prefix (after a weight update the stored latents are stale)."""
        self.by_hash.clear()
        self.block_hash = [None] * len(self.ref)
        self.block_ids = [None] * len(self.ref)

    def fork(self, table: list[int]) -> list[int]:
        """Share every block of `table` (for n samples of one prompt); the caller copies a partial tail."""
        for b in table:
            self.ref[b] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        for b in reversed(table):  # the tail is freed first, so the shared head stays cached longer
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()


class LatentStore:
    """The cache tensor: [layers (main, + MTP when speculating), num_blocks * block_size slots, latent_dim]."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        mtp: bool = False,
    ):
        self.data = torch.zeros(
            LatentStore.num_layers(config, mtp),
            num_blocks * block_size,
            config.latent_dim,
            dtype=dtype,
            device=device,
        )
        self.block_size = block_size

    @staticmethod
    def num_layers(config: ModelConfig, mtp: bool) -> int:
        """The main layers, plus the MTP layers when they draft."""
        return config.num_hidden_layers + (config.num_nextn_predict_layers if mtp else 0)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype, mtp: bool = False) -> int:
        """Per token: one latent per main layer (the MLA minimum), plus the MTP layers' when they draft."""
        return (
            LatentStore.num_layers(config, mtp)
            * config.latent_dim
            * torch.empty((), dtype=dtype).element_size()
        )

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.data[:, dst * bs : (dst + 1) * bs] = self.data[:, src * bs : (src + 1) * bs]


def _gather_context(data: Tensor, slots: Tensor, new_rows: Tensor, new: Tensor) -> Tensor:
    """data[slots] with `new` written at new_rows."""
    return data.index_select(0, slots).index_copy_(0, new_rows, new)


# One op to torch.compile, so a compiled graph runs it as this copy rather than generating its own (slower)
# gather and scatter. Eagerly the function is called directly: the op's dispatch costs as much again as the
# copy of a short context.
_gather_context_op = torch.library.custom_op("nanoseek::gather_context", mutates_args=())(_gather_context)


@_gather_context_op.register_fake
def _(data: Tensor, slots: Tensor, new_rows: Tensor, new: Tensor) -> Tensor:
    return data.new_empty(slots.shape[0], data.shape[1])


gather_context = when_compiled(_gather_context_op, _gather_context)


class PagedBatch:
    """One forward's view of the paged cache (implements the model's `LatentCacheLike`).

    Row b computes tokens at positions [start_b, start_b + len_b) and sees its context [0, start_b + len_b).
    The new tokens' latents reach the store only at `commit()`, which the caller runs after the forward.
    With `in_place` (for a model whose kernels have `paged_context`), a batch of one query a row hands MLA
    each layer's context as a PagedContext, left in the store, instead of gathering it.
    """

    def __init__(
        self,
        store: LatentStore,
        tables: list[list[int]],
        starts: list[int],
        lens: list[int],
        device: torch.device | str = "cpu",
        in_place: bool = False,
    ):
        self.store = store
        bs, b, s = store.block_size, len(tables), max(lens)
        t = max(st + n for st, n in zip(starts, lens))
        # a few tensor ops whatever B is: each row's positions [B, S], of which the first len_b are its own
        # tokens; a padded query repeats its row's last position, so it sees at least one key (no NaN), and
        # its latent is never stored
        first, n = int64s(starts), int64s(lens)
        pos = first[:, None] + torch.arange(s)
        real = torch.arange(s) < n[:, None]
        self._q_pos = torch.minimum(pos, (first + n - 1)[:, None])
        self.positions = self._q_pos.to(device)
        # the slot of every context position [B, T], from the block tables padded into one tensor
        nblk = -(-t // bs)
        table = int64s(chain.from_iterable(tb[:nblk] + [0] * (nblk - len(tb)) for tb in tables)).view(b, nblk)
        slots = (table[:, :, None] * bs + torch.arange(bs)).view(b, -1)[:, :t]
        self.ctx_slots = slots.reshape(-1).to(device)
        self.new_slots = slots.gather(1, self._q_pos)[real].to(device)
        self.new_rows = (torch.arange(b)[:, None] * t + pos)[real].to(device)  # in the flattened context
        # rows of the flattened [B * S] that are real
        self.valid_rows = None if min(lens) == s else torch.arange(b * s).view(b, s)[real].to(device)
        self._written: dict[int, Tensor] = {}  # layer -> latents of the new tokens, until commit()
        self.shape, self.device = (b, t), device
        self.causal = not any(starts) and min(lens) == s
        self._sees_all = s == 1 and min(starts) == t - 1  # one query per row, each seeing the whole context
        self._bias: Tensor | None = None
        # each row's context length, where the context stays in place (the lengths then stand for the bias)
        self._context_lens = (first + 1).to(device) if in_place and s == 1 else None

    @property
    def bias(self) -> Tensor | None:
        """Built on first use, once for every layer (a causal prefill chunk never asks for it). Not a
        functools.cached_property: its lock (Python 3.11) stops torch.compile from tracing through."""
        if self._bias is None and not self._sees_all and self._context_lens is None:
            (b, s), t = self._q_pos.shape, self.shape[1]
            hidden = torch.arange(t)[None, None, :] > self._q_pos[:, :, None]
            self._bias = (
                torch.zeros(b, s, t, dtype=self.store.data.dtype)
                .masked_fill_(hidden, float("-inf"))
                .to(self.device)
            )
        return self._bias

    def update(self, layer: int, latent: Tensor) -> Tensor:
        """The context with this forward's latents in place; they reach the store at `commit()`, so a
        compiled forward reads the store but never writes into it (which would copy the whole store)."""
        data = self.store.data[layer]
        new = latent.reshape(-1, latent.shape[-1])
        if self.valid_rows is not None:
            new = new.index_select(0, self.valid_rows)
        new = new.to(data.dtype)
        self._written[layer] = new
        if self._context_lens is not None:
            return PagedContext(data, self.ctx_slots.view(self.shape[0], -1), self._context_lens, new)
        context = gather_context(data, self.ctx_slots, self.new_rows, new)
        return context.view(self.shape[0], -1, data.shape[-1]).to(latent.dtype)

    def commit(self) -> None:
        """Write the latents of the forward just run into the store."""
        for layer, new in self._written.items():
            self.store.data[layer].index_copy_(0, self.new_slots, new)
        self._written.clear()
