"""scaleformer: foundation architectures for PyTorch, exact and fast.

    >>> import scaleformer
    >>> model = scaleformer.build(scaleformer.load_preset("gpt-tiny"))
    >>> ids = scaleformer.generate(model, prompt_ids, max_new_tokens=20)
"""

import importlib
import sys
import types

# Where each public name lives. They load on first use (PEP 562), so that `import scaleformer` and the
# command line's --help and flag errors do not wait for torch; `sf.build` etc. behave as plain imports.
_HOMES = {
    "scaleformer.build": ("build", "load", "save"),
    "scaleformer.cache": ("KVCache", "RetentionCache", "RetentionState", "TransformerCache", "save_cache",
                          "load_cache", "CacheSnapshot"),
    "scaleformer.config": ("ConfigError", "MoEConfig", "RetNetConfig", "RouterConfig", "S2Config", "TransformerConfig",
                           "YOCOConfig", "config_from_dict"),
    "scaleformer.generation": ("generate",),
    "scaleformer.engine": ("Engine", "PrefixCache", "SamplingOptions"),
    "scaleformer.models": ("YOCO", "Decoder", "Encoder", "EncoderDecoder", "ModelOutput", "RetNet"),
    "scaleformer.models.architecture": ("GLU", "MLP", "Attention", "CrossDecoderAttention", "DeepNorm", "DiffAttention",
                                        "DilatedAttention", "LayerConfig", "Lightning", "S2Attention", "LearnedPosition",
                                        "ModelConfig", "MoE", "MultiwayConfig", "NoPosition", "PostNorm", "PreNorm",
                                        "Retention", "RoPE", "SinusoidalPosition", "SubLN", "T5Bias", "XPos", "every",
                                        "uniform", "EncoderDecoderConfig", "DiffAttentionV2"),
    "scaleformer.models.families": ("transformer", "encoder_decoder", "retnet", "yoco", "lightning_lm",
                                    "delta_rule_lm", "mamba2_lm", "samba", "jamba", "s2_lm", "model_config"),
    "scaleformer.layers.mamba2": ("Mamba2",),
    "scaleformer.layers.delta_net": ("DeltaNet", "GatedDeltaNet"),
    "scaleformer.models.beit3": ("BEiT3", "BEiT3Config"),
    "scaleformer.models.longvit": ("LongViT", "LongViTConfig"),
    "scaleformer.presets": ("list_presets", "load_preset", "register_preset", "preset_knobs"),
    "scaleformer.runtime": ("decoding_layout",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name in _HOME_OF:
        value = getattr(importlib.import_module(_HOME_OF[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'scaleformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME_OF])


class _Package(types.ModuleType):
    """`scaleformer.build` is the function, as it always was, though a module of that name exists: the import
    system binds a submodule to its package's attribute when it loads, which would replace the function
    (the module stays importable: ``importlib.import_module("scaleformer.build")``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _HOME_OF and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"

__all__ = ["build", "save", "load", "generate", "decoding_layout", "list_presets", "load_preset", "register_preset", "config_from_dict",
           "ConfigError", "MoEConfig", "S2Config", "TransformerConfig", "RetNetConfig", "YOCOConfig", "Encoder", "Decoder", "EncoderDecoder",
           "RetNet", "YOCO", "BEiT3", "BEiT3Config", "LongViT", "LongViTConfig",
           "ModelOutput", "KVCache", "TransformerCache", "RetentionCache", "RetentionState", "RouterConfig",
           "save_cache", "load_cache", "CacheSnapshot", "Engine", "PrefixCache", "SamplingOptions",
           # a model as data (scaleformer.models.architecture)
           "ModelConfig", "LayerConfig", "Attention", "DilatedAttention", "Retention", "DiffAttention",
           "CrossDecoderAttention", "Lightning", "S2Attention", "DeltaNet", "GatedDeltaNet", "MLP", "GLU",
           "MoE",
           "LearnedPosition", "SinusoidalPosition", "RoPE", "XPos", "T5Bias", "NoPosition", "PreNorm", "PostNorm",
           "DeepNorm", "SubLN", "MultiwayConfig", "EncoderDecoderConfig", "uniform", "every", "model_config",
           # families: functions with keyword knobs returning a model config (scaleformer.models.families)
           "transformer", "encoder_decoder", "retnet", "yoco", "lightning_lm", "delta_rule_lm", "mamba2_lm", "s2_lm",
           "samba", "jamba", "Mamba2", "DiffAttentionV2",
           "preset_knobs"]
