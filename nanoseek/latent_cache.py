"""`LatentCache`: the MLA latent cache of tests and simple generation (the engine keeps a paged one)."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelConfig


class LatentCache:
    """A simple contiguous cache of the MLA latent: only kv_lora_rank + rope values per token per layer.

    The paged engine cache implements the same `update`; this one serves tests and simple generation.
    Call `advance(S)` after each forward (the model does it) to commit the new tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        n_layers = config.num_hidden_layers + config.num_nextn_predict_layers
        self.data = torch.zeros(n_layers, batch, max_len, config.latent_dim, dtype=dtype, device=device)
        self.length = 0
        self._new = 0  # tokens of the forward in progress
        self._bias: Tensor | None = None  # their attention bias, once built

    def update(self, layer: int, latent: Tensor) -> Tensor:
        s = latent.shape[1]
        end = self.length + s
        if end > self.data.shape[2]:
            raise ValueError(f"LatentCache full: {end} tokens > max_len {self.data.shape[2]}")
        self.data[layer, :, self.length : end] = latent
        self._new = s
        return self.data[layer, :, :end].to(latent.dtype)  # (a no-op unless the cache's dtype differs)

    @property
    def bias(self) -> Tensor | None:
        """Causal over the tokens of the forward in progress (a single query sees everything); built once
        per forward, on first use."""
        if self._bias is None and self._new > 1:
            k = torch.arange(self.length + self._new, device=self.data.device)
            hidden = k[self.length :, None] < k[None, :]
            bias = torch.zeros(1, *hidden.shape, device=self.data.device)
            self._bias = bias.masked_fill_(hidden, float("-inf"))
        return self._bias

    @property
    def causal(self) -> bool:
        return self.length == 0

    def advance(self, n: int) -> None:
        self.length += n
        self._bias = None

    def nbytes_per_token(self) -> int:
        return self.data.shape[0] * self.data.shape[-1] * self.data.element_size()
