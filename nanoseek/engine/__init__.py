"""The inference engine: continuous batching over a paged MLA latent cache with prefix caching."""

from .llm import LLM, CompletionOutput, RequestOutput, StreamDelta
from .sampling import InvalidRequest, SamplingParams

__all__ = ["LLM", "SamplingParams", "InvalidRequest", "RequestOutput", "CompletionOutput", "StreamDelta"]
