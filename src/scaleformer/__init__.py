"""scaleformer: foundation architectures for PyTorch, exact and fast.

    >>> import scaleformer
    >>> model = scaleformer.build(scaleformer.load_preset("gpt-tiny"))
    >>> ids = scaleformer.generate(model, prompt_ids, max_new_tokens=20)
"""

from scaleformer.build import build, load, save
from scaleformer.cache import KVCache, RetentionCache, RetentionState, TransformerCache
from scaleformer.config import (ConfigError, MoEConfig, RetNetConfig, RouterConfig, S2Config, TransformerConfig, YOCOConfig,
                                config_from_dict)
from scaleformer.generation import generate
from scaleformer.models import YOCO, Decoder, Encoder, EncoderDecoder, ModelOutput, RetNet
from scaleformer.models.architecture import (GLU, MLP, Attention, CrossDecoderAttention, DeepNorm, DiffAttention,
                                             DilatedAttention, LayerConfig, Lightning, S2Attention,
                                             LearnedPosition, ModelConfig, MoE, MultiwayConfig, NoPosition, PostNorm,
                                             PreNorm, Retention, RoPE, SinusoidalPosition, SubLN, T5Bias, XPos, every,
                                             model_config, uniform)
from scaleformer.models.beit3 import BEiT3, BEiT3Config
from scaleformer.models.longvit import LongViT, LongViTConfig
from scaleformer.presets import list_presets, load_preset, register_preset
from scaleformer.runtime import decoding_layout

__version__ = "0.1.0"

__all__ = ["build", "save", "load", "generate", "decoding_layout", "list_presets", "load_preset", "register_preset", "config_from_dict",
           "ConfigError", "MoEConfig", "S2Config", "TransformerConfig", "RetNetConfig", "YOCOConfig", "Encoder", "Decoder", "EncoderDecoder",
           "RetNet", "YOCO", "BEiT3", "BEiT3Config", "LongViT", "LongViTConfig",
           "ModelOutput", "KVCache", "TransformerCache", "RetentionCache", "RetentionState", "RouterConfig",
           # a model as data (scaleformer.models.architecture)
           "ModelConfig", "LayerConfig", "Attention", "DilatedAttention", "Retention", "DiffAttention",
           "CrossDecoderAttention", "Lightning", "S2Attention", "MLP", "GLU",
           "MoE",
           "LearnedPosition", "SinusoidalPosition", "RoPE", "XPos", "T5Bias", "NoPosition", "PreNorm", "PostNorm",
           "DeepNorm", "SubLN", "MultiwayConfig", "uniform", "every", "model_config"]
