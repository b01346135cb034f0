"""Named configs: each preset is a family function of :mod:`scaleformer.models.families` with some knobs set.
``load_preset(name, **knobs)`` calls it with more knobs (checked like any option) and returns the
:class:`~scaleformer.ModelConfig` (an encoder-decoder's :class:`~scaleformer.EncoderDecoderConfig`);
``build`` makes the model."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

from scaleformer.config import ConfigBase, ConfigError, MoEConfig, closest_match
from scaleformer.models.architecture import EncoderDecoderConfig, ModelConfig
from scaleformer.models.families import (call_with_knobs, delta_rule_lm, encoder_decoder, knobs_of, lightning_lm,
                                         jamba, mamba2_lm, retnet, s2_lm, samba, transformer, with_options, yoco)
from scaleformer.overrides import apply_overrides

__all__ = ["register_preset", "list_presets", "load_preset", "preset_knobs", "preset_function", "preset_with_options"]

_PRESETS: dict[str, functools.partial] = {}


def register_preset(name: str, family: Callable[..., ModelConfig | EncoderDecoderConfig], **knobs: Any) -> None:
    """Name ``family(**knobs)``; ``load_preset(name, **more)`` calls ``family(**knobs, **more)``."""
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    unknown = set(knobs) - set(knobs_of(family))
    if unknown:
        raise ValueError(f"{family.__name__}() has no knobs {sorted(unknown)}")
    _PRESETS[name] = functools.partial(family, **knobs)


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def _preset(name: str) -> functools.partial:
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}{closest_match(name, _PRESETS)}; available: {', '.join(list_presets())}")
    return _PRESETS[name]


def preset_function(name: str) -> Callable[..., ModelConfig | EncoderDecoderConfig]:
    """The family function a preset calls."""
    return _preset(name).func


def preset_knobs(name: str) -> dict[str, Any]:
    """Every knob of a preset's family function, with the value the preset gives it."""
    preset = _preset(name)
    return {**knobs_of(preset.func), **preset.keywords}


def load_preset(name: str, **knobs: Any) -> ModelConfig | EncoderDecoderConfig:
    """The preset's model config, its family function called with ``knobs`` too (each checked like any
    option; one that would change nothing is an error). ``load_preset("gpt-tiny", window=256)``."""
    preset = _preset(name)
    try:
        return call_with_knobs(preset.func, knobs, preset.keywords)
    except ConfigError as error:
        raise ConfigError(f"preset {name!r}: {error}") from None


def preset_with_options(name: str, options: dict[str, Any]) -> ConfigBase:
    """A preset with KEY=VALUE options. A key that names one of the preset's knobs (``layers=4``,
    ``position=rope``, ``window=64``), or a path into a knob that holds a config (``moe.experts=8``), sets
    that knob of its family function; any other key is an override of the model config it returns
    (``layers[*].mixer.window=64``: see :func:`with_options`)."""
    knobs = {knob: value.to_dict() if isinstance(value, ConfigBase) else value
             for knob, value in preset_knobs(name).items()}
    root = lambda key: re.split(r"[.\[]", key, maxsplit=1)[0]  # noqa: E731
    # a path goes into a knob that holds a config (or None, where one may go); into a count or a name it
    # can only mean the model config's component of that name (layers[*], position.base)
    mine = {key: value for key, value in options.items() if root(key) in knobs
            and (key == root(key) or knobs[root(key)] is None or isinstance(knobs[root(key)], dict))}
    changed = apply_overrides(knobs, mine)
    return with_options(load_preset(name, **{knob: changed[knob] for knob in {root(key) for key in mine}}),
                        {key: value for key, value in options.items() if key not in mine})


# Tiny presets: fast CPU tests and demos. Vocabulary 512 holds the 256 byte ids of the byte tokenizer.
# A preset sets only knobs its model reads (max_positions only with learned positions).
_TINY = dict(vocab_size=512, embed_dim=64, layers=2, heads=4, ffn_dim=128)
_LEARNED = dict(max_positions=1024)
# TorchScale's defaults: 768 wide, 12 heads, 12 layers, FFN 3072, Pre-LN, GELU, eps 1e-5.
_BASE = dict(embed_dim=768, layers=12, heads=12, ffn_dim=3072)

register_preset("gpt-tiny", transformer, **_TINY, **_LEARNED)
register_preset("bert-tiny", transformer, causal=False, **_TINY, **_LEARNED)
register_preset("mt-tiny", encoder_decoder, position="sinusoidal", **_TINY)
register_preset("gpt-base", transformer, vocab_size=50304, max_positions=2048, **_BASE)
register_preset("bert-base", transformer, causal=False, vocab_size=30528, max_positions=512, **_BASE)
register_preset("mt-base", encoder_decoder, vocab_size=64000, position="sinusoidal", **_BASE)
# Magneto (Sub-LN) with xPos: the LongNet paper's base LM, dense attention.
register_preset("magneto-base", transformer, vocab_size=50304, norm="subln", position="xpos", **_BASE)
register_preset("deepnet-tiny", encoder_decoder, norm="deepnorm", position="sinusoidal", **{**_TINY, "layers": 6})

# The default model of `scaleformer train`: small enough for a few minutes on 2 CPU cores.
register_preset("retnet-mini", retnet, vocab_size=4096, embed_dim=128, value_dim=256, layers=4, heads=2, ffn_dim=256,
                chunk_size=64, dropout=0.1)
# RetNet: a tiny one for tests, and TorchScale's sizes (value and FFN width ≈ 1.6875·d, key head dim 256).
register_preset("retnet-tiny", retnet, vocab_size=512, embed_dim=64, value_dim=128, layers=2, heads=2, ffn_dim=128,
                chunk_size=16)
for _name, (_d, _v, _layers, _heads) in {
    "retnet-base": (512, 864, 6, 2), "retnet-medium": (1024, 1728, 16, 4), "retnet-xl": (2048, 3456, 24, 8),
    "retnet-3b": (2560, 4280, 32, 10), "retnet-7b": (4096, 6912, 32, 16), "retnet-13b": (5120, 8560, 40, 20),
    "retnet-65b": (8192, 13824, 64, 32),
}.items():
    register_preset(_name, retnet, embed_dim=_d, value_dim=_v, ffn_dim=_v, layers=_layers, heads=_heads)

# DIFF Transformer: differential attention (2 differential heads of 2 components = gpt-tiny's 4 heads), RoPE.
register_preset("diff-tiny", transformer, attention="diff", position="rope", **_TINY)
# DIFF Transformer V2: 4 output heads from 8 query heads in pairs, token-wise sigmoid λ, no per-head norm.
register_preset("diff2-tiny", transformer, attention="diff2", position="rope", **_TINY)

# BitNet b1.58: LLaMA-like blocks (RMSNorm, SwiGLU, RoPE, no biases) with ternary-weight, 8-bit-activation linears.
register_preset("bitnet-tiny", transformer, position="rope", norm_type="rmsnorm", ffn="glu", activation="swish",
                bias=False, linear="bitlinear", **_TINY)

# Gated retention (RetNet-3, YOCO's self-decoder): a decay per head and token, no row normalizer.
register_preset("gret-tiny", retnet, vocab_size=512, embed_dim=64, value_dim=128, layers=2, heads=2, ffn_dim=128,
                chunk_size=16, decay="gated", normalizer="none")
register_preset("gret-base", retnet, embed_dim=512, value_dim=864, ffn_dim=864, layers=6, heads=2, decay="gated",
                normalizer="none")

# YOCO: a gated-retention self-decoder, then cross-decoder layers reading one shared cache of 2 key/value heads.
# yoco-base is gpt-base's width and depth (768 x 12), with YOCO's head width 128 and a SwiGLU of ~8/3 d.
register_preset("yoco-tiny", yoco, vocab_size=512, embed_dim=64, layers=4, self_heads=2, heads=4, kv_heads=2,
                ffn_dim=128, chunk_size=16)
register_preset("yoco-base", yoco, vocab_size=50304, embed_dim=768, layers=12, self_heads=6, heads=6, kv_heads=2,
                ffn_dim=2048)

# TransNormerLLM: Lightning attention and SGLU, gpt-tiny's size.
register_preset("tnl-tiny", lightning_lm)

# The delta rule, gpt-tiny's width for the tiny ones; the hybrids interleave it 3:1 with gated attention.
register_preset("deltanet-tiny", delta_rule_lm, gated=False, chunk_size=64)
register_preset("gdn-tiny", delta_rule_lm)
register_preset("gdn-base", delta_rule_lm, vocab_size=50304, embed_dim=768, layers=12, heads=6, head_dim=128)
register_preset("gdn-hybrid-tiny", delta_rule_lm, layers=4, attention_every=4, attention_heads=4, attention_kv_heads=2)
register_preset("gdn-hybrid-base", delta_rule_lm, vocab_size=50304, embed_dim=768, layers=12, heads=6, head_dim=128,
                attention_every=4, attention_heads=12, attention_kv_heads=4)

# Mamba-2: the SSD mixer alone in every block; mamba2-tiny has gpt-tiny's width and twice its layers (no MLP),
# mamba2-base is mamba2-130m's shape (768 wide, 24 layers, state 128, heads of 64).
register_preset("mamba2-tiny", mamba2_lm)
register_preset("mamba2-base", mamba2_lm, vocab_size=50304, embed_dim=768, layers=24, state_dim=128, head_dim=64)

# Hybrids with Mamba-2 (Samba and Jamba published theirs with Mamba-1; see samba() and jamba()). samba-tiny's
# window is short enough to matter at test lengths; samba-base is gpt-base's width with Samba's window 2048.
register_preset("samba-tiny", samba, window=32)
register_preset("samba-base", samba, vocab_size=50304, embed_dim=768, layers=12, heads=12, state_dim=128, head_dim=64)
register_preset("jamba-tiny", jamba)
# YOCO whose self-decoder is Mamba-2.
register_preset("yoco-mamba2-tiny", yoco, vocab_size=512, embed_dim=64, layers=4, self_decoder="mamba2", self_heads=4,
                heads=4, kv_heads=2, ffn_dim=128, state_dim=16)

# S2-Attention with Phi-3-small's pattern; s2-tiny's 4 heads use stride 4 (a stride above the head count
# leaves blocks no head visits).
register_preset("s2-tiny", s2_lm)
register_preset("s2-base", s2_lm, vocab_size=50304, embed_dim=768, layers=12, heads=12, ffn_dim=3072, vert_stride=8)

# LongNet: dilated attention on the Magneto (Sub-LN) base with xPos. longnet-base uses the paper's LM patterns.
register_preset("longnet-tiny", transformer, norm="subln", position="xpos", attention="dilated",
                segment_lengths=(64, 128, 256), dilation_rates=(1, 2, 4), **_TINY)
register_preset("longnet-base", transformer, vocab_size=50304, norm="subln", position="xpos", attention="dilated",
                segment_lengths=(2048, 4096, 8192, 16384, 32768), dilation_rates=(1, 2, 4, 6, 12), **_BASE)

# Sparse mixture of experts with X-MoE routing (every second layer), for tests and small runs.
register_preset("gpt-moe-tiny", transformer, moe=MoEConfig(experts=4, top_k=1), **_TINY, **_LEARNED)
register_preset("retnet-moe-tiny", retnet, vocab_size=512, embed_dim=64, value_dim=128, layers=2, heads=2, ffn_dim=128,
                chunk_size=16, moe=MoEConfig(experts=4, top_k=2))
