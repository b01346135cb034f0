"""A model as data: typed component configs that build their own modules, and a model config holding a
tuple of layer configs.

    ModelConfig(vocab_size=32000, embed_dim=512, position=RoPE(),
                layers=every(2, uniform(LayerConfig(mixer=Attention(heads=8), ffn=GLU(ffn_dim=1376)), 12),
                             lambda layer: layer.replace(ffn=MoE(expert=GLU(ffn_dim=1376)))))

Each component is one member of a tagged union and serialises with its ``kind``; an option that cannot
apply to a kind is not a field of it (a dilated attention has no window, a retention layer no heads of
keys and values). Every preset is a function returning one (:mod:`scaleformer.models.families`), and every
model is built from one.

Shapes: C model width.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable, ClassVar, Literal

from torch import nn

from scaleformer.config import ConfigBase, ConfigError, RouterConfig, S2Pattern, config
from scaleformer.mixer import MixerConfig, MixerSupport
from scaleformer.layers.attention import (DilatedSelfAttention, GatedSoftmaxAttention, MomentumAttention, Projections,
                                          S2SelfAttention, SoftmaxAttention)
from scaleformer.layers.bitlinear import to_bitlinear
from scaleformer.layers.block import Block
from scaleformer.layers.cross_decoder import GlobalKeyValue, GlobalKVAttention
from scaleformer.layers.diff_attention import DifferentialAttention, DifferentialAttentionV2, lambda_init_for_depth
from scaleformer.layers.lightning import Lightning
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.layers.multiway import per_way
from scaleformer.layers.norms import make_norm
from scaleformer.layers.retention import Retention
from scaleformer.layers.scaling import residual_scaling
from scaleformer.ops.dilated import check_patterns
from scaleformer.ops.s2 import S2Layout

__all__ = ["ModelConfig", "LayerConfig", "Attention", "DilatedAttention", "Retention", "DiffAttention", "DiffAttentionV2",
           "CrossDecoderAttention", "Lightning", "S2Attention", "MLP", "GLU", "MoE",
           "LearnedPosition", "SinusoidalPosition", "RoPE", "XPos", "T5Bias", "NoPosition", "PreNorm", "PostNorm",
           "DeepNorm", "SubLN", "MultiwayConfig", "EncoderDecoderConfig", "uniform", "every", "linear_drop_path"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------------------
# Positions (one per model)
# ----------------------------------------------------------------------------------------------------------

@config
class LearnedPosition(ConfigBase):
    """A learned table of absolute positions, added to the token embeddings."""

    kind: ClassVar[str] = "absolute"
    #: rows of the table: the longest input
    max_positions: int = 2048


@config
class SinusoidalPosition(ConfigBase):
    """Fixed sinusoids added to the token embeddings."""

    kind: ClassVar[str] = "sinusoidal"


@config
class RoPE(ConfigBase):
    """Rotary positions on attention's queries and keys: θ_i = base^(-2i/D). ``fraction`` < 1: partial RoPE
    (Qwen3-Next: 0.25), only the first fraction·D channels of each head turn, with θ_i = base^(-2i/(fraction·D))."""

    kind: ClassVar[str] = "rope"
    base: float = 10000.0
    fraction: float = 1.0

    def _validate(self) -> None:
        _require(0 < self.fraction <= 1, f"fraction must be in (0, 1], got {self.fraction}")


@config
class XPos(ConfigBase):
    """RoPE with LeX's decay: queries scaled by ζ^(n/B), keys by ζ^(-m/B), B = ``scale_base``."""

    kind: ClassVar[str] = "xpos"
    base: float = 10000.0
    scale_base: float = 512.0


@config
class T5Bias(ConfigBase):
    """T5's learned relative bias per (bucket, head), shared by every attention layer."""

    kind: ClassVar[str] = "relative"
    #: buckets of key - query distance (half exact, half logarithmic up to max_distance)
    buckets: int = 32
    max_distance: int = 128


@config
class NoPosition(ConfigBase):
    """No position information (causal attention still tells a token apart from its past)."""

    kind: ClassVar[str] = "none"


Position = LearnedPosition | SinusoidalPosition | RoPE | XPos | T5Bias | NoPosition


# ----------------------------------------------------------------------------------------------------------
# Residual schemes (one per model): how a sublayer f is wired, and the init gain of its value/output weights
# ----------------------------------------------------------------------------------------------------------

@config
class PreNorm(ConfigBase):
    """x + f(N(x)), and a final norm."""

    kind: ClassVar[str] = "pre"


@config
class PostNorm(ConfigBase):
    """N(x + f(x))."""

    kind: ClassVar[str] = "post"


@config
class DeepNorm(ConfigBase):
    """N(α·x + f(x)), f's value/output and FFN weights initialised ×β (DeepNet); :meth:`for_depth` gives the
    paper's constants."""

    kind: ClassVar[str] = "deepnorm"
    alpha: float = 1.0
    beta: float = 1.0

    @classmethod
    def for_depth(cls, layers: int) -> "DeepNorm":
        """α = (2N)^(1/4), β = (8N)^(-1/4) for a stack of N layers (decoder-only or encoder-only)."""
        scaling = residual_scaling("deepnorm", "decoder", "decoder", layers, layers)
        return cls(alpha=scaling.alpha, beta=scaling.gain)


@config
class SubLN(ConfigBase):
    """x + f(N(x)) with a second norm inside f (Magneto); value/output and FFN weights initialised ×γ."""

    kind: ClassVar[str] = "subln"
    gamma: float = 1.0

    @classmethod
    def for_depth(cls, layers: int) -> "SubLN":
        """γ = sqrt(log 2N) for a stack of N layers."""
        return cls(gamma=residual_scaling("subln", "decoder", "decoder", layers, layers).gain)


Residual = PreNorm | PostNorm | DeepNorm | SubLN


def _gains(residual: Residual) -> tuple[float, float]:
    """(gain of the self-mixer and FFN, gain of cross-attention): DeepNorm scales both; Sub-LN only self."""
    if isinstance(residual, DeepNorm):
        return residual.beta, residual.beta
    return (residual.gamma, 1.0) if isinstance(residual, SubLN) else (1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Mixers (one per layer)
# ----------------------------------------------------------------------------------------------------------

class SoftmaxHeads(MixerConfig):
    """What the softmax-attention mixers share: ``heads`` query heads of width embed_dim / heads, each
    rotated by the model's RoPE/xPos (each subclass has a ``heads`` field)."""

    def rotated_heads(self) -> int | None:
        return self.heads

    def check_model(self, model: "ModelConfig") -> None:
        _check_attention_width(model, self.heads)


@config
class Attention(SoftmaxHeads):
    """Softmax attention: dense, grouped-query (``kv_heads``), sliding-window (``window``) or LeX
    blockwise-causal (``block``)."""

    kind: ClassVar[str] = "attention"
    heads: int = 12
    #: key/value heads (divides heads); None = heads
    kv_heads: int | None = None
    #: a query sees its own and the window-1 previous positions (either side when bidirectional)
    window: int | None = None
    #: causal only: a query sees its block of this many positions and the one before
    block: int | None = None
    #: dropout on the attention probabilities
    dropout: float = 0.0
    bias: bool = True
    #: "sdpa" (fused kernels) or "reference" (pure PyTorch)
    impl: Literal["sdpa", "reference"] = "sdpa"
    #: momentum attention: add Σ_{i<t} η^{t−i} v_i to token t's output, η = this value in (0, 1) (causal only)
    momentum: float | None = None
    #: an elementwise output gate, W_O (attention ⊙ sigmoid(W_G x)) (Qwen3-Next's full-attention layers)
    output_gate: bool = False
    #: an RMSNorm over each head's queries and keys before the rotation (Qwen3, OLMo 2; the model's norm_eps)
    qk_norm: bool = False
    #: attention sinks (gpt-oss): a learned logit per query head in every softmax's denominator
    sinks: bool = False

    def _validate(self) -> None:
        _check_heads(self.heads, self.kv_heads)
        _check_softmax_options(self.window, self.block, self.dropout)
        _require(self.momentum is None or 0 < self.momentum < 1, f"momentum (η) must be in (0, 1), got {self.momentum}")
        _require(self.momentum is None or not self.output_gate, "momentum attention has no output gate: pick one")

    @property
    def support(self) -> MixerSupport:
        # momentum sums the earlier tokens' values; a block sees its own and the previous block: both causal
        return MixerSupport(bidirectional=self.momentum is None and self.block is None)

    @property
    def title(self) -> str:
        return ("momentum attention" if self.momentum is not None else "blockwise attention (block)"
                if self.block is not None else "attention")

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"dense": (cls(heads=2),) * 2, "gqa-window": (cls(heads=4, kv_heads=2, window=3),) * 2,
                "blockwise": (cls(heads=2, block=3),) * 2, "momentum": (cls(heads=2, momentum=0.6),) * 2,
                "output-gate-qk-norm": (cls(heads=4, kv_heads=2, output_gate=True, qk_norm=True),) * 2,
                "sinks": (cls(heads=2, sinks=True),) * 2,
                "gate-sinks-gqa-window": (cls(heads=4, kv_heads=2, window=3, sinks=True, output_gate=True),) * 2}

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> SoftmaxAttention:
        projections = _projections(model, self.heads, self.kv_heads, self.bias, ways, gain, inner_norm)
        if self.qk_norm:
            projections = dataclasses.replace(projections, qk_norm_eps=model.norm_eps)
        visibility = dict(window=self.window, block=self.block, dropout=self.dropout, impl=self.impl, sinks=self.sinks)
        if self.momentum is not None:
            return MomentumAttention(projections, momentum=self.momentum, **visibility)
        return (GatedSoftmaxAttention if self.output_gate else SoftmaxAttention)(projections, **visibility)


@config
class DilatedAttention(SoftmaxHeads):
    """LongNet's dilated attention: patterns (segment length w_i, dilation rate r_i), merged by softmax mass."""

    kind: ClassVar[str] = "dilated"
    TITLE: ClassVar[str] = "dilated attention"
    heads: int = 12
    kv_heads: int | None = None
    segment_lengths: tuple[int, ...] = (2048,)
    dilation_rates: tuple[int, ...] = (1,)
    bias: bool = True
    #: "sdpa" (fused kernels), "reference" (pure PyTorch) or "triton" (the block-sparse Triton kernel of
    #: scaleformer.ops.block_sparse_triton for whole sequences; CUDA, or the CPU under TRITON_INTERPRET=1)
    impl: Literal["sdpa", "reference", "triton"] = "sdpa"
    #: which offset each head keeps in a pattern of rate r: "modulo" (h mod r) or "grouped" (⌊h / ⌈H/r⌉⌋,
    #: TorchScale's LongNet, whose checkpoints need it)
    head_offsets: Literal["modulo", "grouped"] = "modulo"

    def _validate(self) -> None:
        _check_heads(self.heads, self.kv_heads)
        try:
            check_patterns(self.segment_lengths, self.dilation_rates)
        except ValueError as error:
            raise ConfigError(f"segment_lengths/dilation_rates: {error}") from None

    @property
    def support(self) -> MixerSupport:
        return MixerSupport(relative_bias=False)

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"dilated": (cls(heads=2, segment_lengths=(2, 4), dilation_rates=(1, 2)),) * 2}

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> DilatedSelfAttention:
        return DilatedSelfAttention(_projections(model, self.heads, self.kv_heads, self.bias, ways, gain, inner_norm),
                                    segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                                    head_offsets=self.head_offsets, impl=self.impl)


@config
class DiffAttention(MixerConfig):
    """DIFF Transformer's differential attention: (softmax(Q₁K₁ᵀ) − λ softmax(Q₂K₂ᵀ)) V per head, then a
    per-head RMSNorm and × (1 − λ_init). ``heads`` counts differential heads, each of two components:
    half a Transformer's heads give its parameter count."""

    kind: ClassVar[str] = "diff_attention"
    TITLE: ClassVar[str] = "differential attention"
    heads: int = 6
    #: key/value heads (divides heads); None = heads
    kv_heads: int | None = None
    #: λ_init; None = the paper's schedule by depth, 0.8 − 0.6·exp(−0.3·(depth − 1))
    lambda_init: float | None = None
    window: int | None = None
    block: int | None = None
    dropout: float = 0.0
    bias: bool = True
    #: epsilon of the per-head RMSNorm (the paper's code: 1e-5)
    norm_eps: float = 1e-5
    #: "sdpa" (two fused attention calls) or "reference" (both maps written out)
    impl: Literal["sdpa", "reference"] = "sdpa"

    def _validate(self) -> None:
        _check_heads(self.heads, self.kv_heads)
        _check_softmax_options(self.window, self.block, self.dropout)
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def support(self) -> MixerSupport:
        # Its own per-head norm sits where Sub-LN's inner norm would (the paper's design): Sub-LN would add
        # nothing to this layer, so it is refused rather than half-applied. No per-modality copies, no T5 bias.
        return MixerSupport(bidirectional=self.block is None, inner_norm=False, multiway=False, relative_bias=False)

    def rotated_heads(self) -> int | None:
        return 2 * self.heads

    def check_model(self, model: "ModelConfig") -> None:
        _require(model.embed_dim % (2 * self.heads) == 0,
                 f"2 × heads ({2 * self.heads}) must divide embed_dim ({model.embed_dim}): each differential "
                 "head has two query/key components")
        _require(not isinstance(model.position, (RoPE, XPos)) or (model.embed_dim // (2 * self.heads)) % 2 == 0,
                 f"{model.position.kind} rotates pairs of channels: embed_dim / (2 × heads) must be even")

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"diff": (cls(heads=2),) * 2, "diff-gqa-window": (cls(heads=2, kv_heads=1, window=3),) * 2}

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> DifferentialAttention:
        # Sub-LN and multiway copies are refused by the model's check (see support). Each differential head
        # is two heads of the projections: the shapes of an attention layer with 2·heads heads.
        projections = Projections(embed_dim=model.embed_dim, heads=2 * self.heads,
                                  kv_heads=2 * (self.kv_heads or self.heads), bias=self.bias, gain=gain)
        lambda_init = lambda_init_for_depth(depth) if self.lambda_init is None else self.lambda_init
        return DifferentialAttention(projections, lambda_init=lambda_init, window=self.window, block=self.block,
                                     dropout=self.dropout, impl=self.impl, norm_eps=self.norm_eps)


@config
class DiffAttentionV2(SoftmaxHeads):
    """DIFF Transformer V2 (microsoft/unilm, Jan 2026): 2·heads query heads in one attention call, output head
    i = a_{2i} − sigmoid(λ_{t,i}) a_{2i+1} with λ_t = W_λ x_t per token and head, no per-head norm. ``heads``
    counts output heads of the usual width embed_dim / heads; the query projection is twice a
    Transformer's. Pairs are adjacent heads of one key/value group (see DifferentialAttentionV2)."""

    kind: ClassVar[str] = "diff_attention_v2"
    TITLE: ClassVar[str] = "differential attention V2"
    heads: int = 12
    #: key/value heads (divides heads); None = heads
    kv_heads: int | None = None
    window: int | None = None
    block: int | None = None
    dropout: float = 0.0
    #: bias on q/k/v/out (the published layer has none)
    bias: bool = False
    impl: Literal["sdpa", "reference"] = "sdpa"

    def _validate(self) -> None:
        _check_heads(self.heads, self.kv_heads)
        _check_softmax_options(self.window, self.block, self.dropout)

    @property
    def support(self) -> MixerSupport:
        # One projection set (no per-modality copies); T5's bias has one row per model head, not 2·heads.
        return MixerSupport(bidirectional=self.block is None, multiway=False, relative_bias=False)

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"diff-v2": (cls(heads=2),) * 2, "diff-v2-gqa-window": (cls(heads=4, kv_heads=2, window=3),) * 2}

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> DifferentialAttentionV2:
        return DifferentialAttentionV2(_projections(model, self.heads, self.kv_heads, self.bias, ways, gain, inner_norm),
                                       window=self.window, block=self.block, dropout=self.dropout, impl=self.impl)


@config
class CrossDecoderAttention(SoftmaxHeads):
    """YOCO's cross-decoder attention: queries of this layer, keys and values of the model's one global
    projection (made once, where the cross-decoder begins, from the hidden states there). The layers with
    this mixer form the end of the stack and share that one projection and its cache."""

    kind: ClassVar[str] = "cross_decoder"
    TITLE: ClassVar[str] = "the cross-decoder"
    heads: int = 12
    #: key/value heads of the shared projection (divides heads; grouped-query attention)
    kv_heads: int | None = None
    bias: bool = False
    impl: Literal["sdpa", "reference"] = "sdpa"

    def _validate(self) -> None:
        _check_heads(self.heads, self.kv_heads)

    @property
    def support(self) -> MixerSupport:
        return MixerSupport(bidirectional=False, inner_norm=False, multiway=False, relative_bias=False)

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        self_decoder = Retention(heads=2, value_dim=24, chunk_size=3, decay="gated", normalizer="none")
        return {"yoco": (self_decoder, self_decoder, cls(heads=2, kv_heads=1), cls(heads=2, kv_heads=1)),
                "yoco-window": (Attention(heads=2, window=3), cls(heads=2), cls(heads=2))}

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> GlobalKVAttention:
        return GlobalKVAttention(model.embed_dim, self.heads, bias=self.bias, gain=gain, impl=self.impl)

    def build_stage(self, model: "ModelConfig") -> tuple[str, GlobalKeyValue]:
        """The one key/value projection every cross-decoder layer reads."""
        return "global_kv", GlobalKeyValue(model.embed_dim, self.heads, self.kv_heads or self.heads,
                                           norm=model.norm_factory(), bias=self.bias)


@config
class S2Attention(SoftmaxHeads, S2Pattern):
    """S2-Attention (arXiv 2407.17678): each head reads a local window of ``local_blocks`` blocks of ``block``
    positions and a strided shard (every ``vert_stride``-th block, shifted per head unless ``homo_head``);
    the first ``dense_heads`` heads read everything. See :mod:`scaleformer.ops.s2`."""

    kind: ClassVar[str] = "s2"
    TITLE: ClassVar[str] = "S2-Attention"
    # the layout options (block, local_blocks, vert_stride, homo_head, dense_heads, head_offset): S2Pattern's
    heads: int = 12
    kv_heads: int | None = None
    bias: bool = True
    #: "sdpa", "reference" or "triton", as for DilatedAttention
    impl: Literal["sdpa", "reference", "triton"] = "sdpa"

    def _validate(self) -> None:
        S2Pattern._validate(self)
        _check_heads(self.heads, self.kv_heads)
        _require(self.dense_heads <= self.heads, f"dense_heads must be in [0, heads], got {self.dense_heads}")
        try:  # the layout checks its own numbers
            self.layout()
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def support(self) -> MixerSupport:
        return MixerSupport(relative_bias=False)

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"s2": (cls(heads=4, kv_heads=2, block=2, local_blocks=2, vert_stride=2),) * 2,
                "s2-dense-head": (cls(heads=2, block=2, local_blocks=1, vert_stride=2, dense_heads=1),) * 2}

    def layout(self) -> S2Layout:
        return S2Layout(**self.pattern())

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> S2SelfAttention:
        return S2SelfAttention(_projections(model, self.heads, self.kv_heads, self.bias, ways, gain, inner_norm),
                               layout=self.layout(), impl=self.impl)


#: a layer's mixer: any registered MixerConfig (an open union; ``MixerConfig.members()`` lists them)
Mixer = MixerConfig


def rotated_heads(mixer: MixerConfig) -> int | None:
    """How many heads a mixer rotates with the model's RoPE/xPos (their width is embed_dim / this), or None."""
    return mixer.rotated_heads()


def _projections(model: "ModelConfig", heads: int, kv_heads: int | None, bias: bool, ways: int, gain: float,
                 inner_norm: bool) -> Projections:
    """An attention layer's projections in ``model``: Sub-LN's inner norm in the model's norm when asked."""
    return Projections(embed_dim=model.embed_dim, heads=heads, kv_heads=kv_heads, bias=bias, ways=ways, gain=gain,
                       inner_norm=model.norm_factory() if inner_norm else None)


def _check_attention_width(model: "ModelConfig", heads: int) -> None:
    _require(model.embed_dim % heads == 0, f"heads ({heads}) must divide embed_dim ({model.embed_dim})")
    if isinstance(model.position, (RoPE, XPos)):
        _require((model.embed_dim // heads) % 2 == 0,
                 f"{model.position.kind} rotates pairs of channels: embed_dim/heads must be even")


def _check_softmax_options(window: int | None, block: int | None, dropout: float) -> None:
    """What Attention and DiffAttention share: a window or a block (not both), and attention dropout."""
    _require(window is None or window >= 1, f"window must be >= 1 or None, got {window}")
    _require(block is None or block >= 1, f"block must be >= 1 or None, got {block}")
    _require(window is None or block is None, "window and block are two different sparsities; pick one")
    _require(0 <= dropout < 1, f"dropout must be in [0, 1), got {dropout}")


def _check_heads(heads: int, kv_heads: int | None) -> None:
    _require(heads >= 1, f"heads must be >= 1, got {heads}")
    _require(kv_heads is None or (kv_heads >= 1 and heads % kv_heads == 0),
             f"kv_heads ({kv_heads}) must be >= 1 and divide heads ({heads})")


# ----------------------------------------------------------------------------------------------------------
# Feed-forward networks (one per layer)
# ----------------------------------------------------------------------------------------------------------

@config
class MLP(ConfigBase):
    """W2 act(W1 x)."""

    kind: ClassVar[str] = "mlp"
    ffn_dim: int = 3072
    activation: Literal["gelu", "relu", "swish"] = "gelu"
    bias: bool = True
    #: dropout after the activation
    activation_dropout: float = 0.0

    def _validate(self) -> None:
        _require(self.ffn_dim >= 1, f"ffn_dim must be >= 1, got {self.ffn_dim}")
        _require(0 <= self.activation_dropout < 1, f"activation_dropout must be in [0, 1), got {self.activation_dropout}")

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1) -> nn.Module:
        return per_way(lambda: FeedForward(
            model.embed_dim, self.ffn_dim, kind=self.kind, activation=self.activation, bias=self.bias,
            activation_dropout=self.activation_dropout,
            inner_norm=model.norm_factory(self.ffn_dim)() if inner_norm else None, gain=gain), ways)


@config
class GLU(MLP):
    """W2 (act(W1 x) ⊙ W3 x); with "swish", SwiGLU; with "none", TransNormerLLM's SGLU, W2 (W1 x ⊙ W3 x)."""

    kind: ClassVar[str] = "glu"
    activation: Literal["gelu", "relu", "swish", "none"] = "swish"


@config
class MoE(ConfigBase):
    """A sparse FFN: each token goes to its top-k of ``routing.experts`` copies of ``expert``."""

    kind: ClassVar[str] = "moe"
    expert: MLP | GLU = MLP()
    routing: RouterConfig = RouterConfig()

    def build(self, model: "ModelConfig", *, gain: float, inner_norm: bool = False, ways: int = 1) -> MoEFeedForward:
        _require(ways == 1, "MoE and Multiway both replace the FFN; they cannot be combined")
        return MoEFeedForward(self.routing, model.embed_dim, self.expert.ffn_dim, kind=self.expert.kind,
                              activation=self.expert.activation, bias=self.expert.bias,
                              activation_dropout=self.expert.activation_dropout,
                              inner_norm=model.norm_type if inner_norm else None, norm_eps=model.norm_eps, gain=gain,
                              bitlinear=model.linear == "bitlinear")


FFN = MLP | GLU | MoE


# ----------------------------------------------------------------------------------------------------------
# Layers and the model
# ----------------------------------------------------------------------------------------------------------

@config
class LayerConfig(ConfigBase):
    """One Block: a mixer, an FFN, and (in the decoder of an encoder-decoder) cross-attention."""

    mixer: Mixer = Attention()
    #: None: no FFN sublayer (a Mamba-2 block is the mixer alone)
    ffn: FFN | None = MLP()
    #: attention to the encoder's output, between the mixer and the FFN
    cross_attention: Attention | None = None
    #: stochastic depth of this layer (the probability of skipping its sublayers in training)
    drop_path: float = 0.0

    def _validate(self) -> None:
        _require(0 <= self.drop_path < 1, f"drop_path must be in [0, 1), got {self.drop_path}")


@config
class MultiwayConfig(ConfigBase):
    """Modality-specific copies (BEiT-3): tokens at positions < multiway_split use copy 0, the rest copy 1."""

    ways: int = 2
    #: "ffn": the FFN and block norms (the paper); "all": also attention projections and the stack norms
    scope: Literal["ffn", "all"] = "ffn"


@config
class ModelConfig(ConfigBase):
    """A language model (or one stack of an encoder-decoder) as data."""

    family: ClassVar[str] = "model"

    vocab_size: int = 64000
    embed_dim: int = 768
    #: True: a causal decoder (GPT-like); False: a bidirectional encoder (BERT-like)
    causal: bool = True
    layers: tuple[LayerConfig, ...] = ()
    position: Position = LearnedPosition()
    residual: Residual = PreNorm()
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    multiway: MultiwayConfig | None = None
    #: dropout on embeddings and on every sublayer's output
    dropout: float = 0.0
    tie_embeddings: bool = True
    #: multiply token embeddings by sqrt(embed_dim)
    scale_embeddings: bool = False
    #: a norm right after the embeddings
    embedding_norm: bool = False
    #: Pre-LN and Sub-LN stacks end with a norm; False leaves it out (LongViT's encoder, whose head norms)
    final_norm: bool = True
    #: recompute each block in the backward pass instead of storing its activations
    checkpoint_activations: bool = False
    #: the blocks' linear layers: "standard", or BitNet b1.58's "bitlinear" (ternary weights, 8-bit
    #: activations, straight-through gradients); embeddings, the output head and routers stay full precision
    linear: Literal["standard", "bitlinear"] = "standard"

    @property
    def ways(self) -> int:
        return 1 if self.multiway is None else self.multiway.ways

    @property
    def cross_attention(self) -> bool:
        """Some layer reads an encoder's output: the decoder side of an encoder-decoder."""
        return any(layer.cross_attention is not None for layer in self.layers)

    @property
    def cross_decoder_start(self) -> int | None:
        """Index of the first cross-decoder layer (YOCO), where the shared keys and values are made; None
        without a cross-decoder."""
        return next((i for i, layer in enumerate(self.layers) if isinstance(layer.mixer, CrossDecoderAttention)), None)

    @property
    def relative_bias_heads(self) -> set[int]:
        """The head counts of the layers a T5 relative bias reaches (one table serves them: one count)."""
        return {layer.mixer.rotated_heads() for layer in self.layers
                if layer.mixer.support.model_positions and layer.mixer.support.relative_bias} - {None}

    @property
    def moe(self) -> bool:
        """Some layer has a mixture-of-experts FFN (its aux loss is collected)."""
        return any(isinstance(layer.ffn, MoE) for layer in self.layers)

    def norm_factory(self, dim: int | None = None) -> Callable[[], nn.Module]:
        return lambda: make_norm(self.norm_type, self.embed_dim if dim is None else dim, self.norm_eps)

    def _validate(self) -> None:
        _require(self.vocab_size >= 1 and self.embed_dim >= 1, "vocab_size and embed_dim must be >= 1")
        _require(len(self.layers) >= 1, "layers is empty: give at least one LayerConfig (see uniform())")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        for index, layer in enumerate(self.layers):
            try:
                self._check_layer(layer)
            except ConfigError as error:
                raise ConfigError(error.message, f"layers[{index}]") from None
        self._check_cross_decoder()
        rotated = {layer.mixer.rotated_heads() for layer in self.layers} - {None}
        if isinstance(self.position, T5Bias):
            heads = self.relative_bias_heads
            _require(len(heads) == 1, "a T5 relative bias is one table for every attention layer: they need one "
                     f"number of heads, and there must be some (found {sorted(heads) or 'no attention layers'})")
        if isinstance(self.position, (RoPE, XPos)):
            _require(len(rotated) <= 1, f"rotary positions are computed once for every attention layer: they need one "
                     f"head width (found {sorted(rotated)} heads; a differential head counts twice)")
            _require(bool(rotated), f"no layer reads {self.position.kind} positions (its mixers carry their own): "
                     "use position=NoPosition()")
        if isinstance(self.position, RoPE) and self.position.fraction != 1:
            turning = self.position.fraction * (self.embed_dim // next(iter(rotated)))
            _require(turning == int(turning) and int(turning) % 2 == 0 and turning > 0,
                     f"partial RoPE turns fraction × head width = {turning:g} channels: it must be an even count")

    def _check_cross_decoder(self) -> None:
        start = self.cross_decoder_start
        if start is None:
            return
        mixers = [layer.mixer for layer in self.layers[start:]]
        _require(all(isinstance(m, CrossDecoderAttention) for m in mixers),
                 f"cross-decoder layers (from layers[{start}]) must end the stack: they all read the keys and values "
                 "projected once where it begins")
        _require(len(set(mixers)) == 1, "cross-decoder layers share one key/value projection: give them one "
                 "CrossDecoderAttention config (same heads, kv_heads, bias, impl)")
        _require(self.causal, "the cross-decoder attends causally: it needs causal=True")
        _require(not isinstance(self.position, T5Bias), "the cross-decoder does not support a T5 relative bias")
        _require(self.multiway is None, "the cross-decoder has no per-modality copies (multiway)")
        _require(not self.cross_attention, "a cross-decoder reads its own stack's keys, not an encoder's")

    def _check_layer(self, layer: LayerConfig) -> None:
        """The layer's mixer against what it declares it supports (:class:`MixerSupport`), then what the
        mixer needs of the model; the cross-attention and FFN rules."""
        mixer, support = layer.mixer, layer.mixer.support
        _require(self.causal or support.bidirectional, f"{mixer.title} is causal only: it needs causal=True")
        _require(support.inner_norm or not isinstance(self.residual, SubLN),
                 f"{mixer.title} has no inner norm for Sub-LN: use another residual scheme")
        _require(support.multiway or self.multiway is None or self.multiway.scope != "all",
                 f"{mixer.title} has no per-modality copies: use multiway scope 'ffn'")
        _require(not isinstance(self.position, T5Bias) or not support.model_positions or support.relative_bias,
                 f"{mixer.title} does not support a T5 relative bias")
        mixer.check_model(self)
        if layer.cross_attention is not None:
            _require(self.causal, "cross-attention belongs to a causal decoder")
            _check_attention_width(self, layer.cross_attention.heads)
        _require(not (isinstance(layer.ffn, MoE) and self.multiway is not None),
                 "MoE and Multiway both replace the FFN; they cannot be combined")

    def build_layers(self) -> list[Block]:
        """Every layer's Block, in order."""
        gain, cross_gain = _gains(self.residual)
        subln = isinstance(self.residual, SubLN)
        alpha = self.residual.alpha if isinstance(self.residual, DeepNorm) else 1.0
        attention_ways = self.ways if self.multiway is not None and self.multiway.scope == "all" else 1
        blocks = [Block(layer.mixer.build(self, gain=gain, inner_norm=subln, ways=attention_ways, depth=index + 1),
                      layer.ffn.build(self, gain=gain, inner_norm=subln, ways=self.ways) if layer.ffn is not None
                      else None,
                      norm=self.norm_factory(), scheme=self.residual.kind, alpha=alpha, ways=self.ways,
                      cross_attn=(layer.cross_attention.build(self, gain=cross_gain)
                                  if layer.cross_attention is not None else None),
                      dropout=self.dropout, drop_path=layer.drop_path)
                  for index, layer in enumerate(self.layers)]
        if self.linear == "bitlinear":  # routers and gated-retention decays choose, they do not project: kept
            blocks = [to_bitlinear(block, skip=frozenset({"router", "decay_proj"})) for block in blocks]
        return blocks


def uniform(layer: LayerConfig, count: int) -> tuple[LayerConfig, ...]:
    """``count`` copies of ``layer``."""
    return (layer,) * count


def every(k: int, layers: tuple[LayerConfig, ...], change: Callable[[LayerConfig], LayerConfig]) -> tuple[LayerConfig, ...]:
    """``layers`` with every k-th one (indices k-1, 2k-1, ...) replaced by ``change(layer)``."""
    return tuple(change(layer) if (index + 1) % k == 0 else layer for index, layer in enumerate(layers))


def linear_drop_path(layers: tuple[LayerConfig, ...], rate: float) -> tuple[LayerConfig, ...]:
    """Stochastic depth growing linearly from 0 (first layer) to ``rate`` (last)."""
    count = len(layers)
    rates = [rate * i / (count - 1) for i in range(count)] if count > 1 else [rate]
    return tuple(layer.replace(drop_path=r) for layer, r in zip(layers, rates))


@config
class EncoderDecoderConfig(ConfigBase):
    """A sequence-to-sequence model: a bidirectional encoder stack and a causal decoder stack whose layers
    also attend to the encoder's output (``cross_attention``), over one vocabulary."""

    family: ClassVar[str] = "encoder_decoder"

    encoder: ModelConfig
    decoder: ModelConfig
    #: one token embedding for both sides (else the decoder has its own)
    share_embeddings: bool = True

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def embed_dim(self) -> int:
        return self.decoder.embed_dim

    @property
    def tie_embeddings(self) -> bool:
        return self.decoder.tie_embeddings

    @property
    def moe(self) -> bool:
        return self.encoder.moe or self.decoder.moe

    def replace(self, **changes):
        """A copy with some options changed; ``vocab_size`` changes both sides (they share it)."""
        if "vocab_size" in changes:
            size = changes.pop("vocab_size")
            changes["encoder"] = changes.get("encoder", self.encoder).replace(vocab_size=size)
            changes["decoder"] = changes.get("decoder", self.decoder).replace(vocab_size=size)
        return dataclasses.replace(self, **changes)

    def _validate(self) -> None:
        encoder, decoder = self.encoder, self.decoder
        _require(not encoder.causal and not encoder.cross_attention,
                 "encoder: a bidirectional stack (causal=False) without cross_attention")
        _require(decoder.causal and all(layer.cross_attention is not None for layer in decoder.layers),
                 "decoder: a causal stack whose every layer has cross_attention (it reads the encoder)")
        _require(encoder.vocab_size == decoder.vocab_size and encoder.embed_dim == decoder.embed_dim,
                 "encoder and decoder need one vocab_size and one embed_dim")
        _require(encoder.tie_embeddings == decoder.tie_embeddings,
                 "tie_embeddings is the decoder's head: give the encoder the same value (it has no head)")
        _require(encoder.multiway is None and decoder.multiway is None,
                 "an encoder-decoder has no per-modality copies (multiway)")


def _load_layer_mixers() -> None:
    """Import every module of :mod:`scaleformer.layers`: a mixer defined in a layer file (config class and
    module side by side) registers itself, with no list of them to keep here."""
    import scaleformer.layers as layers

    for module in pkgutil.iter_modules(layers.__path__):
        importlib.import_module(f"{layers.__name__}.{module.name}")


_load_layer_mixers()
