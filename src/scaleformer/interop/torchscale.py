"""TorchScale checkpoints -> scaleformer models with the same logits.

TorchScale (``pip install torchscale``) describes a model by a config object (``EncoderConfig``,
``DecoderConfig``, ``EncoderDecoderConfig``, ``RetNetConfig``) and keeps some of the architecture outside
it: token and position embeddings are modules the caller passes in. So conversion takes both the config
(the object itself, ``vars()`` of it, or the keyword arguments it was built from) and the state dict, and
reads what the config does not say (learned positions, an untied head) from the weights::

    config, state = convert_torchscale(ts_model.state_dict(), ts_config)
    model = load_torchscale(ts_model.state_dict(), ts_config)       # built, weights loaded strictly

What carries over exactly, and how (each case is tested against TorchScale itself, logits ≤ 1e-5):

* Pre-LN, Post-LN, DeepNorm (same α; β only matters at initialization) and Sub-LN stacks.
* Learned positions: TorchScale's table starts at row 2 (fairseq's padding offset); rows 2.. become ours.
* xPos: TorchScale centres positions on the sequence, we do not; the scales cancel in q·k, so only
  rounding differs.
* Relative position bias: TorchScale's decoder buckets relative positions *bidirectionally*, so a
  causal decoder only ever uses the first half of its table. T5's causal bucketing over half as many
  buckets is the same function; we convert to that (``relative_buckets = rel_pos_buckets // 2``).
* Multiway (BEiT-3 as TorchScale implements it, ``multiway=True``): every token-wise module has a copy
  per modality — attention projections and Sub-LN norm included — which our ``multiway_attention``
  option reproduces.
* RetNet: converted with ``normalizer="torchscale"`` (see :class:`~scaleformer.layers.retention.MultiScaleRetention`),
  which reproduces TorchScale's parallel form in all three of our forms. TorchScale's own chunkwise
  and recurrent forms compute other numbers (see ``scaleformer bench torchscale``); we match the
  parallel one, the form it trains with by default.

Not convertible (a clear error says so): MoE layers (TorchScale's gate differs from ours in ways that
change routing), relative bias in encoder-decoders (we have no cross-attention bias), a pre-LN encoder
built with ``normalize_output=False``, and encoder/decoder sides of different widths.

TorchScale itself is only needed to *run* TorchScale models (tests, ``scaleformer bench torchscale``):
:func:`import_torchscale` imports it.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from scaleformer.build import build
from scaleformer.config import RetNetConfig, TransformerConfig

__all__ = ["convert_torchscale", "load_torchscale", "config_from_torchscale", "torchscale_kind", "import_torchscale"]

# TorchScale's defaults for the options that shape a model (torchscale/architecture/config.py, 0.3.0).
_COMMON = dict(activation_fn="gelu", dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, activation_dropout=0.0,
               no_scale_embedding=True, layernorm_embedding=False, moe_freq=0, moe_expert_count=0,
               rel_pos_buckets=0, max_rel_pos=0, deepnorm=False, subln=True, multiway=False,
               no_output_layer=False, layernorm_eps=1e-5, vocab_size=-1, xpos_rel_pos=False, xpos_scale_base=512)
_SIDE = dict(embed_dim=768, attention_heads=12, ffn_embed_dim=3072, layers=12, normalize_before=True)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {**_COMMON, **{f"encoder_{k}": v for k, v in _SIDE.items()}, "normalize_output": True,
                "share_encoder_input_output_embed": False, "max_source_positions": 1024},
    "decoder": {**_COMMON, **{f"decoder_{k}": v for k, v in _SIDE.items()},
                "share_decoder_input_output_embed": False, "max_target_positions": 1024},
    "encoder_decoder": {**_COMMON, **{f"{s}_{k}": v for s in ("encoder", "decoder") for k, v in _SIDE.items()},
                        "normalize_output": True, "share_all_embeddings": False,
                        "share_decoder_input_output_embed": False},
    "retnet": {**_COMMON, "decoder_embed_dim": 768, "decoder_value_embed_dim": 1280, "decoder_retention_heads": 3,
               "decoder_ffn_embed_dim": 1280, "decoder_layers": 12, "decoder_normalize_before": True,
               "layernorm_eps": 1e-6, "share_decoder_input_output_embed": False, "chunkwise_recurrent": False,
               "recurrent_chunk_size": 512},
}
_CLASS_KIND = {"EncoderConfig": "encoder", "DecoderConfig": "decoder", "EncoderDecoderConfig": "encoder_decoder",
               "RetNetConfig": "retnet"}


def torchscale_kind(ts_config: Any) -> str:
    """"encoder", "decoder", "encoder_decoder" or "retnet", from the config's class or its keys."""
    kind = _CLASS_KIND.get(type(ts_config).__name__)
    if kind is not None:
        return kind
    keys = set(torchscale_options(ts_config))
    if keys & {"decoder_retention_heads", "decoder_value_embed_dim", "recurrent_chunk_size"}:
        return "retnet"
    encoder = any(k.startswith("encoder_") for k in keys)
    decoder = any(k.startswith("decoder_") for k in keys)
    if encoder and decoder:
        return "encoder_decoder"
    if encoder or decoder:
        return "encoder" if encoder else "decoder"
    raise ValueError("cannot tell which TorchScale model this config describes: pass kind='encoder', 'decoder', "
                     "'encoder_decoder' or 'retnet'")


def torchscale_options(ts_config: Any) -> dict[str, Any]:
    if isinstance(ts_config, Mapping):
        return dict(ts_config)
    if hasattr(ts_config, "__dict__"):
        return dict(vars(ts_config))
    raise TypeError(f"expected a TorchScale config object or a mapping of its options, got {type(ts_config).__name__}")


def _resolve(ts_config: Any, kind: str) -> dict[str, Any]:
    """TorchScale's options after its defaults and its own override rules (deepnorm/subln win over the rest)."""
    opts = {**_DEFAULTS[kind], **torchscale_options(ts_config)}
    sides = [s for s in ("encoder", "decoder") if f"{s}_normalize_before" in opts]
    if opts["deepnorm"]:
        opts.update({f"{s}_normalize_before": False for s in sides}, subln=False)
    if opts["subln"]:
        opts.update({f"{s}_normalize_before": True for s in sides}, deepnorm=False)
    return opts


def _unsupported(message: str) -> ValueError:
    return ValueError(f"cannot convert this TorchScale model: {message}")


def config_from_torchscale(ts_config: Any, state_dict: Mapping[str, Tensor], *,
                           kind: str | None = None) -> TransformerConfig | RetNetConfig:
    """Our config for a TorchScale model, from its config and (for what the config omits) its weights."""
    kind = kind or torchscale_kind(ts_config)
    if kind not in _DEFAULTS:
        raise ValueError(f"kind must be one of {sorted(_DEFAULTS)}, got {kind!r}")
    opts = _resolve(ts_config, kind)
    if opts["moe_freq"] > 0 and opts["moe_expert_count"] > 0:
        raise _unsupported("MoE layers (TorchScale's gates route differently from ours)")
    if opts["activation_fn"] not in ("gelu", "relu", "swish"):
        raise _unsupported(f"activation_fn={opts['activation_fn']!r}")
    vocab = _vocab_size(state_dict, kind)
    common = dict(vocab_size=vocab, dropout=float(opts["dropout"]), drop_path=float(opts["drop_path_rate"]),
                  activation_dropout=float(opts["activation_dropout"]), activation=opts["activation_fn"],
                  scale_embeddings=not opts["no_scale_embedding"], embedding_norm=bool(opts["layernorm_embedding"]),
                  norm_eps=float(opts["layernorm_eps"]))
    if kind == "retnet":
        return _retnet_config(opts, state_dict, common)
    return _transformer_config(opts, state_dict, kind, common)


def _vocab_size(state_dict: Mapping[str, Tensor], kind: str) -> int:
    key = {"encoder_decoder": "encoder.embed_tokens.weight"}.get(kind, "embed_tokens.weight")
    if key not in state_dict:
        raise _unsupported(f"the state dict has no `{key}` (TorchScale models get their token embedding from "
                           f"the caller; pass the state dict of a model built with one)")
    return int(state_dict[key].shape[0])


def _retnet_config(opts: dict[str, Any], state_dict: Mapping[str, Tensor], common: dict[str, Any]) -> RetNetConfig:
    if not opts["decoder_normalize_before"] and not opts["deepnorm"]:
        raise _unsupported("a Post-LN RetNet without DeepNorm (scaleformer's RetNet is Pre-LN or DeepNorm)")
    return RetNetConfig(
        embed_dim=opts["decoder_embed_dim"], value_dim=opts["decoder_value_embed_dim"],
        heads=opts["decoder_retention_heads"], ffn_dim=opts["decoder_ffn_embed_dim"], layers=opts["decoder_layers"],
        ffn="glu", norm="deepnorm" if opts["deepnorm"] else "pre", norm_type="rmsnorm", decay="retnet",
        chunk_size=opts["recurrent_chunk_size"], normalizer="torchscale",
        tie_embeddings=_tied(opts, state_dict, "share_decoder_input_output_embed", "", "embed_tokens.weight"),
        **common)


def _tied(opts: dict[str, Any], state_dict: Mapping[str, Tensor], flag: str, prefix: str, embedding_key: str) -> bool:
    head = state_dict.get(f"{prefix}output_projection.weight")
    if head is None:  # no head at all (e.g. a BEiT-3 backbone): ours reuses the embedding; hidden states match
        return True
    return bool(opts.get(flag)) or head.data_ptr() == state_dict[embedding_key].data_ptr()


def _transformer_config(opts: dict[str, Any], state_dict: Mapping[str, Tensor], kind: str,
                        common: dict[str, Any]) -> TransformerConfig:
    sides = ["encoder", "decoder"] if kind == "encoder_decoder" else [kind]
    first = sides[0]
    for name in ("embed_dim", "attention_heads", "ffn_embed_dim"):
        values = {opts[f"{s}_{name}"] for s in sides}
        if len(values) > 1:
            raise _unsupported(f"encoder and decoder differ in {name} ({sorted(values)}); scaleformer's "
                               f"encoder-decoder has one width")
    if opts["deepnorm"]:
        norm = "deepnorm"
    elif opts["subln"]:
        norm = "subln"
    else:
        befores = {opts[f"{s}_normalize_before"] for s in sides}
        if len(befores) > 1:
            raise _unsupported("the encoder is Pre-LN and the decoder Post-LN (or the reverse)")
        norm = "pre" if befores.pop() else "post"
    if "encoder" in sides and norm in ("pre", "subln") and not opts["normalize_output"]:
        raise _unsupported("normalize_output=False (scaleformer's Pre-LN encoder always ends with its norm)")

    prefixes = {"encoder_decoder": ["encoder.", "decoder."]}.get(kind, [""])
    learned = [p for p in prefixes if f"{p}embed_positions.weight" in state_dict]
    relative = opts["rel_pos_buckets"] > 0 and opts["max_rel_pos"] > 0
    kinds = [name for name, on in (("absolute", bool(learned)), ("xpos", opts["xpos_rel_pos"]),
                                   ("relative", relative)) if on]
    if len(kinds) > 1:
        raise _unsupported(f"it combines {' and '.join(kinds)} positions; scaleformer uses one kind per model")
    if learned and len(learned) != len(prefixes):
        raise _unsupported("only one side of the encoder-decoder has learned positions")
    if relative and kind == "encoder_decoder":
        raise _unsupported("relative position bias in an encoder-decoder (TorchScale also biases cross-attention, "
                           "which scaleformer does not)")
    position = kinds[0] if kinds else "none"
    extra: dict[str, Any] = {}
    if position == "absolute":
        rows = {int(state_dict[f"{p}embed_positions.weight"].shape[0]) for p in prefixes}
        if len(rows) > 1:
            raise _unsupported(f"encoder and decoder position tables differ in size ({sorted(rows)})")
        extra["max_positions"] = rows.pop() - POSITION_OFFSET
    if position == "xpos":
        extra["xpos_scale_base"] = float(opts["xpos_scale_base"])
    if position == "relative":  # a causal decoder uses only the first half of TorchScale's bidirectional table
        extra["relative_buckets"] = opts["rel_pos_buckets"] // (2 if kind == "decoder" else 1)
        extra["relative_max_distance"] = opts["max_rel_pos"]

    if kind == "encoder_decoder":
        extra["decoder_layers"] = opts["decoder_layers"]
        extra["share_encoder_decoder_embeddings"] = bool(opts["share_all_embeddings"])
        tie = _tied(opts, state_dict, "share_decoder_input_output_embed", "decoder.", "decoder.embed_tokens.weight")
    else:
        tie = _tied(opts, state_dict, f"share_{kind}_input_output_embed", "", "embed_tokens.weight")
    multiway = bool(opts["multiway"])
    if multiway and kind != "encoder":
        raise _unsupported("multiway outside an Encoder (TorchScale's decoders never route tokens to the second "
                           "way: only its first copies are ever used)")
    return TransformerConfig(
        arch=kind, embed_dim=opts[f"{first}_embed_dim"], heads=opts[f"{first}_attention_heads"],
        ffn_dim=opts[f"{first}_ffn_embed_dim"], layers=opts[f"{first}_layers"], ffn="mlp", norm=norm,
        norm_type="layernorm", position=position, attention_dropout=float(opts["attention_dropout"]), bias=True,
        tie_embeddings=tie, multiway=2 if multiway else 1, **({'multiway_scope': 'all'} if multiway else {}),
        **extra, **common)


POSITION_OFFSET = 2  # fairseq/TorchScale position ids start at 2 (0 and 1 were padding-related)

# TorchScale name (within one stack, after its layer index) -> ours. Applied in order, first match wins.
TRANSFORMER_LAYER_RULES = [
    (r"self_attn\.(q|k|v|out)_proj\.(A|B)\.", lambda m: f"mixer.{m[1]}_proj.ways.{'AB'.index(m[2])}."),
    (r"self_attn\.(q|k|v|out)_proj\.", lambda m: f"mixer.{m[1]}_proj."),
    (r"self_attn\.inner_attn_ln\.(A|B)\.", lambda m: f"mixer.inner_norm.ways.{'AB'.index(m[1])}."),
    (r"self_attn\.inner_attn_ln\.", lambda m: "mixer.inner_norm."),
    (r"self_attn_layer_norm\.(A|B)\.", lambda m: f"mixer_norm.ways.{'AB'.index(m[1])}."),
    (r"self_attn_layer_norm\.", lambda m: "mixer_norm."),
    (r"encoder_attn\.(q|k|v|out)_proj\.", lambda m: f"cross_attn.{m[1]}_proj."),
    (r"encoder_attn_layer_norm\.", lambda m: "cross_attn_norm."),
    (r"ffn\.(A|B)\.ffn_layernorm\.", lambda m: f"ffn.ways.{'AB'.index(m[1])}.inner_norm."),
    (r"ffn\.(A|B)\.", lambda m: f"ffn.ways.{'AB'.index(m[1])}."),
    (r"ffn\.ffn_layernorm\.", lambda m: "ffn.inner_norm."),
    (r"ffn\.", lambda m: "ffn."),
    (r"final_layer_norm\.(A|B)\.", lambda m: f"ffn_norm.ways.{'AB'.index(m[1])}."),
    (r"final_layer_norm\.", lambda m: "ffn_norm."),
]
_RETNET_LAYER_RULES = [
    (r"retention\.(q|k|v|g|out)_proj\.", lambda m: f"mixer.{m[1]}_proj."),
    (r"retention_layer_norm\.", lambda m: "mixer_norm."),
    (r"ffn\.(fc1|fc2|gate)\.", lambda m: f"ffn.{m[1]}."),
    (r"final_layer_norm\.", lambda m: "ffn_norm."),
]
STACK_RULES = [
    (r"layer_norm\.(A|B)\.", lambda m: f"final_norm.ways.{'AB'.index(m[1])}."),
    (r"layer_norm\.", lambda m: "final_norm."),
    (r"layernorm_embedding\.(A|B)\.", lambda m: f"embedding_norm.ways.{'AB'.index(m[1])}."),
    (r"layernorm_embedding\.", lambda m: "embedding_norm."),
]
# Buffers TorchScale recomputes from the config, as we do: nothing to carry.
_DERIVED = re.compile(r"(\.xpos\.scale|retnet_rel_pos\.(angle|decay))$")


def rename_by_rules(rest: str, rules: list) -> str | None:
    for pattern, replace in rules:
        match = re.match(pattern, rest)
        if match:
            return replace(match) + rest[match.end():]
    return None


def convert_torchscale(state_dict: Mapping[str, Tensor], ts_config: Any, *,
                       kind: str | None = None) -> tuple[TransformerConfig | RetNetConfig, dict[str, Tensor]]:
    """(our config, our state dict) for a TorchScale model's state dict and config. Tensors are cloned."""
    kind = kind or torchscale_kind(ts_config)
    config = config_from_torchscale(ts_config, state_dict, kind=kind)
    ours: dict[str, Tensor] = {}
    leftovers = []
    # TorchScale stack prefix -> ours
    ts_prefixes = ({"encoder.": "encoder.", "decoder.": "decoder."} if kind == "encoder_decoder"
                   else {"": {"encoder": "encoder.", "decoder": "decoder.", "retnet": "decoder."}[kind]})
    layer_rules = _RETNET_LAYER_RULES if kind == "retnet" else TRANSFORMER_LAYER_RULES
    for key, tensor in state_dict.items():
        if _DERIVED.search(key):
            continue
        ts_prefix = next((p for p in ts_prefixes if key.startswith(p)), None)
        target = None if ts_prefix is None else _convert_key(key[len(ts_prefix):], ts_prefixes[ts_prefix],
                                                             layer_rules, tensor, config, kind)
        if target is None:
            leftovers.append(key)
            continue
        name, value = target
        ours[name] = value.detach().clone()
    if leftovers:
        raise _unsupported(f"no scaleformer counterpart for {', '.join(sorted(leftovers)[:8])}"
                           f"{' ...' if len(leftovers) > 8 else ''}")
    _add_shared_embeddings(ours, config, kind)
    return config, ours


def _convert_key(rest: str, prefix: str, layer_rules: list, tensor: Tensor, config: Any,
                 kind: str) -> tuple[str, Tensor] | None:
    layer = re.match(r"layers\.(\d+)\.", rest)
    if layer:
        renamed = rename_by_rules(rest[layer.end():], layer_rules)
        return None if renamed is None else (f"{prefix}blocks.{layer[1]}.{renamed}", tensor)
    if rest == "embed_tokens.weight":
        return f"{prefix}embed_tokens.weight", tensor
    if rest == "output_projection.weight":
        return "output_projection.weight", tensor
    if rest == "embed_positions.weight":
        return f"{prefix}embed_positions.table.weight", tensor[POSITION_OFFSET:]
    if rest in ("relative_position.relative_attention_bias.weight",
                "self_attn_relative_position.relative_attention_bias.weight"):
        return f"{prefix}relative_bias.table.weight", tensor[:config.relative_buckets]
    renamed = rename_by_rules(rest, STACK_RULES)
    return None if renamed is None else (f"{prefix}{renamed}", tensor)


def _add_shared_embeddings(ours: dict[str, Tensor], config: Any, kind: str) -> None:
    """Our models register the token embedding under each stack too (one tensor, several names)."""
    if kind == "encoder_decoder":
        ours["embed_tokens.weight"] = ours["encoder.embed_tokens.weight"]
        if config.share_encoder_decoder_embeddings:
            ours["decoder.embed_tokens.weight"] = ours["encoder.embed_tokens.weight"]
    else:  # a RetNet is a Decoder
        ours["embed_tokens.weight"] = ours[f"{'decoder' if kind == 'retnet' else kind}.embed_tokens.weight"]
    if config.tie_embeddings:
        ours.pop("output_projection.weight", None)


def load_torchscale(state_dict: Mapping[str, Tensor], ts_config: Any, *, kind: str | None = None) -> nn.Module:
    """A scaleformer model (eval mode) with the weights of a TorchScale model; see :func:`convert_torchscale`."""
    config, ours = convert_torchscale(state_dict, ts_config, kind=kind)
    model = build(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise _unsupported(f"weights missing for {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()


def import_torchscale() -> types.ModuleType:
    """Import ``torchscale`` (raising ImportError with the install line if it is absent).

    TorchScale 0.3.0 takes exactly one function from ``timm`` (``drop_path``, only used with
    ``drop_path_rate > 0`` in training), and timm in turn needs torchvision, whose PyPI wheels are built
    for CUDA torch and fail to load beside a CPU build. When timm is absent or fails to import we register
    a stand-in ``timm.models.layers`` module providing that one function, so TorchScale imports without them.
    """
    try:
        importlib.import_module("timm.models.layers")
    except Exception:  # noqa: BLE001 - absent (ImportError), or present but broken (a CUDA torchvision
        # beside CPU torch raises RuntimeError while registering its operators): either way, the stand-in
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]  # drop a half-imported timm
        _register_drop_path_stand_in()
    try:
        module = importlib.import_module("torchscale")
        for name in ("architecture.decoder", "architecture.encoder", "architecture.encoder_decoder",
                     "architecture.retnet", "architecture.config"):
            importlib.import_module(f"torchscale.{name}")
    except ImportError as error:
        raise ImportError(f"TorchScale is not importable ({error}); install it beside scaleformer with "
                          f"`pip install --no-deps torchscale==0.3.0 fairscale==0.4.0`") from error
    return module


def _register_drop_path_stand_in() -> None:
    def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> Tensor:
        if drop_prob == 0.0 or not training:
            return x
        keep = 1 - drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * (mask / keep if scale_by_keep else mask)

    for name in ("timm", "timm.models", "timm.models.layers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.layers"].drop_path = drop_path  # type: ignore[attr-defined]
