"""Typed, frozen, keyword-only configs.

Every config class is declared with :func:`config`, which makes it a frozen keyword-only dataclass and
adds three guarantees:

* an unknown option raises :class:`ConfigError` naming the closest valid one ("did you mean `layers`?");
* every field is checked against its annotation (``Literal`` choices, ``int``, ``float``, ``bool``,
  ``X | None``) and against the class's own ``_validate`` rules; errors name the fields involved;
* nothing is silently rewritten: a config holds exactly what the user asked for.

Each option is documented once, by the ``#:`` comment above its field.
"""

from __future__ import annotations

import dataclasses
import functools
import difflib
import json
import math
import types
import typing
from typing import Any, ClassVar, Literal


__all__ = ["ConfigError", "check_choice", "closest_match", "config", "RouterConfig", "MoEConfig", "S2Config", "TransformerConfig", "RetNetConfig", "config_from_dict"]


class ConfigError(ValueError):
    """An invalid option, value or combination of values in a config; ``path`` names the nested option
    (``layers[2].mixer``) when the error is inside a nested config."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.message, self.path = message, path


_FAMILIES: dict[str, type] = {}


def check_choice(value: Any, choices: typing.Iterable[Any], what: str) -> None:
    """For layer constructors (which configs do not guard): an unknown mode string is a ConfigError with a
    did-you-mean, never a silent fallback to another mode."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}"
                          f"{closest_match(str(value), [str(c) for c in choices])}")


def closest_match(name: str, choices: typing.Iterable[str]) -> str:
    """"; did you mean `x`?" for the choice closest to ``name``, or "" when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean `{match[0]}`?" if match else ""


def config(cls: type) -> type:
    """Class decorator: frozen keyword-only dataclass with checked construction and dict/JSON I/O."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    generated_init = cls.__init__

    def __init__(self, **kwargs: Any) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        for key in kwargs:
            if key not in names:
                raise ConfigError(f"unknown option `{key}` for {cls.__name__}{closest_match(key, names)}")
        generated_init(self, **kwargs)

    __init__.__doc__ = generated_init.__doc__
    cls.__init__ = __init__
    family = getattr(cls, "family", None)
    if family is not None:
        _FAMILIES[family] = cls
    return cls


class ConfigBase:
    """Shared behaviour of every config: type checks, validation hook, dict and JSON round trip."""

    family: ClassVar[str | None] = None  # top-level configs name their model family; nested ones do not
    kind: ClassVar[str | None] = None  # a member of a tagged union (one of several configs a field accepts)

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for field in dataclasses.fields(self):
            check_type(type(self).__name__, field.name, getattr(self, field.name), hints[field.name])
        self._validate()

    def _validate(self) -> None:  # overridden by subclasses for cross-field rules
        pass

    def replace(self, **changes: Any):
        """A copy with some options changed (validated like a fresh config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: nested configs as dicts (with their ``kind`` when they are one member of a union)."""
        out: dict[str, Any] = {"family": self.family} if self.family is not None else {}
        kind = getattr(type(self), "kind", None)
        if kind is not None:
            out["kind"] = kind
        for field in dataclasses.fields(self):
            out[field.name] = _plain(getattr(self, field.name))
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config ``to_dict`` gave. Nested dicts become the configs their fields' types name (a union
        is resolved by the ``kind`` key); an error names the path to the option, e.g. ``layers[2].mixer``."""
        data = dict(data)
        family = data.pop("family", cls.family)
        if family != cls.family:
            raise ConfigError(f"config family `{family}` cannot be read as {cls.__name__} (family `{cls.family}`)")
        kind = data.pop("kind", getattr(cls, "kind", None))
        if kind != getattr(cls, "kind", None):
            raise ConfigError(f"kind `{kind}` cannot be read as {cls.__name__}")
        hints = type_hints(cls)
        for name, value in data.items():
            if name in hints:
                data[name] = from_plain(value, hints[name], name)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@functools.lru_cache(maxsize=None)
def type_hints(owner: Any) -> dict[str, Any]:
    """``typing.get_type_hints(owner)``, evaluated once per class or function: it re-evaluates every string
    annotation on each call, which was 85% of building a config (0.8 ms per layer of a ModelConfig)."""
    return typing.get_type_hints(owner)


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value] if any(isinstance(v, ConfigBase) for v in value) else value
    return value


def _config_types(hint: Any) -> list[type]:
    return [h for h in (hint, *typing.get_args(hint)) if isinstance(h, type) and issubclass(h, ConfigBase)]


def from_plain(value: Any, hint: Any, path: str) -> Any:
    """JSON data for a field of type ``hint``: dicts become configs, lists tuples."""
    if isinstance(value, list):  # JSON has no tuples
        args = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(from_plain(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    choices = _config_types(hint)
    if not isinstance(value, dict) or not choices:
        return value
    if len(choices) == 1 and hasattr(choices[0], "members"):  # an open union: every registered member
        choices = list(choices[0].members())
    if len(choices) > 1:  # a tagged union: the dict's kind picks the member
        kinds = {getattr(c, "kind", None): c for c in choices}
        kind = value.get("kind")
        if kind is None:
            raise ConfigError(f"needs a `kind` to say which it is: one of {', '.join(map(repr, kinds))}", path)
        if kind not in kinds:
            raise ConfigError(f"unknown kind {kind!r}; expected one of {', '.join(map(repr, kinds))}"
                              f"{closest_match(str(kind), [str(k) for k in kinds])}", path)
        choices = [kinds[kind]]
    try:
        return choices[0].from_dict(value)
    except ConfigError as error:
        raise ConfigError(error.message, f"{path}.{error.path}" if error.path else path) from None


def config_from_dict(data: dict[str, Any], *, saved: bool = False) -> ConfigBase:
    """Rebuild any registered config from :meth:`ConfigBase.to_dict` output (dispatches on ``family``).
    ``saved``: the dict comes from a saved model (a checkpoint's config.json), which may hold options earlier
    versions wrote though they had no effect (see ``from_saved``); they are read as the model they built."""
    family = data.get("family")
    if family not in _FAMILIES:
        raise ConfigError(f"unknown config family `{family}`; known: {sorted(_FAMILIES)}{closest_match(str(family), _FAMILIES)}")
    kind = _FAMILIES[family]
    return kind.from_saved(data) if saved and hasattr(kind, "from_saved") else kind.from_dict(data)


def check_type(owner: str, name: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        origin = typing.get_origin(hint)
        if origin is Literal:
            choices = typing.get_args(hint)
            hint_text = " | ".join(repr(c) for c in choices)
            suggestion = closest_match(str(value), [str(c) for c in choices]) if isinstance(value, str) else ""
            raise ConfigError(f"{owner}.{name} must be one of {hint_text}, got {value!r}{suggestion}")
        raise ConfigError(f"{owner}.{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is an exact float; bools are not numbers here
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"unsupported annotation {hint!r}")  # our own invariant, not a user error


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is tuple:
        return "a tuple"
    if isinstance(hint, type) and issubclass(hint, ConfigBase):  # from JSON/CLI: an object of its options
        kind = getattr(hint, "kind", None)
        return f"{hint.__name__} (a JSON object of its options{f', kind {kind!r}' if kind else ''})"
    return f"a finite {hint.__name__}" if hint is float else f"an {hint.__name__}" if hint is int else getattr(hint, "__name__", str(hint))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_positive(owner: Any, *names: str) -> None:
    """A ConfigError for the first of ``owner``'s fields ``names`` below 1 (None counts as unset)."""
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


# --------------------------------------------------------------------------------------------------------------
# Sparse mixture of experts (a nested config, usable by every model family)
# --------------------------------------------------------------------------------------------------------------

@config
class RouterConfig(ConfigBase):
    """How one mixture-of-experts layer routes tokens (X-MoE, arXiv 2204.09179; Switch/GShard routing)."""

    #: number of experts per MoE layer
    experts: int = 8
    #: experts per token: 1 (Switch, X-MoE) or 2 (GShard)
    top_k: Literal[1, 2] = 1
    #: training capacity: each expert takes at most ceil(capacity_factor · top_k · tokens / experts) tokens;
    #: tokens beyond it skip the layer (the residual carries them)
    capacity_factor: float = 1.25
    #: evaluation capacity factor; None = no limit (no token is dropped, so cached decoding stays exact)
    eval_capacity_factor: float | None = None
    #: top-2 only: "all" always uses the second expert; "random" keeps it when 2·gate₂ > U(0, 1) (GShard)
    second_expert_policy: Literal["all", "random"] = "random"
    #: top-2 only: renormalize the two gates to sum to 1
    normalize_gates: bool = True
    #: multiplicative input jitter for the router during training, x · U(1 - jitter, 1 + jitter) (Switch)
    jitter: float = 0.0
    #: router: "softmax" (Switch/GShard: softmax(W x)), "xmoe" (the paper: cosine scores between a
    #: low-dimensional projection of the token and expert embeddings, learnable temperature), or
    #: "xmoe_torchscale" (TorchScale's gate: unnormalized token projection against unit expert embeddings; no temperature)
    router: Literal["softmax", "xmoe", "xmoe_torchscale"] = "xmoe"
    #: X-MoE routing dimension d_e
    router_dim: int = 16
    #: initial value of X-MoE's learnable temperature τ
    temperature_init: float = 0.3
    #: X-MoE: the fixed temperature τ₀ of the balance loss (0.3 for softmax gating)
    balance_temperature: float = 0.3
    #: weight of the load-balancing loss added to the model's aux_loss
    aux_loss_weight: float = 0.01

    def _validate(self) -> None:
        _require(self.experts >= 1, f"experts must be >= 1, got {self.experts}")
        _require(self.top_k <= self.experts, f"top_k ({self.top_k}) cannot exceed experts ({self.experts})")
        _require(self.capacity_factor > 0, f"capacity_factor must be > 0, got {self.capacity_factor}")
        _require(self.eval_capacity_factor is None or self.eval_capacity_factor > 0,
                 f"eval_capacity_factor must be > 0 or None, got {self.eval_capacity_factor}")
        _require(0 <= self.jitter < 1, f"jitter must be in [0, 1), got {self.jitter}")
        _require(self.router_dim >= 1, f"router_dim must be >= 1, got {self.router_dim}")
        _require(self.temperature_init > 0 and self.balance_temperature > 0, "temperatures must be > 0")
        _require(self.aux_loss_weight >= 0, f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")


@config
class MoEConfig(RouterConfig):
    """Mixture-of-experts FFNs in some layers of a flat model config: the routing, and which layers."""

    #: make every `every`-th layer an MoE layer (layers every-1, 2·every-1, ...); see `layers`
    every: int = 2
    #: explicit MoE layer indices (0-based); when non-empty it replaces `every`
    layers: tuple[int, ...] = ()
    #: hidden width of each expert; None = the model's ffn_dim
    expert_ffn_dim: int | None = None

    def is_moe_layer(self, index: int) -> bool:
        return index in self.layers if self.layers else (index + 1) % self.every == 0

    def routing(self) -> RouterConfig:
        """Just the routing options (what one MoE layer of a ModelConfig holds)."""
        names = {f.name for f in dataclasses.fields(RouterConfig)}
        return RouterConfig(**{name: getattr(self, name) for name in names})

    def _validate(self) -> None:
        super()._validate()
        _require(self.every >= 1, f"every must be >= 1, got {self.every}")
        _require(all(i >= 0 for i in self.layers), f"layers must be non-negative indices, got {self.layers}")
        _require(self.expert_ffn_dim is None or self.expert_ffn_dim >= 1,
                 f"expert_ffn_dim must be >= 1 or None, got {self.expert_ffn_dim}")


@config
class S2Pattern(ConfigBase):
    """S2-Attention's block layout, defined once: the options of the ``S2Attention`` mixer and of a flat
    config's ``S2Config`` (Phi-3-small: block 64, 16 local blocks, stride 8). See
    :class:`scaleformer.ops.s2.S2Layout`, which a config turns them into."""

    #: positions per block
    block: int = 64
    #: blocks of the local window (the query's own block and the ones before it)
    local_blocks: int = 16
    #: every vert_stride-th earlier block is read as well, shifted per head unless homo_head
    vert_stride: int = 8
    #: one strided shard for every head instead of one per head
    homo_head: bool = False
    #: the first dense_heads heads of an S2 layer read everything
    dense_heads: int = 0
    #: shift of every head's shard: 1 is DKernel's and Phi-3-small's rule ((j + h·step + 1) mod stride == 0)
    head_offset: int = 1

    def _validate(self) -> None:
        for name in ("block", "local_blocks", "vert_stride"):
            _require(getattr(self, name) >= 1, f"S2 {name} must be >= 1, got {getattr(self, name)}")
        _require(self.dense_heads >= 0 and self.head_offset >= 0, "S2 dense_heads and head_offset must be >= 0")

    def pattern(self) -> dict[str, Any]:
        """The layout options alone (to build another S2 config with the same layout)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(S2Pattern)}


@config
class S2Config(S2Pattern):
    """S2-Attention in a flat model config (``attention="s2"``): the block layout of every S2 layer, and
    which layers stay dense (Phi-3-small: every second layer)."""

    #: every dense_every-th layer (layers dense_every-1, 2·dense_every-1, ...) is dense; 0 = none
    dense_every: int = 0

    def is_dense_layer(self, index: int) -> bool:
        return self.dense_every > 0 and (index + 1) % self.dense_every == 0

    def _validate(self) -> None:
        super()._validate()
        _require(self.dense_every >= 0, f"s2.dense_every must be >= 0, got {self.dense_every}")


def _check_moe_layers(moe: MoEConfig | None, layers: int, name: str = "layers") -> None:
    if moe is not None:
        _require(all(i < layers for i in moe.layers), f"moe.layers {moe.layers} must be < {name} ({layers})")
        _require(any(moe.is_moe_layer(i) for i in range(layers)),
                 f"moe makes no layer sparse with {name}={layers} (every={moe.every}, layers={moe.layers})")


# --------------------------------------------------------------------------------------------------------------
# The Transformer family
# --------------------------------------------------------------------------------------------------------------

Arch = Literal["encoder", "decoder", "encoder_decoder"]
Norm = Literal["pre", "post", "deepnorm", "subln"]
NormType = Literal["layernorm", "rmsnorm"]
Position = Literal["absolute", "sinusoidal", "rope", "xpos", "relative", "none"]
FFNKind = Literal["mlp", "glu"]
Activation = Literal["gelu", "relu", "swish"]
AttentionImpl = Literal["sdpa", "reference"]
AttentionKind = Literal["dense", "dilated", "diff", "diff2", "s2"]


@config
class TransformerConfig(ConfigBase):
    """Configuration of an :class:`~scaleformer.models.Encoder`, ``Decoder`` or ``EncoderDecoder``."""

    family: ClassVar[str] = "transformer"

    #: which model: "encoder" (bidirectional, BERT-like), "decoder" (causal LM), "encoder_decoder" (MT-like)
    arch: Arch = "decoder"
    #: number of token ids (embedding rows and output classes)
    vocab_size: int = 64000
    #: model width d
    embed_dim: int = 768
    #: number of layers; for "encoder_decoder" the encoder's layers (see `decoder_layers`)
    layers: int = 12
    #: decoder layers of an "encoder_decoder" model; None means the same as `layers`
    decoder_layers: int | None = None
    #: attention heads; must divide `embed_dim`
    heads: int = 12
    #: key/value heads of grouped-query attention: each serves heads/kv_heads query heads, and the decoding
    #: cache shrinks by that factor (1 = multi-query attention); None = `heads` (ordinary multi-head)
    kv_heads: int | None = None
    #: hidden width of the feed-forward network
    ffn_dim: int = 3072
    #: feed-forward kind: "mlp" (W2 act(W1 x)) or "glu" (W2 (act(W1 x) * W3 x); "glu" + "swish" is SwiGLU)
    ffn: FFNKind = "mlp"
    #: activation of the feed-forward network
    activation: Activation = "gelu"
    #: residual scheme: "pre"-LN, "post"-LN, "deepnorm" (Post-LN with up-weighted residual, DeepNet),
    #: "subln" (Magneto: an extra norm inside attention and FFN)
    norm: Norm = "pre"
    #: normalization layer used everywhere in the model
    norm_type: NormType = "layernorm"
    #: epsilon of every norm
    norm_eps: float = 1e-5
    #: position information: learned "absolute", fixed "sinusoidal", "rope", "xpos" (LeX), T5-style
    #: "relative" bias (bidirectional buckets in encoders, causal in decoders) or "none"
    position: Position = "absolute"
    #: rows of the learned absolute position table (only used by position="absolute")
    max_positions: int = 2048
    #: base of the rotation frequencies theta_i = base^(-2i/d) for "rope" and "xpos"
    rope_base: float = 10000.0
    #: xPos scale base B: queries scaled by zeta^(n/B), keys by zeta^(-m/B)
    xpos_scale_base: float = 512.0
    #: number of buckets of the relative position bias
    relative_buckets: int = 32
    #: distance beyond which relative positions share the last bucket
    relative_max_distance: int = 128
    #: dropout on embeddings, attention output and FFN output
    dropout: float = 0.0
    #: dropout on the attention probabilities
    attention_dropout: float = 0.0
    #: dropout after the FFN activation
    activation_dropout: float = 0.0
    #: stochastic depth: the rate grows linearly from 0 (first layer) to this value (last layer)
    drop_path: float = 0.0
    #: biases in the attention and FFN projections
    bias: bool = True
    #: share the token embedding with the output head
    tie_embeddings: bool = True
    #: encoder-decoder: share one token embedding between encoder and decoder
    share_encoder_decoder_embeddings: bool = True
    #: multiply token embeddings by sqrt(embed_dim)
    scale_embeddings: bool = False
    #: a norm right after the embeddings
    embedding_norm: bool = False
    #: Multiway (BEiT-3): number of modality-specific copies of the FFN and the block norms (1 = off);
    #: tokens at positions < `multiway_split` use copy 0, the rest copy 1
    multiway: int = 1
    #: which modules get a copy per modality when multiway > 1: "ffn" (the paper: FFN and block norms; the
    #: attention is shared) or "all" (TorchScale's BEiT-3: also the attention projections, Sub-LN's inner
    #: norm, and the embedding and final norms; what converted BEiT-3/TorchScale checkpoints need)
    multiway_scope: Literal["ffn", "all"] = "ffn"
    #: LeX blockwise causal attention, an inference-time option for length extrapolation: queries are split
    #: into blocks of this many positions (the paper uses half the training length) and each block attends
    #: only to itself and the block before; None = ordinary causal attention
    blockwise_causal_block: int | None = None
    #: sliding-window attention: a token sees itself and the window-1 tokens before it (in an encoder, also
    #: the window-1 after it); cached decoding then holds only the last window-1 tokens. None = unlimited
    window: int | None = None
    #: momentum attention (the attention ↔ gradient-descent duality, arXiv 2212.10559): the causal
    #: self-attention output of token t gets Σ_{i<t} η^{t−i} v_i added, η = this value in (0, 1); None = off
    momentum: float | None = None
    #: recompute each block in the backward pass instead of storing its activations
    checkpoint_activations: bool = False
    #: the blocks' linear layers: "standard", or BitNet b1.58's "bitlinear" (ternary weights, 8-bit
    #: activations, straight-through gradients; embeddings and the output head stay full precision)
    linear: Literal["standard", "bitlinear"] = "standard"
    #: attention kernel: "sdpa" (fused kernels) or the pure-PyTorch "reference" (dense, explicit masks)
    attention_impl: AttentionImpl = "sdpa"
    #: self-attention: "dense", LongNet's "dilated" (see `segment_lengths`, `dilation_rates`), DIFF
    #: Transformer's "diff" (heads/2 differential heads of two components each: the same parameter count),
    #: or "s2" (S2-Attention: see `s2`)
    attention: AttentionKind = "dense"
    #: S2-Attention's layout and dense layers, with attention="s2" (None there = S2Config's defaults)
    s2: S2Config | None = None
    #: dilated attention: segment length w_i of each pattern (a geometric sequence in the paper)
    segment_lengths: tuple[int, ...] = ()
    #: dilated attention: dilation rate r_i of each pattern; one of them must be 1
    dilation_rates: tuple[int, ...] = ()
    #: sparse mixture-of-experts FFN in some layers (None = dense everywhere); see MoEConfig
    moe: MoEConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def num_decoder_layers(self) -> int:
        return self.layers if self.decoder_layers is None else self.decoder_layers

    def _validate(self) -> None:
        for name in ("vocab_size", "embed_dim", "layers", "heads", "ffn_dim", "max_positions",
                     "relative_buckets", "relative_max_distance", "multiway"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.embed_dim % self.heads == 0,
                 f"heads ({self.heads}) must divide embed_dim ({self.embed_dim})")
        _require(self.kv_heads is None or (self.kv_heads >= 1 and self.heads % self.kv_heads == 0),
                 f"kv_heads ({self.kv_heads}) must be >= 1 and divide heads ({self.heads})")
        _require(self.window is None or self.window >= 1, f"window must be >= 1 or None, got {self.window}")
        for name in ("dropout", "attention_dropout", "activation_dropout", "drop_path"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _require(self.rope_base > 1, f"rope_base must be > 1, got {self.rope_base}")
        _require(self.xpos_scale_base > 0, f"xpos_scale_base must be > 0, got {self.xpos_scale_base}")
        if self.position in ("rope", "xpos"):
            _require(self.head_dim % 2 == 0,
                     f"position={self.position!r} rotates pairs of channels: embed_dim/heads "
                     f"({self.embed_dim}/{self.heads} = {self.head_dim}) must be even")
        if self.position == "relative":
            _require(self.relative_buckets >= (4 if self.arch != "decoder" else 2),
                     f"relative_buckets ({self.relative_buckets}) too small for arch={self.arch!r}")
            # Half the (causal) buckets are exact distances; the logarithmic ones must reach further.
            _require(self.relative_max_distance > self.relative_buckets // 2,
                     f"relative_max_distance ({self.relative_max_distance}) must exceed relative_buckets // 2 "
                     f"({self.relative_buckets // 2}), the distances that get exact buckets")
        if self.decoder_layers is not None:
            _require(self.arch == "encoder_decoder",
                     f"decoder_layers is only meaningful for arch='encoder_decoder', not arch={self.arch!r}")
            _require(self.decoder_layers >= 1, f"decoder_layers must be >= 1, got {self.decoder_layers}")
        if self.blockwise_causal_block is not None:
            _require(self.window is None, "window and blockwise_causal_block are two different sparsities; pick one")
            _require(self.arch != "encoder",
                     "blockwise_causal_block applies to causal attention; arch='encoder' is bidirectional")
            _require(self.blockwise_causal_block >= 1,
                     f"blockwise_causal_block must be >= 1, got {self.blockwise_causal_block}")
        if self.momentum is not None:
            _require(0 < self.momentum < 1, f"momentum (η) must be in (0, 1), got {self.momentum}")
            _require(self.arch != "encoder", "momentum attention sums the earlier tokens' values: it is causal, "
                     "and arch='encoder' is bidirectional")
            _require(self.attention == "dense", f"momentum is an option of dense softmax attention, not "
                     f"attention={self.attention!r}")
        _require(self.multiway_scope == "ffn" or self.multiway > 1,
                 f"multiway_scope={self.multiway_scope!r} needs multiway > 1")
        if self.multiway > 1:
            _require(self.arch != "encoder_decoder",
                     "multiway > 1 is supported for arch='encoder' and 'decoder', not 'encoder_decoder'")
        if self.attention == "dilated":
            try:
                from scaleformer.ops.dilated import check_patterns  # (torch: imported when a config needs it)

                check_patterns(self.segment_lengths, self.dilation_rates)
            except ValueError as error:
                raise ConfigError(f"segment_lengths/dilation_rates: {error}") from None
            _require(self.position != "relative",
                     "attention='dilated' does not support position='relative' (use 'xpos', 'rope', ...)")
            _require(self.blockwise_causal_block is None and self.window is None,
                     "attention='dilated' and blockwise_causal_block or window are different sparsities; pick one")
            _require(self.attention_dropout == 0.0,
                     "attention='dilated' runs fused kernels without attention dropout: set attention_dropout=0")
        else:
            _require(not self.segment_lengths and not self.dilation_rates,
                     "segment_lengths/dilation_rates are only used with attention='dilated'")
        if self.attention == "s2":
            _require(self.position != "relative", "attention='s2' does not support position='relative' (use 'rope', ...)")
            _require(self.blockwise_causal_block is None and self.window is None and self.momentum is None,
                     "attention='s2' is its own sparsity: no blockwise_causal_block, window or momentum")
            _require(self.attention_dropout == 0.0,
                     "attention='s2' runs its kept-blocks kernels without attention dropout: set attention_dropout=0")
            _require(self.s2 is None or self.s2.dense_heads <= self.heads,
                     f"s2.dense_heads must be <= heads ({self.heads})")
        else:
            _require(self.s2 is None, "s2 is only used with attention='s2'")
        if self.attention == "diff":
            _require(self.heads % 2 == 0 and (self.kv_heads is None or self.kv_heads % 2 == 0),
                     f"attention='diff' pairs heads into differential heads: heads ({self.heads}) and kv_heads "
                     f"({self.kv_heads}) must be even")
            _require(self.position != "relative", "attention='diff' does not support position='relative'")
            _require(self.multiway_scope == "ffn", "attention='diff' has no per-modality copies: multiway_scope='ffn'")
        _check_moe_layers(self.moe, min(self.layers, self.num_decoder_layers) if self.arch == "encoder_decoder"
                          else self.layers)
        if self.moe is not None:
            _require(self.multiway == 1, "moe and multiway > 1 cannot be combined (both replace the FFN)")
        if not self.share_encoder_decoder_embeddings:
            _require(self.arch == "encoder_decoder",
                     "share_encoder_decoder_embeddings=False is only meaningful for arch='encoder_decoder'")


# --------------------------------------------------------------------------------------------------------------
# RetNet
# --------------------------------------------------------------------------------------------------------------

RetentionForm = Literal["parallel", "chunkwise", "recurrent"]


@config
class RetNetConfig(ConfigBase):
    """Configuration of a :class:`~scaleformer.models.RetNet` (decoder-only, retention instead of attention).

    Defaults are TorchScale's ``retnet_base`` sizes (its own RetNetConfig default, 1280 values over 3
    heads, does not run).
    """

    family: ClassVar[str] = "retnet"

    #: number of token ids
    vocab_size: int = 64000
    #: model width d (also the total query/key width)
    embed_dim: int = 512
    #: total value width (TorchScale: ≈ 1.6875·d; the paper: 2·d)
    value_dim: int = 864
    #: number of layers
    layers: int = 6
    #: retention heads; must divide `embed_dim` and `value_dim`
    heads: int = 2
    #: hidden width of the feed-forward network
    ffn_dim: int = 864
    #: feed-forward kind ("glu" + "swish" = SwiGLU, RetNet's)
    ffn: FFNKind = "glu"
    #: activation of the feed-forward network
    activation: Activation = "swish"
    #: residual scheme: "pre" (RetNet's) or "deepnorm" (Post-LN with DeepNet's α and β)
    norm: Literal["pre", "deepnorm"] = "pre"
    #: normalization layer of the blocks and the output
    norm_type: NormType = "rmsnorm"
    #: epsilon of every norm, including the per-head norm
    norm_eps: float = 1e-6
    #: per-head decays: "retnet" γ_h = 1 - 2^(-5-h) (paper's definition, TorchScale); "paper" the schedule of
    #: the paper's experiments, γ = 1 - exp(linspace(log 1/32, log 1/512, heads)); or "gated": a decay per
    #: head and token from the input, logsigmoid(x W_γ) / decay_temperature (gated retention, RetNet-3/YOCO)
    decay: Literal["retnet", "paper", "gated"] = "retnet"
    #: τ of gated decays (YOCO's code: 16)
    decay_temperature: float = 16.0
    #: base of the rotation frequencies θ_i = base^(-i/(K/2 - 1)) (TorchScale's linspace spacing)
    rope_base: float = 10000.0
    #: how each retention row is scaled before the head norm (s_n = Σ_m R[n, m]): "smooth" divides by
    #: sqrt(s_n² + 1); "torchscale" divides by max(|s_n|, sqrt(Σ_{i≤n} γ^(n-i))), which reproduces TorchScale's
    #: parallel form exactly (its D̃ and clamp) — use it for converted TorchScale checkpoints. Both are computed
    #: the same way by all three forms; "torchscale" has a branch, so near |s_n| = sqrt(Σ γ) gradients of the
    #: forms can differ by more than rounding; "none": the per-head norm alone (YOCO's gated retention)
    normalizer: Literal["smooth", "torchscale", "none"] = "smooth"
    #: chunk length of the chunkwise form (any sequence length works; this only trades time for memory)
    chunk_size: int = 64
    #: how the chunkwise form runs: "torch" (the PyTorch forms, the reference) or "triton" (Triton kernels;
    #: CUDA, or the CPU under TRITON_INTERPRET=1)
    retention_backend: Literal["torch", "triton"] = "torch"
    #: dropout on embeddings and sublayer outputs
    dropout: float = 0.0
    #: dropout after the FFN activation
    activation_dropout: float = 0.0
    #: stochastic depth, growing linearly from 0 to this value over the layers
    drop_path: float = 0.0
    #: share the token embedding with the output head
    tie_embeddings: bool = True
    #: multiply token embeddings by sqrt(embed_dim) (TorchScale's RetNet does)
    scale_embeddings: bool = True
    #: a norm right after the embeddings
    embedding_norm: bool = False
    #: recompute each block in the backward pass instead of storing its activations
    checkpoint_activations: bool = False
    #: the blocks' linear layers: "standard", or BitNet b1.58's "bitlinear" (ternary weights, 8-bit
    #: activations, straight-through gradients; embeddings and the output head stay full precision)
    linear: Literal["standard", "bitlinear"] = "standard"
    #: sparse mixture-of-experts FFN in some layers (None = dense everywhere); see MoEConfig
    moe: MoEConfig | None = None

    @property
    def key_head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def value_head_dim(self) -> int:
        return self.value_dim // self.heads

    def _validate(self) -> None:
        for name in ("vocab_size", "embed_dim", "value_dim", "layers", "heads", "ffn_dim", "chunk_size"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.embed_dim % self.heads == 0, f"heads ({self.heads}) must divide embed_dim ({self.embed_dim})")
        _require(self.value_dim % self.heads == 0, f"heads ({self.heads}) must divide value_dim ({self.value_dim})")
        _require(self.key_head_dim % 2 == 0,
                 f"the rotation acts on pairs of channels: embed_dim/heads ({self.embed_dim}/{self.heads} = "
                 f"{self.key_head_dim}) must be even")
        for name in ("dropout", "activation_dropout", "drop_path"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _require(self.rope_base > 1, f"rope_base must be > 1, got {self.rope_base}")
        _require(not (self.decay == "gated" and self.normalizer == "torchscale"),
                 "normalizer='torchscale' divides by a per-head decay's mass; gated decays have none")
        _require(self.decay_temperature is None or self.decay_temperature > 0,
                 f"decay_temperature must be > 0, got {self.decay_temperature}")
        _check_moe_layers(self.moe, self.layers)


# --------------------------------------------------------------------------------------------------------------
# YOCO (You Only Cache Once): a decoder-decoder with one shared key/value cache
# --------------------------------------------------------------------------------------------------------------

@config
class YOCOConfig(ConfigBase):
    """Configuration of a :class:`~scaleformer.models.YOCO` (arXiv 2405.05254): a self-decoder of
    ``layers // 2`` layers (gated retention, sliding-window attention or Gated DeltaNet), one global key/value projection
    of its output, then a cross-decoder whose layers all attend to those keys and values. Decoding caches
    one layer's keys and values, whatever the depth. Blocks are LLaMA-like: Pre-RMSNorm, SwiGLU, no biases.
    """

    family: ClassVar[str] = "yoco"

    vocab_size: int = 64000
    embed_dim: int = 768
    #: total layers: the first layers // 2 form the self-decoder, the rest the cross-decoder
    layers: int = 12
    #: the self-decoder's mixer: "gated_retention" (YOCO_gRet), "sliding_window" attention (YOCO_SWA) or
    #: "gated_deltanet" (fla's YOCO: Gated DeltaNet, heads of embed_dim / self_heads for keys and values)
    self_decoder: Literal["gated_retention", "sliding_window", "gated_deltanet"] = "gated_retention"
    #: heads of the self-decoder (retention heads, or the sliding-window attention's heads)
    self_heads: int = 6
    #: the sliding window (positions) of self_decoder="sliding_window" (None: 1024); refused with gated retention
    window: int | None = None
    #: query heads of the cross-decoder's attention
    heads: int = 6
    #: key/value heads of the one global cache (divides heads; grouped-query attention)
    kv_heads: int = 2
    #: hidden width of the SwiGLU feed-forward networks
    ffn_dim: int = 2048
    norm_eps: float = 1e-5
    #: RoPE base of the attention layers and of gated retention
    rope_base: float = 10000.0
    #: τ of the gated decays, logsigmoid(x W_γ) / τ (None: YOCO's code's 16); gated retention only
    decay_temperature: float | None = None
    #: chunk length of the chunkwise form (None: 64); gated retention and Gated DeltaNet only
    chunk_size: int | None = None
    #: how gated retention's chunkwise form runs: "torch" (the reference) or "triton" (Triton kernels)
    #: (None: "torch"); gated retention only
    retention_backend: Literal["torch", "triton"] | None = None
    dropout: float = 0.0
    activation_dropout: float = 0.0
    drop_path: float = 0.0
    tie_embeddings: bool = True
    #: multiply token embeddings by sqrt(embed_dim) (YOCO's code does)
    scale_embeddings: bool = True
    checkpoint_activations: bool = False
    #: "standard" or BitNet b1.58's "bitlinear" linears in the blocks
    linear: Literal["standard", "bitlinear"] = "standard"

    #: options that only one kind of self-decoder reads: setting one for the other is an error, not a no-op
    ONLY_FOR: ClassVar[dict[str, tuple[str, ...]]] = {
        "window": ("sliding_window",), "decay_temperature": ("gated_retention",),
        "chunk_size": ("gated_retention", "gated_deltanet"), "retention_backend": ("gated_retention",)}
    #: what the options above are when left unset (None)
    UNSET: ClassVar[dict[str, Any]] = {"window": 1024, "decay_temperature": 16.0, "chunk_size": 64,
                                       "retention_backend": "torch"}

    @property
    def self_layers(self) -> int:
        return self.layers // 2

    def option(self, name: str) -> Any:
        """A self-decoder option as it takes effect: its value, or its default when unset."""
        value = getattr(self, name)
        return self.UNSET[name] if value is None else value

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "YOCOConfig":
        """A config as earlier versions saved it: they wrote every self-decoder option, the other kind's too,
        which never had an effect; those are dropped (so the model is the one that was trained)."""
        kind = data.get("self_decoder", "gated_retention")
        return cls.from_dict({k: v for k, v in data.items() if kind in cls.ONLY_FOR.get(k, (kind,))})

    @property
    def moe(self) -> None:
        """YOCO's feed-forward networks are dense (a ModelConfig can give it MoE layers)."""
        return None

    def _validate(self) -> None:
        for name, kinds in self.ONLY_FOR.items():
            _require(getattr(self, name) is None or self.self_decoder in kinds,
                     f"{name} applies to self_decoder={' or '.join(map(repr, kinds))} only; this config's "
                     f"self-decoder is {self.self_decoder!r}, which would ignore it")
        for name in ("vocab_size", "embed_dim", "self_heads", "window", "heads", "kv_heads", "ffn_dim", "chunk_size"):
            _require(getattr(self, name) is None or getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _require(self.layers >= 2, f"layers must be >= 2 (a self-decoder and a cross-decoder), got {self.layers}")
        for heads, name in ((self.self_heads, "self_heads"), (self.heads, "heads")):
            _require(self.embed_dim % heads == 0 and (self.embed_dim // heads) % 2 == 0,
                     f"{name} ({heads}) must divide embed_dim ({self.embed_dim}) into even head widths (RoPE "
                     "rotates pairs of channels)")
        _require(self.heads % self.kv_heads == 0, f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        _require(self.self_decoder != "sliding_window" or self.self_heads == self.heads,
                 f"sliding-window and cross-decoder attention share one RoPE head width: self_heads "
                 f"({self.self_heads}) must equal heads ({self.heads})")
        for name in ("dropout", "activation_dropout", "drop_path"):
            _require(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _require(self.rope_base > 1, f"rope_base must be > 1, got {self.rope_base}")
        _require(self.decay_temperature is None or self.decay_temperature > 0,
                 f"decay_temperature must be > 0, got {self.decay_temperature}")
