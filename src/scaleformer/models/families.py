"""Model families as functions with keyword knobs, each returning a :class:`ModelConfig` (torchtitan's model
args, as functions): ``transformer(layers=6, position="rope", window=256)``. Every preset is one of them with
some knobs set (:mod:`scaleformer.presets`), and a knob a user passes is checked like a config option.

A knob that would change nothing is an error, not a no-op: :func:`knob_function` rebuilds the config without
each knob the caller set and refuses one whose absence gives the same model (``window`` with dilated
attention, ``chunk_size`` for a sliding-window YOCO). That rule needs no list of which knob goes with which.

The flat configs of earlier versions (``TransformerConfig``, ``RetNetConfig``, ``YOCOConfig``) remain only
to read the config.json files and checkpoints they wrote: :func:`model_config` calls the family function
with their fields, which have the knobs' names, so one definition maps both.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Literal, TypeVar

from scaleformer.config import (Activation, AttentionImpl, AttentionKind, ConfigBase, ConfigError, FFNKind, MoEConfig,
                                Norm, NormType, Position as PositionName, RetNetConfig, RouterConfig, S2Config,
                                TransformerConfig,
                                YOCOConfig, check_type, closest_match, from_plain, type_hints)
from scaleformer.layers.delta_net import DeltaNet, GatedDeltaNet
from scaleformer.layers.mamba2 import Mamba2
from scaleformer.layers.scaling import residual_scaling
from scaleformer.mixer import MixerConfig
from scaleformer.overrides import apply_overrides
from scaleformer.models.architecture import (GLU, MLP, Attention, CrossDecoderAttention, DeepNorm, DiffAttention,
                                             DiffAttentionV2,
                                             DilatedAttention, EncoderDecoderConfig, FFN, LayerConfig,
                                             LearnedPosition, Lightning, ModelConfig, MoE, MultiwayConfig, NoPosition,
                                             Position, PostNorm, PreNorm, Retention, RoPE, S2Attention,
                                             SinusoidalPosition, SubLN, T5Bias, XPos, every, linear_drop_path, uniform)

__all__ = ["MAX_LAYERS", "knob_function", "call_with_knobs", "knobs_of", "transformer", "encoder_decoder", "retnet", "yoco", "lightning_lm", "samba", "jamba",
           "delta_rule_lm", "mamba2_lm", "s2_lm", "model_config", "with_options", "arch_of", "mixer_summary"]

Made = TypeVar("Made", ModelConfig, EncoderDecoderConfig)

MAX_LAYERS = 4096  # four times DeepNet's deepest (1,000 layers); building deeper takes seconds per thousand


def knobs_of(function: Callable[..., Any]) -> dict[str, Any]:
    """A family function's knobs and their defaults."""
    return {name: p.default for name, p in inspect.signature(inspect.unwrap(function)).parameters.items()}


def call_with_knobs(function: Callable[..., Made], given: dict[str, Any], base: dict[str, Any] | None = None) -> Made:
    """``function(**base, **given)`` (``function`` unchecked), with ``given`` checked: unknown names (with a
    did-you-mean), types (JSON objects and lists from a command line become the configs and tuples the knob
    takes), and a knob that changes nothing: rebuilt without it (at ``base``'s value or the default), the
    model is the same. ``base`` (a preset's own knobs) is trusted."""
    function = inspect.unwrap(function)
    defaults, hints, name = knobs_of(function), type_hints(function), function.__name__
    for knob in given:
        if knob not in defaults:
            raise ConfigError(f"{name}() has no knob `{knob}`{closest_match(knob, defaults)}; its knobs: "
                              f"{', '.join(defaults)} (a dotted override reaches any field of the config it returns)")
    given = {knob: from_plain(value, hints[knob], knob) for knob, value in given.items()}
    for knob, value in given.items():
        check_type(f"{name}()", knob, value, hints[knob])
        # before the family function expands a count into that many layer configs (a million took 36 s)
        if knob.endswith("layers") and type(value) is int and value > MAX_LAYERS:
            raise ConfigError(f"{knob}={value} is more than {MAX_LAYERS} layers; no model of this library is that deep")
    base = base or {}
    made = function(**{**base, **given})
    for knob, value in given.items():
        if value == base.get(knob, defaults[knob]):
            continue
        try:
            without = function(**{**base, **{k: v for k, v in given.items() if k != knob}})
        except ConfigError:
            continue  # the model needs it: it has an effect
        if without == made:
            raise ConfigError(f"{name}(): {knob}={value!r} changes nothing in this model (with the other knobs, no "
                              "layer reads it); leave it out")
    return made


def knob_function(function: Callable[..., Made]) -> Callable[..., Made]:
    """Decorator: the family function, its knobs checked by :func:`call_with_knobs`. The unchecked function
    stays reachable as ``__wrapped__`` (reading old files, whose options their own class checked)."""

    @functools.wraps(function)
    def checked(**knobs: Any) -> Made:
        return call_with_knobs(function, knobs)

    return checked


# ----------------------------------------------------------------------------------------------------------
# Transformers: encoder, decoder, encoder-decoder
# ----------------------------------------------------------------------------------------------------------

@knob_function
def transformer(*, causal: bool = True, vocab_size: int = 64000, embed_dim: int = 768, layers: int = 12,
                heads: int = 12, kv_heads: int | None = None, ffn_dim: int = 3072, ffn: FFNKind = "mlp",
                activation: Activation = "gelu", norm: Norm = "pre", norm_type: NormType = "layernorm",
                norm_eps: float = 1e-5, position: PositionName = "absolute", max_positions: int = 2048,
                rope_base: float = 10000.0, xpos_scale_base: float = 512.0, relative_buckets: int = 32,
                relative_max_distance: int = 128, dropout: float = 0.0, attention_dropout: float = 0.0,
                activation_dropout: float = 0.0, drop_path: float = 0.0, bias: bool = True, tie_embeddings: bool = True,
                scale_embeddings: bool = False, embedding_norm: bool = False, multiway: int = 1,
                multiway_scope: Literal["ffn", "all"] = "ffn", blockwise_causal_block: int | None = None,
                window: int | None = None, momentum: float | None = None, checkpoint_activations: bool = False,
                linear: Literal["standard", "bitlinear"] = "standard", attention_impl: AttentionImpl = "sdpa",
                attention: AttentionKind = "dense", s2: S2Config | None = None, segment_lengths: tuple[int, ...] = (),
                dilation_rates: tuple[int, ...] = (), moe: MoEConfig | None = None) -> ModelConfig:
    """A Transformer stack: a causal decoder (GPT-like) or, ``causal=False``, a bidirectional encoder
    (BERT-like), with TorchScale's options.

    ``norm``: "pre"-LN, "post"-LN, "deepnorm" (DeepNet) or "subln" (Magneto). ``position``: learned
    "absolute" (``max_positions`` rows), "sinusoidal", "rope" / "xpos" (``rope_base``, ``xpos_scale_base``), a
    T5 "relative" bias (``relative_buckets``, ``relative_max_distance``) or "none". ``attention``: "dense"
    softmax (``kv_heads`` for grouped queries, a ``window``, LeX's ``blockwise_causal_block``, ``momentum`` η),
    LongNet's "dilated" (``segment_lengths``, ``dilation_rates``), "diff" (heads/2 differential heads), "diff2"
    (DIFF V2: heads output heads from 2·heads query heads) or "s2" (``s2``'s pattern). ``multiway``: BEiT-3's per-modality copies (``multiway_scope`` "ffn" or "all").
    ``moe``: sparse expert FFNs in some layers. ``linear="bitlinear"``: BitNet b1.58.
    """
    return _transformer_stack("decoder" if causal else "encoder", "decoder" if causal else "encoder", layers, layers,
                              locals())


@knob_function
def encoder_decoder(*, vocab_size: int = 64000, embed_dim: int = 768, layers: int = 12,
                    decoder_layers: int | None = None, heads: int = 12, kv_heads: int | None = None,
                    ffn_dim: int = 3072, ffn: FFNKind = "mlp", activation: Activation = "gelu", norm: Norm = "pre",
                    norm_type: NormType = "layernorm", norm_eps: float = 1e-5, position: PositionName = "absolute",
                    max_positions: int = 2048, rope_base: float = 10000.0, xpos_scale_base: float = 512.0,
                    relative_buckets: int = 32, relative_max_distance: int = 128, dropout: float = 0.0,
                    attention_dropout: float = 0.0, activation_dropout: float = 0.0, drop_path: float = 0.0,
                    bias: bool = True, tie_embeddings: bool = True, share_encoder_decoder_embeddings: bool = True,
                    scale_embeddings: bool = False, embedding_norm: bool = False,
                    blockwise_causal_block: int | None = None, window: int | None = None,
                    momentum: float | None = None, checkpoint_activations: bool = False,
                    linear: Literal["standard", "bitlinear"] = "standard", attention_impl: AttentionImpl = "sdpa",
                    attention: AttentionKind = "dense", s2: S2Config | None = None,
                    segment_lengths: tuple[int, ...] = (), dilation_rates: tuple[int, ...] = (),
                    moe: MoEConfig | None = None) -> EncoderDecoderConfig:
    """A sequence-to-sequence Transformer (MT-like): an encoder of ``layers`` and a decoder of
    ``decoder_layers`` (default: as many) whose layers also attend to the encoder's output. The knobs are
    :func:`transformer`'s; DeepNorm and Sub-LN scale each side for both depths, as the papers do."""
    knobs = dict(locals(), multiway=1, multiway_scope="ffn")
    decoders = layers if decoder_layers is None else decoder_layers
    return EncoderDecoderConfig(encoder=_transformer_stack("encoder", "encoder_decoder", layers, decoders, knobs),
                                decoder=_transformer_stack("decoder", "encoder_decoder", layers, decoders, knobs),
                                share_embeddings=share_encoder_decoder_embeddings)


def _transformer_stack(side: str, arch: str, encoders: int, decoders: int, k: dict[str, Any]) -> ModelConfig:
    """One stack of :func:`transformer` or :func:`encoder_decoder` (``k``: their knobs)."""
    count = encoders if side == "encoder" else decoders
    scaling = residual_scaling(k["norm"], side, arch, encoders, decoders)
    residual = {"pre": PreNorm(), "post": PostNorm(), "deepnorm": DeepNorm(alpha=scaling.alpha, beta=scaling.gain),
                "subln": SubLN(gamma=scaling.gain)}[k["norm"]]
    decoder = side == "decoder"
    projections = dict(heads=k["heads"], kv_heads=k["kv_heads"], bias=k["bias"], impl=k["attention_impl"])
    if k["attention"] == "dilated":
        mixer: MixerConfig = DilatedAttention(segment_lengths=k["segment_lengths"], dilation_rates=k["dilation_rates"],
                                              **projections)
    elif k["attention"] == "diff2":  # V2: heads output heads of the usual width, twice as many query heads
        mixer = DiffAttentionV2(heads=k["heads"], kv_heads=k["kv_heads"], window=k["window"],
                                block=k["blockwise_causal_block"] if decoder else None, dropout=k["attention_dropout"],
                                bias=k["bias"], impl=k["attention_impl"])
    elif k["attention"] == "diff":  # half the heads, each of two components: a Transformer's parameters
        mixer = DiffAttention(heads=k["heads"] // 2, kv_heads=k["kv_heads"] // 2 if k["kv_heads"] else None,
                              window=k["window"], block=k["blockwise_causal_block"] if decoder else None,
                              dropout=k["attention_dropout"], bias=k["bias"], impl=k["attention_impl"])
    else:
        mixer = Attention(window=k["window"], block=k["blockwise_causal_block"] if decoder else None,
                          dropout=k["attention_dropout"], momentum=k["momentum"] if decoder else None, **projections)
    mixers = [mixer] * count
    if k["attention"] == "s2":  # S2 layers, and the dense ones of a hybrid stack
        s2 = k["s2"] or S2Config()
        sparse = S2Attention(**s2.pattern(), **projections)
        mixers = [mixer if s2.is_dense_layer(index) else sparse for index in range(count)]
    cross = Attention(dropout=k["attention_dropout"], **projections) if decoder and arch == "encoder_decoder" else None
    layers = tuple(LayerConfig(mixer=mixers[index], ffn=_ffn(k, index, k["bias"]), cross_attention=cross)
                   for index in range(count))
    return ModelConfig(
        vocab_size=k["vocab_size"], embed_dim=k["embed_dim"], causal=decoder,
        layers=linear_drop_path(layers, k["drop_path"]), position=_position(k), residual=residual,
        norm_type=k["norm_type"], norm_eps=k["norm_eps"], dropout=k["dropout"], tie_embeddings=k["tie_embeddings"],
        multiway=MultiwayConfig(ways=k["multiway"], scope=k["multiway_scope"]) if k["multiway"] > 1 else None,
        scale_embeddings=k["scale_embeddings"], embedding_norm=k["embedding_norm"],
        checkpoint_activations=k["checkpoint_activations"], linear=k["linear"])


def _position(k: dict[str, Any]) -> Position:
    return {"absolute": lambda: LearnedPosition(max_positions=k["max_positions"]),
            "sinusoidal": SinusoidalPosition, "rope": lambda: RoPE(base=k["rope_base"]),
            "xpos": lambda: XPos(base=k["rope_base"], scale_base=k["xpos_scale_base"]),
            "relative": lambda: T5Bias(buckets=k["relative_buckets"], max_distance=k["relative_max_distance"]),
            "none": NoPosition}[k["position"]]()


def _ffn(k: dict[str, Any], index: int, bias: bool) -> FFN:
    """Layer ``index``'s FFN: dense, or experts where ``k["moe"]`` puts them."""
    dense = (GLU if k["ffn"] == "glu" else MLP)(ffn_dim=k["ffn_dim"], activation=k["activation"], bias=bias,
                                                 activation_dropout=k["activation_dropout"])
    moe = k["moe"]
    if moe is None or not moe.is_moe_layer(index):
        return dense
    return MoE(expert=dense.replace(ffn_dim=moe.expert_ffn_dim or k["ffn_dim"]), routing=moe.routing())


# ----------------------------------------------------------------------------------------------------------
# Recurrent families: RetNet, YOCO, Lightning, the delta rule
# ----------------------------------------------------------------------------------------------------------

@knob_function
def retnet(*, vocab_size: int = 64000, embed_dim: int = 512, value_dim: int = 864, layers: int = 6, heads: int = 2,
           ffn_dim: int = 864, ffn: FFNKind = "glu", activation: Activation = "swish",
           norm: Literal["pre", "deepnorm"] = "pre", norm_type: NormType = "rmsnorm", norm_eps: float = 1e-6,
           decay: Literal["retnet", "paper", "gated"] = "retnet", decay_temperature: float = 16.0,
           rope_base: float = 10000.0, normalizer: Literal["smooth", "torchscale", "none"] = "smooth",
           chunk_size: int = 64, retention_backend: Literal["torch", "triton"] = "torch", dropout: float = 0.0,
           activation_dropout: float = 0.0, drop_path: float = 0.0, tie_embeddings: bool = True,
           scale_embeddings: bool = True, embedding_norm: bool = False, checkpoint_activations: bool = False,
           linear: Literal["standard", "bitlinear"] = "standard", moe: MoEConfig | None = None) -> ModelConfig:
    """RetNet (arXiv 2307.08621): multi-scale retention in every layer, SwiGLU, RMSNorm; defaults are
    TorchScale's ``retnet_base``. ``decay="gated"`` with ``normalizer="none"`` is gated retention (RetNet-3,
    YOCO's self-decoder); ``normalizer="torchscale"`` reproduces TorchScale's parallel form exactly."""
    scaling = residual_scaling(norm, "decoder", "decoder", layers, layers)
    mixer = Retention(heads=heads, value_dim=value_dim, decay=decay, normalizer=normalizer, chunk_size=chunk_size,
                      rope_base=rope_base, norm_eps=norm_eps, decay_temperature=decay_temperature,
                      backend=retention_backend)
    knobs = dict(ffn=ffn, ffn_dim=ffn_dim, activation=activation, activation_dropout=activation_dropout, moe=moe)
    blocks = tuple(LayerConfig(mixer=mixer, ffn=_ffn(knobs, index, False)) for index in range(layers))
    return ModelConfig(
        vocab_size=vocab_size, embed_dim=embed_dim, layers=linear_drop_path(blocks, drop_path), position=NoPosition(),
        residual=DeepNorm(alpha=scaling.alpha, beta=scaling.gain) if norm == "deepnorm" else PreNorm(),
        norm_type=norm_type, norm_eps=norm_eps, dropout=dropout, tie_embeddings=tie_embeddings,
        scale_embeddings=scale_embeddings, embedding_norm=embedding_norm,
        checkpoint_activations=checkpoint_activations, linear=linear)


@knob_function
def yoco(*, vocab_size: int = 64000, embed_dim: int = 768, layers: int = 12,
         self_decoder: Literal["gated_retention", "sliding_window", "gated_deltanet", "mamba2"] = "gated_retention",
         self_heads: int = 6, window: int = 1024, heads: int = 6, kv_heads: int = 2, ffn_dim: int = 2048,
         norm_eps: float = 1e-5, rope_base: float = 10000.0, decay_temperature: float = 16.0, chunk_size: int = 64,
         retention_backend: Literal["torch", "triton"] = "torch", state_dim: int = 64, dropout: float = 0.0,
         activation_dropout: float = 0.0, drop_path: float = 0.0, tie_embeddings: bool = True,
         scale_embeddings: bool = True, checkpoint_activations: bool = False,
         linear: Literal["standard", "bitlinear"] = "standard") -> ModelConfig:
    """YOCO (arXiv 2405.05254): ``layers // 2`` self-decoder layers (gated retention, sliding-window attention
    of ``window`` positions, Gated DeltaNet with heads of embed_dim / self_heads, or Mamba-2 with 2·self_heads
    heads of embed_dim / self_heads channels and ``state_dim`` per channel), then cross-decoder layers
    reading one shared key/value projection of ``kv_heads`` heads; LLaMA-like blocks (Pre-RMSNorm, SwiGLU, no
    biases), RoPE."""
    if self_decoder == "gated_retention":
        self_mixer: MixerConfig = Retention(heads=self_heads, value_dim=embed_dim, decay="gated", normalizer="none",
                                            decay_temperature=decay_temperature, chunk_size=chunk_size,
                                            rope_base=rope_base, norm_eps=norm_eps, backend=retention_backend)
    elif self_decoder == "gated_deltanet":
        width = embed_dim // self_heads
        self_mixer = GatedDeltaNet(heads=self_heads, key_dim=width, value_dim=width, chunk_size=chunk_size,
                                   norm_eps=norm_eps)
    elif self_decoder == "mamba2":
        self_mixer = Mamba2(state_dim=state_dim, head_dim=embed_dim // self_heads, chunk_size=chunk_size,
                            norm_eps=norm_eps)
    else:
        self_mixer = Attention(heads=self_heads, window=window, bias=False)
    ffn = GLU(ffn_dim=ffn_dim, activation="swish", bias=False, activation_dropout=activation_dropout)
    cross = CrossDecoderAttention(heads=heads, kv_heads=kv_heads)
    blocks = tuple(LayerConfig(mixer=self_mixer if index < layers // 2 else cross, ffn=ffn) for index in range(layers))
    return ModelConfig(
        vocab_size=vocab_size, embed_dim=embed_dim, layers=linear_drop_path(blocks, drop_path),
        position=RoPE(base=rope_base), residual=PreNorm(), norm_type="rmsnorm", norm_eps=norm_eps, dropout=dropout,
        tie_embeddings=tie_embeddings, scale_embeddings=scale_embeddings,
        checkpoint_activations=checkpoint_activations, linear=linear)


@knob_function
def lightning_lm(*, vocab_size: int = 512, embed_dim: int = 64, layers: int = 2, heads: int = 4, ffn_dim: int = 128,
                 chunk_size: int = 16) -> ModelConfig:
    """TransNormerLLM: Lightning attention (constant per-head decays, OpenNLPLab's formula) and SGLU (a GLU
    without activation), RMSNorm, no positions."""
    layer = LayerConfig(mixer=Lightning(heads=heads, chunk_size=chunk_size),
                        ffn=GLU(ffn_dim=ffn_dim, activation="none", bias=False))
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=NoPosition(), norm_type="rmsnorm",
                       layers=uniform(layer, layers))


@knob_function
def delta_rule_lm(*, gated: bool = True, vocab_size: int = 512, embed_dim: int = 64, layers: int = 2, heads: int = 4,
                  head_dim: int = 16, chunk_size: int = 64, backend: Literal["torch", "triton"] = "torch",
                  attention_every: int | None = None, attention_heads: int = 4, attention_kv_heads: int = 2,
                  rope_fraction: float = 1.0) -> ModelConfig:
    """The delta rule (fla's layer: short convolutions, L2-normalised q and k, sigmoid β; ``gated``: Gated
    DeltaNet's Mamba-2 decay and output gate), RMSNorm, SwiGLU of ~8/3 d. ``attention_every=k`` makes every
    k-th layer full attention with grouped keys and values, per-head q/k RMSNorm and an output gate, with RoPE
    (Qwen3-Next's hybrid at k = 4; ``rope_fraction=0.25`` is its partial RoPE); otherwise there are no positions.
    ``backend="triton"``: the chunkwise form as Triton kernels."""
    mixer = (GatedDeltaNet if gated else DeltaNet)(heads=heads, key_dim=head_dim, value_dim=head_dim,
                                                   chunk_size=chunk_size, backend=backend)
    model = ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=NoPosition(), norm_type="rmsnorm",
                        layers=uniform(LayerConfig(mixer=mixer, ffn=GLU(ffn_dim=8 * embed_dim // 3, bias=False)), layers))
    if attention_every is None:
        return model
    attention = Attention(heads=attention_heads, kv_heads=attention_kv_heads, bias=False, output_gate=True, qk_norm=True)
    return model.replace(position=RoPE(fraction=rope_fraction),
                         layers=every(attention_every, model.layers, lambda layer: layer.replace(mixer=attention)))


@knob_function
def mamba2_lm(*, vocab_size: int = 512, embed_dim: int = 64, layers: int = 4, state_dim: int = 16,
              head_dim: int = 16, expand: int = 2, groups: int = 1, chunk_size: int = 64,
              backend: Literal["torch", "triton"] = "torch") -> ModelConfig:
    """Mamba-2 (``mamba_ssm``'s MambaLMHeadModel): every block is the SSD mixer alone (no MLP), Pre-RMSNorm,
    no positions, tied embeddings. Twice a Transformer's layer count matches its parameters (mamba2-130m:
    768 wide, 24 layers)."""
    mixer = Mamba2(state_dim=state_dim, head_dim=head_dim, expand=expand, groups=groups, chunk_size=chunk_size,
                   backend=backend)
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=NoPosition(), norm_type="rmsnorm",
                       layers=uniform(LayerConfig(mixer=mixer, ffn=None), layers))


# ----------------------------------------------------------------------------------------------------------
# Hybrids: Mamba-2 with attention
# ----------------------------------------------------------------------------------------------------------

@knob_function
def samba(*, vocab_size: int = 512, embed_dim: int = 64, layers: int = 4, heads: int = 4, kv_heads: int | None = None,
          window: int = 2048, ffn_dim: int | None = None, state_dim: int = 16, head_dim: int = 16,
          chunk_size: int = 64, rope_base: float = 10000.0, backend: Literal["torch", "triton"] = "torch") -> ModelConfig:
    """Samba (arXiv 2406.07522, microsoft/Samba) **with Mamba-2 in place of its Mamba-1**: blocks alternate
    Mamba, SWA, Mamba, SWA, … (even layers Mamba-2, odd ones sliding-window attention seeing itself and the
    ``window`` − 1 tokens before, 2048 as published), every block followed by a SwiGLU MLP (``ffn_dim``, None =
    8/3·d as Samba's 6144 at 2304), Pre-RMSNorm, RoPE on the attention layers, no biases."""
    mamba = Mamba2(state_dim=state_dim, head_dim=head_dim, chunk_size=chunk_size, backend=backend)
    local = Attention(heads=heads, kv_heads=kv_heads, window=window, bias=False)
    mlp = GLU(ffn_dim=ffn_dim or 8 * embed_dim // 3, bias=False)
    blocks = tuple(LayerConfig(mixer=local if index % 2 else mamba, ffn=mlp) for index in range(layers))
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=RoPE(base=rope_base), norm_type="rmsnorm",
                       layers=blocks)


@knob_function
def jamba(*, vocab_size: int = 512, embed_dim: int = 64, layers: int = 8, attention_every: int = 8,
          attention_offset: int = 4, heads: int = 4, kv_heads: int | None = 2, ffn_dim: int | None = None,
          experts: int = 4, top_k: Literal[1, 2] = 2, moe_every: int = 2, state_dim: int = 16, head_dim: int = 16,
          chunk_size: int = 64, backend: Literal["torch", "triton"] = "torch") -> ModelConfig:
    """Jamba (arXiv 2403.19887) **with Mamba-2 in place of its Mamba-1**: layer i is grouped-query attention
    when i % ``attention_every`` == ``attention_offset`` (Jamba: 8 and 4, one attention layer to seven Mamba
    layers), Mamba-2 otherwise; every ``moe_every``-th layer's SwiGLU MLP (i % 2 == 1 as Jamba's expert
    period 2, offset 1) is a mixture of ``experts`` (Jamba: 16) with softmax top-``top_k`` routing, gates not
    renormalised and no token dropped (capacity = every token). Pre-RMSNorm, no positions (Mamba gives them),
    no biases."""
    if not 0 <= attention_offset < attention_every:
        raise ConfigError(f"attention_offset ({attention_offset}) must be in [0, attention_every = {attention_every})")
    mamba = Mamba2(state_dim=state_dim, head_dim=head_dim, chunk_size=chunk_size, backend=backend)
    attention = Attention(heads=heads, kv_heads=kv_heads, bias=False)
    mlp = GLU(ffn_dim=ffn_dim or 8 * embed_dim // 3, bias=False)
    # dropless: an expert may take every token (capacity = factor · k · tokens / experts = tokens)
    routing = RouterConfig(experts=experts, top_k=top_k, router="softmax", normalize_gates=False,
                           second_expert_policy="all", capacity_factor=experts / top_k)
    moe = MoE(expert=mlp, routing=routing)
    blocks = tuple(LayerConfig(mixer=attention if index % attention_every == attention_offset else mamba,
                               ffn=moe if index % moe_every == moe_every - 1 else mlp) for index in range(layers))
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=NoPosition(), norm_type="rmsnorm",
                       layers=blocks)


@knob_function
def s2_lm(*, vocab_size: int = 512, embed_dim: int = 64, layers: int = 2, heads: int = 4, ffn_dim: int = 128,
          vert_stride: int = 4) -> ModelConfig:
    """S2-Attention with Phi-3-small's pattern (block 64, 16 local blocks, heterogeneous heads, sparse and
    dense layers alternating, 4 query heads per key/value head), RoPE. The heads' shards cover every block
    only when heads >= ``vert_stride`` (Phi-3-small: 32 heads, stride 8)."""
    sparse = LayerConfig(mixer=S2Attention(heads=heads, kv_heads=heads // 4, block=64, local_blocks=16,
                                           vert_stride=vert_stride), ffn=MLP(ffn_dim=ffn_dim))
    return ModelConfig(vocab_size=vocab_size, embed_dim=embed_dim, position=RoPE(),
                       layers=every(2, uniform(sparse, layers),
                                    lambda layer: layer.replace(mixer=Attention(heads=heads, kv_heads=heads // 4))))


# ----------------------------------------------------------------------------------------------------------
# Reading the flat configs of earlier versions
# ----------------------------------------------------------------------------------------------------------

def _fields(cfg: ConfigBase, *leave_out: str) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in leave_out}


def model_config(cfg: ConfigBase, side: Literal["encoder", "decoder"] | None = None) -> ModelConfig | EncoderDecoderConfig:
    """The model config a config describes: a ModelConfig, or for an encoder-decoder its
    :class:`EncoderDecoderConfig` (one stack of it with ``side``). A flat config of an earlier version is read
    through its family function, whose knobs are its fields."""
    if isinstance(cfg, EncoderDecoderConfig):
        return getattr(cfg, side) if side else cfg
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, RetNetConfig):  # it kept decay_temperature with fixed decays too, which ignore it
        fields = _fields(cfg)
        return retnet.__wrapped__(**{**fields, "decay_temperature": fields["decay_temperature"]
                                     if cfg.decay == "gated" else 16.0})
    if isinstance(cfg, YOCOConfig):
        return yoco.__wrapped__(**{name: cfg.option(name) if name in cfg.UNSET else value
                                   for name, value in _fields(cfg).items()})
    if isinstance(cfg, TransformerConfig):
        if cfg.arch == "encoder_decoder":
            pair = encoder_decoder.__wrapped__(**_fields(cfg, "arch", "multiway", "multiway_scope"))
            return getattr(pair, side) if side else pair
        return transformer.__wrapped__(causal=cfg.arch == "decoder",
                                       **_fields(cfg, "arch", "decoder_layers", "share_encoder_decoder_embeddings"))
    raise TypeError(f"no ModelConfig for {type(cfg).__name__}")


def with_options(config: ConfigBase, options: dict[str, Any]) -> ConfigBase:
    """``config`` with KEY=VALUE options applied, read like a config file: a top-level key replaces that
    field (nested ones take JSON objects, e.g. ``position={"kind": "rope", "base": 500000}``), a dotted path
    reaches inside (``position.base=500000``, ``layers[*].mixer.window=64``, ``layers[1::2].ffn={...}``). A
    flat config of an earlier version is first read as the model config it builds."""
    if not options:
        return config
    if not isinstance(config, (ModelConfig, EncoderDecoderConfig)):  # its own fields first, as it reads them
        fields = config.to_dict()
        own = {key: value for key, value in options.items() if key in fields}
        config = model_config(type(config).from_dict({**fields, **own}) if own else config)
        options = {key: value for key, value in options.items() if key not in own}
    return type(config).from_dict(apply_overrides(config.to_dict(), options))


def arch_of(cfg: ConfigBase) -> Literal["encoder", "decoder", "encoder_decoder"]:
    """Which kind of language model a config describes: a bidirectional "encoder", a causal "decoder" or an
    "encoder_decoder"."""
    made = model_config(cfg)
    if isinstance(made, EncoderDecoderConfig):
        return "encoder_decoder"
    return "decoder" if made.causal else "encoder"


def mixer_summary(cfg: ConfigBase) -> tuple[str, str]:
    """(mixers, depth) of a config, for people: "retention(gated)×2+cross_decoder×2", "4"; an
    encoder-decoder's two stacks as "attention+attention", "6+6"."""
    made = model_config(cfg)
    stacks = (made.encoder, made.decoder) if isinstance(made, EncoderDecoderConfig) else (made,)
    kinds = [layer.mixer.kind + ("(gated)" if getattr(layer.mixer, "decay", None) == "gated" else "")
             for stack in stacks for layer in stack.layers]
    return ("+".join(f"{kind}×{kinds.count(kind)}" for kind in dict.fromkeys(kinds)),
            "+".join(str(len(stack.layers)) for stack in stacks))
