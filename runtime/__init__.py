"""The model: config, forward pass, MLA latent KV cache, routing, sampling, tokenizer, chat format."""

from .config import ModelConfig, load_config
from .dispatch import Options
from .loading import load_model
from .model import Model
from .session import Session


def load_tokenizer(path):
    from .tokenizer import load_tokenizer as _load
    return _load(path)


__all__ = ["ModelConfig", "Model", "Options", "Session", "load_config", "load_model", "load_tokenizer"]
