"""nanoseek: DeepSeek-V3/R1 in miniature — MLA, DeepSeekMoE, MTP, HF-compatible checkpoints."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import ModelConfig
from .engine import LLM, SamplingParams
from .latent_cache import LatentCache
from .model import DeepSeekV3

__all__ = [
    "ModelConfig",
    "DeepSeekV3",
    "LatentCache",
    "load_model",
    "save_model",
    "CheckpointError",
    "LLM",
    "SamplingParams",
]
__version__ = "0.1.0"
