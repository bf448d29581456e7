"""The inference engine: continuous batching over a paged MLA latent cache with prefix caching."""

from .llm import LLM, CompletionOutput, RequestOutput, StreamDelta
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "StreamDelta"]
