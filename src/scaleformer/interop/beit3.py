"""BEiT-3 weights from TorchScale (``torchscale.model.BEiT3``) and from the released BEiT-3 checkpoints.

TorchScale's BEiT-3 is a ``text_embed``, a ``vision_embed`` (patch conv, CLS and mask tokens) and a Multiway
``Encoder`` whose position table is a pair (``embed_positions.A`` for image tokens, ``.B`` for text), each
starting at row 2 (fairseq's padding offset). The released checkpoints (unilm/beit3) hold the same module
under ``beit3.`` beside their task heads: ``fc_norm`` and ``head`` (image classification), ``vision_head``,
``language_head`` and ``logit_scale`` (retrieval). Everything the config needs is read from the weights —
width, depth, FFN width, vocabulary, patch size, image size, text positions, Sub-LN or not — except the
number of heads (BEiT-3's are all 64 wide, the default) and what weights cannot show (DeepNorm's residual
scale, activation, norm epsilon), which a TorchScale config may supply::

    config, state = convert_beit3(torch.load(path, weights_only=True)["model"])
    model = load_beit3(state_dict, ts_config)   # built, loaded strictly, eval mode
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from scaleformer.interop.torchscale import POSITION_OFFSET, STACK_RULES, TRANSFORMER_LAYER_RULES, torchscale_options, rename_by_rules
from scaleformer.models.beit3 import BEiT3Config, build_beit3

__all__ = ["convert_beit3", "load_beit3", "beit3_config_from_weights", "is_beit3_state_dict"]

_HEADS = {  # the released checkpoints' task heads -> ours (relative to the task model)
    "fc_norm.weight": "fc_norm.weight", "fc_norm.bias": "fc_norm.bias", "head.weight": "head.weight",
    "head.bias": "head.bias", "vision_head.weight": "vision_head.weight",
    "language_head.weight": "language_head.weight", "logit_scale": "logit_scale",
}


def _backbone_prefix(state_dict: Mapping[str, Tensor]) -> str:
    return "beit3." if "beit3.text_embed.weight" in state_dict else ""


def is_beit3_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is TorchScale's BEiT-3 (bare, or under ``beit3.`` as released)."""
    prefix = _backbone_prefix(state_dict)
    return f"{prefix}vision_embed.proj.weight" in state_dict and f"{prefix}text_embed.weight" in state_dict


def _error(message: str) -> ValueError:
    return ValueError(f"cannot convert this BEiT-3 checkpoint: {message}")


def beit3_config_from_weights(state_dict: Mapping[str, Tensor], ts_config: Any = None, *,
                              heads: int | None = None) -> BEiT3Config:
    """The config the weights imply (see the module docstring); ``ts_config`` (a TorchScale EncoderConfig,
    its vars() or keyword arguments) or ``heads`` fill in what weights cannot show."""
    if not is_beit3_state_dict(state_dict):
        raise _error("no text_embed.weight and vision_embed.proj.weight (is it a BEiT-3 state dict?)")
    p = _backbone_prefix(state_dict)
    opts = torchscale_options(ts_config) if ts_config is not None else {}
    vocab, width = state_dict[f"{p}text_embed.weight"].shape
    conv = state_dict[f"{p}vision_embed.proj.weight"]  # (D, C, patch, patch)
    layer_ids = {int(m[1]) for k in state_dict if (m := re.match(rf"{re.escape(p)}encoder\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise _error("no encoder layers")
    fc1 = next((state_dict[k] for k in (f"{p}encoder.layers.0.ffn.A.fc1.weight", f"{p}encoder.layers.0.ffn.fc1.weight")
                if k in state_dict), None)
    if fc1 is None:
        raise _error("no FFN in layer 0 (a mixture-of-experts BEiT-3 is not supported)")
    image_rows = state_dict[f"{p}encoder.embed_positions.A.weight"].shape[0] - POSITION_OFFSET  # N + 1
    grid = math.isqrt(image_rows - 1)
    if grid * grid != image_rows - 1:
        raise _error(f"the image position table has {image_rows - 1} patch rows, not a square grid")
    subln = f"{p}encoder.layers.0.self_attn.inner_attn_ln.A.weight" in state_dict
    if opts.get("deepnorm"):
        norm = "deepnorm"
    elif subln:
        norm = "subln"
    else:
        norm = "pre" if opts.get("encoder_normalize_before", True) else "post"
    if opts.get("encoder_attention_heads") is not None and heads is None:
        heads = int(opts["encoder_attention_heads"])
    heads = heads if heads is not None else max(1, width // 64)
    return BEiT3Config(
        vocab_size=int(vocab), embed_dim=int(width), layers=max(layer_ids) + 1, heads=heads, ffn_dim=int(fc1.shape[0]),
        img_size=grid * int(conv.shape[-1]), patch_size=int(conv.shape[-1]), in_chans=int(conv.shape[1]),
        max_text_positions=int(state_dict[f"{p}encoder.embed_positions.B.weight"].shape[0]) - POSITION_OFFSET,
        norm=norm, norm_eps=float(opts.get("layernorm_eps", 1e-5)), activation=_activation(opts),
        task=_task(state_dict), num_classes=int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 1000)


def _activation(opts: Mapping[str, Any]) -> str:
    name = opts.get("activation_fn", "gelu")
    if name not in ("gelu", "relu", "swish"):
        raise _error(f"activation_fn={name!r} has no scaleformer counterpart")
    return name


def _task(state_dict: Mapping[str, Tensor]) -> str:
    if "head.weight" in state_dict:
        return "classification"
    if "vision_head.weight" in state_dict or "language_head.weight" in state_dict:
        return "retrieval"
    return "backbone"


def convert_beit3(state_dict: Mapping[str, Tensor], ts_config: Any = None, *,
                  heads: int | None = None) -> tuple[BEiT3Config, dict[str, Tensor]]:
    """(our config, our state dict) for a TorchScale BEiT-3 state dict or a released checkpoint's ``model``.
    Tensors are cloned; a key with no counterpart is an error naming it."""
    config = beit3_config_from_weights(state_dict, ts_config, heads=heads)
    p = _backbone_prefix(state_dict)
    ours_prefix = "" if config.task == "backbone" else "beit3."
    ours: dict[str, Tensor] = {}
    leftovers = []
    for key, tensor in state_dict.items():
        if key in _HEADS and config.task != "backbone":
            ours[_HEADS[key]] = tensor.detach().clone()
            continue
        name = _backbone_key(key[len(p):]) if key.startswith(p) else None
        if name is None:
            leftovers.append(key)
            continue
        value = tensor[POSITION_OFFSET:] if name.endswith("_positions.weight") else tensor
        ours[ours_prefix + name] = value.detach().clone()
    if f"{p}encoder.output_projection.weight" in leftovers:
        raise _error("it has an output projection over the vocabulary on every token (TorchScale builds one unless "
                     "no_output_layer=True, which BEiT-3 sets); drop encoder.output_projection.weight to convert "
                     "the rest")
    if leftovers:
        raise _error(f"no scaleformer counterpart for {', '.join(sorted(leftovers)[:8])}"
                     f"{' ...' if len(leftovers) > 8 else ''}")
    ours[f"{ours_prefix}encoder.embed_tokens.weight"] = ours[f"{ours_prefix}text_embed.weight"]  # one tensor, two names
    return config, ours


def _backbone_key(rest: str) -> str | None:
    if rest in ("text_embed.weight", "vision_embed.proj.weight", "vision_embed.proj.bias", "vision_embed.cls_token",
                "vision_embed.mask_token"):
        return rest
    if rest == "encoder.embed_positions.A.weight":
        return "image_positions.weight"
    if rest == "encoder.embed_positions.B.weight":
        return "text_positions.weight"
    layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
    if layer:
        renamed = rename_by_rules(rest[layer.end():], TRANSFORMER_LAYER_RULES)
        return None if renamed is None else f"encoder.blocks.{layer[1]}.{renamed}"
    if rest.startswith("encoder.layer_norm."):
        return "encoder." + str(rename_by_rules(rest[len("encoder."):], STACK_RULES))
    return None  # layernorm_embedding, relative position bias, MoE, output projections: not BEiT-3's


def load_beit3(state_dict: Mapping[str, Tensor], ts_config: Any = None, *, heads: int | None = None) -> nn.Module:
    """A scaleformer BEiT-3 (with the checkpoint's task head; eval mode), loaded strictly."""
    config, ours = convert_beit3(state_dict, ts_config, heads=heads)
    model = build_beit3(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise _error(f"weights missing for {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()
