"""scaleformer: foundation architectures for PyTorch, exact and fast.

    >>> import scaleformer
    >>> model = scaleformer.build(scaleformer.load_preset("gpt-tiny"))
    >>> ids = scaleformer.generate(model, prompt_ids, max_new_tokens=20)
"""

from scaleformer.build import build, load, save
from scaleformer.cache import KVCache, RetentionCache, TransformerCache
from scaleformer.config import ConfigError, MoEConfig, RetNetConfig, TransformerConfig, config_from_dict
from scaleformer.generation import generate
from scaleformer.models import Decoder, Encoder, EncoderDecoder, ModelOutput, RetNet
from scaleformer.presets import list_presets, load_preset, register_preset

__version__ = "0.1.0"

__all__ = ["build", "save", "load", "generate", "list_presets", "load_preset", "register_preset", "config_from_dict",
           "ConfigError", "MoEConfig", "TransformerConfig", "RetNetConfig", "Encoder", "Decoder", "EncoderDecoder", "RetNet",
           "ModelOutput", "KVCache", "TransformerCache", "RetentionCache"]
