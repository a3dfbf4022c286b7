"""Flax NNX implementations of open decoder-only LMs, loaded from Hugging Face checkpoints."""

from models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling, UnsupportedModelError
from models.loading import CheckpointError, load_checkpoint, load_tokenizer, read_config, weight_map
from models.transformer import TARGETS, LinearHook, Transformer, token_logprobs

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "TARGETS",
    "CheckpointError",
    "LinearHook",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "UnsupportedModelError",
    "load_checkpoint",
    "load_tokenizer",
    "read_config",
    "token_logprobs",
    "weight_map",
]
