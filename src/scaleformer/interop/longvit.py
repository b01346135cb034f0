"""LongViT weights in TorchScale's layout (its LongViT example: a patch embedding, a position table and
TorchScale's LongNet encoder, under ``model.``, with ``fc_norm`` and ``head``; pretraining checkpoints hold
the same under ``backbone.`` or ``module.backbone.`` beside a self-supervised projection head).

What the weights show is read from them: width, patch size and channels (the patch conv), the position
grid (so the image size), depth, FFN width, Sub-LN, the number of classes. What they do not: heads
(LongViT-small's 16 by default), dilation rates (1, 2, 4, 8, 16) and segment lengths (the rule for the
image size, :func:`scaleformer.models.longvit.default_segments`). TorchScale's LongNet gives head h the
dilation offset ⌊h / ⌈H/r⌉⌋, so converted models use ``head_offsets="grouped"``.

Not checked here against TorchScale itself: its LongNet encoder is in no release on PyPI and needs flash-attn
or xformers on a GPU (see :mod:`scaleformer.models.longvit`, which reports what an audit that ran it found).
The key mapping is tested by a round trip and the grouped offsets against an emulation of TorchScale's head
layout. A converted model takes TorchScale's classifier-norm epsilon (1e-5) and its source's segment lengths
at any image size.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from scaleformer.interop.torchscale import TRANSFORMER_LAYER_RULES, rename_by_rules
from scaleformer.models.longvit import LongViT, LongViTConfig, default_segments

__all__ = ["convert_longvit", "load_longvit"]

_PREFIXES = ("module.backbone.", "backbone.", "model.")
TORCHSCALE_FC_NORM_EPS = 1e-5  # the example's classifier norm is a plain nn.LayerNorm


def _error(message: str) -> ValueError:
    return ValueError(f"cannot convert this LongViT checkpoint: {message}")


def convert_longvit(state_dict: Mapping[str, Tensor], *, heads: int = 16, img_size: int | None = None,
                    segment_lengths: tuple[int, ...] | None = None,
                    ) -> tuple[LongViTConfig, dict[str, Tensor], list[str]]:
    """(our config, our state dict, the checkpoint keys left out: a self-supervised projection head).
    ``img_size``: build the model for another image size, its position table resized bicubically (as
    TorchScale's example does when it fine-tunes at a larger size). The segment lengths stay the source's
    (those of its own image size, :func:`~scaleformer.models.longvit.default_segments`), as TorchScale's
    model keeps them at any input size, so the converted model computes what its source computed;
    ``segment_lengths`` overrides them, with a warning that it then does not."""
    backbone: dict[str, Tensor] = {}
    heads_out: dict[str, Tensor] = {}
    skipped = []
    for key, tensor in state_dict.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), "")
        rest = key[len(prefix):]
        if rest in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
            heads_out[rest] = tensor
        elif rest.startswith("head.") or rest.startswith("teacher.") or rest.startswith("student."):
            skipped.append(key)
        else:
            backbone[rest] = tensor
    for needed in ("patch_embed.proj.weight", "pos_embed"):
        if needed not in backbone:
            raise _error(f"no {needed} (is it a LongViT state dict?)")
    conv, table = backbone["patch_embed.proj.weight"], backbone["pos_embed"]  # (D, C, p, p), (1, N, D)
    grid = math.isqrt(table.shape[1])
    if grid * grid != table.shape[1]:
        raise _error(f"the position table has {table.shape[1]} rows, not a square grid")
    layers = {int(m[1]) for k in backbone if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if not layers or "encoder.layers.0.ffn.fc1.weight" not in backbone:
        raise _error("no encoder layers with an FFN")
    patch = int(conv.shape[-1])
    size = img_size if img_size is not None else grid * patch
    if size % patch:
        raise _error(f"img_size {size} is not a multiple of the patch size {patch}")
    source_segments = default_segments(grid * grid)
    if segment_lengths is not None and tuple(segment_lengths) != source_segments:
        warnings.warn(f"segment_lengths {tuple(segment_lengths)} override the source's {source_segments}: the "
                      "converted model will not compute what the checkpoint computed", stacklevel=2)
    config = LongViTConfig(
        img_size=size, patch_size=patch, in_chans=int(conv.shape[1]), embed_dim=int(conv.shape[0]),
        layers=max(layers) + 1, heads=heads, ffn_dim=int(backbone["encoder.layers.0.ffn.fc1.weight"].shape[0]),
        norm="subln" if "encoder.layers.0.self_attn.inner_attn_ln.weight" in backbone else "pre",
        num_classes=int(heads_out["head.weight"].shape[0]) if "head.weight" in heads_out else 0,
        head_offsets="grouped", segment_lengths=tuple(segment_lengths or source_segments),
        fc_norm_eps=TORCHSCALE_FC_NORM_EPS)
    ours: dict[str, Tensor] = {}
    leftovers = []
    for key, tensor in backbone.items():
        name = _backbone_key(key)
        if name is None:
            leftovers.append(key)
        else:
            ours[name] = tensor.detach().clone()
    if leftovers:
        raise _error(f"no scaleformer counterpart for {', '.join(sorted(leftovers)[:8])}"
                     f"{' ...' if len(leftovers) > 8 else ''}")
    if size != grid * patch:
        new = size // patch
        resized = F.interpolate(table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float(), size=(new, new),
                                mode="bicubic", align_corners=False)
        ours["pos_embed"] = resized.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(table.dtype)
    if config.num_classes == 0:
        heads_out = {k: v for k, v in heads_out.items() if k.startswith("fc_norm.")}
    ours.update({k: v.detach().clone() for k, v in heads_out.items()})
    return config, ours, skipped


def _backbone_key(rest: str) -> str | None:
    if rest in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return rest.replace("patch_embed.proj.", "patch_embed.")
    if rest == "pos_embed":
        return rest
    layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
    if layer:
        renamed = rename_by_rules(rest[layer.end():], TRANSFORMER_LAYER_RULES)
        return None if renamed is None else f"encoder.blocks.{layer[1]}.{renamed}"
    return None


def load_longvit(state_dict: Mapping[str, Tensor], **options) -> LongViT:
    """A scaleformer LongViT (eval mode) with a LongViT checkpoint's weights, loaded strictly. A pretraining
    checkpoint has no ``fc_norm``: it stays at its initialisation (weight 1, bias 0)."""
    config, ours, _ = convert_longvit(state_dict, **options)
    model = LongViT(config)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    allowed = {"_embedding.weight", "encoder.embed_tokens.weight", "fc_norm.weight", "fc_norm.bias"}
    missing = [m for m in missing if m not in allowed or (m.startswith("fc_norm.") and config.num_classes)]
    if missing or unexpected:
        raise _error(f"weights missing for {missing[:8]}, unexpected {unexpected[:8]}")
    return model.eval()

