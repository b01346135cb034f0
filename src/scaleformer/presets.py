"""Named configs. ``load_preset(name, **overrides)`` returns a validated config; ``build`` makes the model."""

from __future__ import annotations

from typing import Any, Callable

from scaleformer.config import ConfigBase, ConfigError, TransformerConfig, _closest

__all__ = ["register_preset", "list_presets", "load_preset"]

_PRESETS: dict[str, Callable[[], ConfigBase]] = {}


def register_preset(name: str, make: Callable[[], ConfigBase]) -> None:
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = make


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def load_preset(name: str, **overrides: Any) -> ConfigBase:
    """The preset's config with ``overrides`` applied (each checked like any option)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}{_closest(name, _PRESETS)}; available: {', '.join(list_presets())}")
    config = _PRESETS[name]()
    return config.replace(**overrides) if overrides else config


# Tiny presets: fast CPU tests and demos. Vocabulary 512 holds the 256 byte ids of the byte tokenizer.
_TINY = dict(vocab_size=512, embed_dim=64, layers=2, heads=4, ffn_dim=128, max_positions=1024)
# TorchScale's defaults: 768 wide, 12 heads, 12 layers, FFN 3072, Pre-LN, GELU, eps 1e-5.
_BASE = dict(embed_dim=768, layers=12, heads=12, ffn_dim=3072)

register_preset("gpt-tiny", lambda: TransformerConfig(arch="decoder", **_TINY))
register_preset("bert-tiny", lambda: TransformerConfig(arch="encoder", **_TINY))
register_preset("mt-tiny", lambda: TransformerConfig(arch="encoder_decoder", position="sinusoidal", **_TINY))
register_preset("gpt-base", lambda: TransformerConfig(arch="decoder", vocab_size=50304, max_positions=2048, **_BASE))
register_preset("bert-base", lambda: TransformerConfig(arch="encoder", vocab_size=30528, max_positions=512, **_BASE))
register_preset("mt-base", lambda: TransformerConfig(arch="encoder_decoder", vocab_size=64000, position="sinusoidal",
                                                     **_BASE))
# Magneto (Sub-LN) with xPos: the LongNet paper's base LM, dense attention.
register_preset("magneto-base", lambda: TransformerConfig(arch="decoder", vocab_size=50304, norm="subln",
                                                          position="xpos", **_BASE))
register_preset("deepnet-tiny", lambda: TransformerConfig(arch="encoder_decoder", norm="deepnorm", position="sinusoidal",
                                                          **{**_TINY, "layers": 6}))
