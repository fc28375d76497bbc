"""The model: config, forward pass, MLA latent KV cache, routing, sampling, tokenizer, chat format."""

from .config import ModelConfig, load_config
from .model import Model, Session, load_model


def load_tokenizer(path):
    from .tokenizer import load_tokenizer as _load
    return _load(path)


__all__ = ["ModelConfig", "Model", "Session", "load_config", "load_model", "load_tokenizer"]
