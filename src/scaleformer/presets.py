"""Named configs. ``load_preset(name, **overrides)`` returns a validated config; ``build`` makes the model."""

from __future__ import annotations

from typing import Any, Callable

from scaleformer.config import (ConfigBase, ConfigError, MoEConfig, RetNetConfig, TransformerConfig, YOCOConfig,
                                closest_match)
from scaleformer.layers.delta_net import DeltaNet, GatedDeltaNet
from scaleformer.models.architecture import (GLU, MLP, Attention, LayerConfig, Lightning, ModelConfig,
                                             NoPosition, RoPE, S2Attention, every, uniform)

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
        raise ConfigError(f"unknown preset {name!r}{closest_match(name, _PRESETS)}; available: {', '.join(list_presets())}")
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

# The default model of `scaleformer train`: small enough for a few minutes on 2 CPU cores.
register_preset("retnet-mini", lambda: RetNetConfig(vocab_size=4096, embed_dim=128, value_dim=256, layers=4, heads=2,
                                                    ffn_dim=256, chunk_size=64, dropout=0.1))
# RetNet: a tiny one for tests, and TorchScale's sizes (value and FFN width ≈ 1.6875·d, key head dim 256).
register_preset("retnet-tiny", lambda: RetNetConfig(vocab_size=512, embed_dim=64, value_dim=128, layers=2, heads=2,
                                                    ffn_dim=128, chunk_size=16))
for _name, (_d, _v, _layers, _heads) in {
    "retnet-base": (512, 864, 6, 2), "retnet-medium": (1024, 1728, 16, 4), "retnet-xl": (2048, 3456, 24, 8),
    "retnet-3b": (2560, 4280, 32, 10), "retnet-7b": (4096, 6912, 32, 16), "retnet-13b": (5120, 8560, 40, 20),
    "retnet-65b": (8192, 13824, 64, 32),
}.items():
    register_preset(_name, lambda d=_d, v=_v, n=_layers, h=_heads: RetNetConfig(
        embed_dim=d, value_dim=v, ffn_dim=v, layers=n, heads=h))

# DIFF Transformer: differential attention (2 differential heads of 2 components = gpt-tiny's 4 heads), RoPE.
register_preset("diff-tiny", lambda: TransformerConfig(arch="decoder", attention="diff", position="rope", **_TINY))

# BitNet b1.58: LLaMA-like blocks (RMSNorm, SwiGLU, RoPE, no biases) with ternary-weight, 8-bit-activation linears.
register_preset("bitnet-tiny", lambda: TransformerConfig(
    arch="decoder", position="rope", norm_type="rmsnorm", ffn="glu", activation="swish", bias=False,
    linear="bitlinear", **_TINY))

# Gated retention (RetNet-3, YOCO's self-decoder): a decay per head and token, no row normalizer.
register_preset("gret-tiny", lambda: RetNetConfig(vocab_size=512, embed_dim=64, value_dim=128, layers=2, heads=2,
                                                  ffn_dim=128, chunk_size=16, decay="gated", normalizer="none"))
register_preset("gret-base", lambda: RetNetConfig(embed_dim=512, value_dim=864, ffn_dim=864, layers=6, heads=2,
                                                  decay="gated", normalizer="none"))

# YOCO: a gated-retention self-decoder, then cross-decoder layers reading one shared cache of 2 key/value heads.
# yoco-base is gpt-base's width and depth (768 x 12), with YOCO's head width 128 and a SwiGLU of ~8/3 d.
register_preset("yoco-tiny", lambda: YOCOConfig(vocab_size=512, embed_dim=64, layers=4, self_heads=2, heads=4,
                                                kv_heads=2, ffn_dim=128, chunk_size=16))
register_preset("yoco-base", lambda: YOCOConfig(vocab_size=50304, embed_dim=768, layers=12, self_heads=6, heads=6,
                                                kv_heads=2, ffn_dim=2048))

# TransNormerLLM: Lightning attention (constant per-head decays, OpenNLPLab's formula) and SGLU (a GLU without
# activation), RMSNorm, no positions; tnl-tiny is gpt-tiny's size.
register_preset("tnl-tiny", lambda: ModelConfig(
    vocab_size=512, embed_dim=64, position=NoPosition(), norm_type="rmsnorm",
    layers=uniform(LayerConfig(mixer=Lightning(heads=4, chunk_size=16), ffn=GLU(ffn_dim=128, activation="none",
                                                                                   bias=False)), 2)))

# The delta rule (fla's layer: short convolutions, L2-normalised q and k, sigmoid β; Gated DeltaNet adds the
# Mamba-2 decay and the output gate), RMSNorm, SwiGLU, no positions; the tiny ones are gpt-tiny's width.
# gdn-hybrid-tiny interleaves them 3:1 with gated grouped-query attention and RoPE, as Qwen3-Next does.
def _delta(kind: type, vocab_size: int, embed_dim: int, layers: int, heads: int, head_dim: int) -> ModelConfig:
    mixer = kind(heads=heads, key_dim=head_dim, value_dim=head_dim)
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=NoPosition(), norm_type="rmsnorm",
                       layers=uniform(LayerConfig(mixer=mixer, ffn=GLU(ffn_dim=8 * embed_dim // 3, bias=False)), layers))


register_preset("deltanet-tiny", lambda: _delta(DeltaNet, 512, 64, 2, 4, 16))
register_preset("gdn-tiny", lambda: _delta(GatedDeltaNet, 512, 64, 2, 4, 16))
register_preset("gdn-base", lambda: _delta(GatedDeltaNet, 50304, 768, 12, 6, 128))


def _hybrid(delta: ModelConfig, heads: int, kv_heads: int) -> ModelConfig:
    """Every fourth layer (3, 7, ...) full attention with grouped keys and values, per-head q/k RMSNorm and an
    output gate (Qwen3-Next's gated attention, without its partial RoPE), RoPE for those layers."""
    return delta.replace(position=RoPE(), layers=every(4, delta.layers, lambda layer: layer.replace(
        mixer=Attention(heads=heads, kv_heads=kv_heads, bias=False, output_gate=True, qk_norm=True))))


register_preset("gdn-hybrid-tiny", lambda: _hybrid(_delta(GatedDeltaNet, 512, 64, 4, 4, 16), 4, 2))
register_preset("gdn-hybrid-base", lambda: _hybrid(_delta(GatedDeltaNet, 50304, 768, 12, 6, 128), 12, 4))


# S2-Attention with Phi-3-small's pattern (block 64, 16 local blocks, vertical stride 8, heterogeneous heads,
# sparse and dense layers alternating, 4 query heads per key/value head), RoPE. The heads' shards cover every
# block only when heads >= vertical stride (Phi-3-small: 32 heads), so s2-tiny's 4 heads use stride 4.
def _s2(vocab_size: int, embed_dim: int, layers: int, heads: int, ffn_dim: int, stride: int) -> ModelConfig:
    sparse = LayerConfig(mixer=S2Attention(heads=heads, kv_heads=heads // 4, block=64, local_blocks=16, vert_stride=stride),
                         ffn=MLP(ffn_dim=ffn_dim))
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=RoPE(),
                       layers=every(2, uniform(sparse, layers),
                                    lambda layer: layer.replace(mixer=Attention(heads=heads, kv_heads=heads // 4))))


register_preset("s2-tiny", lambda: _s2(512, 64, 2, 4, 128, 4))
register_preset("s2-base", lambda: _s2(50304, 768, 12, 12, 3072, 8))

# LongNet: dilated attention on the Magneto (Sub-LN) base with xPos. longnet-base uses the paper's LM patterns.
register_preset("longnet-tiny", lambda: TransformerConfig(
    arch="decoder", norm="subln", position="xpos", attention="dilated", segment_lengths=(64, 128, 256),
    dilation_rates=(1, 2, 4), **{**_TINY, "max_positions": 2048}))
register_preset("longnet-base", lambda: TransformerConfig(
    arch="decoder", vocab_size=50304, norm="subln", position="xpos", attention="dilated",
    segment_lengths=(2048, 4096, 8192, 16384, 32768), dilation_rates=(1, 2, 4, 6, 12), **_BASE))

# Sparse mixture of experts with X-MoE routing (every second layer), for tests and small runs.
register_preset("gpt-moe-tiny", lambda: TransformerConfig(arch="decoder", moe=MoEConfig(experts=4, top_k=1), **_TINY))
register_preset("retnet-moe-tiny", lambda: RetNetConfig(vocab_size=512, embed_dim=64, value_dim=128, layers=2, heads=2,
                                                        ffn_dim=128, chunk_size=16, moe=MoEConfig(experts=4, top_k=2)))
