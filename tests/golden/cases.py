"""The golden cases: every preset (shrunk in width and depth) and every norm × position combination, plus
the options presets do not reach. What each case computes is in :func:`compute`; ``make_golden.py`` stores
it, and ``test_golden.py`` recomputes it from the stored checkpoint and compares.

They pin the model code's behaviour before it is restructured (issue 14): weights are stored as
``sf.save`` directories, so the comparison is independent of initialisation order and also proves that
checkpoints written by this code keep loading.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.config import MoEConfig
from scaleformer.models.families import arch_of
from scaleformer.presets import preset_function, preset_knobs

VOCAB, LENGTH, PREFILL = 61, 12, 7
NORMS = ("pre", "post", "deepnorm", "subln")
POSITIONS = ("absolute", "sinusoidal", "rope", "xpos", "relative", "none")


def _shrink_knobs(family: str, knobs: dict) -> dict:
    """A family function's knobs at golden size: the structure (arch, norm, position, MoE, dilation rates)
    kept. (These are the flat configs' fields, shrunk as the code that wrote the fixtures shrank them.)"""
    if family == "yoco":
        return dict(knobs, vocab_size=VOCAB, embed_dim=16, layers=4, self_heads=2, heads=2, kv_heads=1, ffn_dim=24,
                    chunk_size=5)
    common = dict(vocab_size=VOCAB, embed_dim=16, heads=2, ffn_dim=24, layers=min(knobs["layers"], 3))
    if family == "retnet":
        return dict(knobs, value_dim=24, chunk_size=5, dropout=0.0, **common)
    changes = dict(common, max_positions=64, xpos_scale_base=16.0, relative_buckets=8, relative_max_distance=16)
    if knobs["attention"] == "dilated":  # segments scaled to the golden length, rates kept (r <= w)
        changes["segment_lengths"] = tuple(max(4 * 2**i, r) for i, r in enumerate(knobs["dilation_rates"]))
    if knobs["moe"] is not None:
        changes["moe"] = knobs["moe"].replace(router_dim=8)
    return dict(knobs, **changes)


def _shrink_model(cfg):
    """A model config at golden size: each layer's mixer and FFN kind kept, and the first layer that reads
    the positions (a 3:1 hybrid's attention)."""
    layers = cfg.layers[:3]
    readers = [i for i, layer in enumerate(cfg.layers) if layer.mixer.rotated_heads() is not None]
    if readers and readers[0] >= 3:
        layers = cfg.layers[:readers[0] + 1]
    return cfg.replace(vocab_size=VOCAB, embed_dim=16, layers=tuple(_shrink_layer(l) for l in layers))


#: the family functions whose presets shrink by their knobs (the flat configs' families); the others' model
#: configs shrink layer by layer
KNOB_SHRUNK = ("transformer", "encoder_decoder", "retnet", "yoco")


def _shrink(name: str):
    """A preset at golden size."""
    family = preset_function(name)
    if family.__name__ in KNOB_SHRUNK:
        return inspect.unwrap(family)(**_shrink_knobs(family.__name__, preset_knobs(name)))
    return _shrink_model(sf.load_preset(name))


# A layer at width 16: two heads (one key/value head where they are grouped), short chunks and blocks.
_SMALL_MIXER = {"heads": 2, "kv_heads": 1, "chunk_size": 5, "block": 2, "local_blocks": 2, "vert_stride": 2,
                "head_dim": 8, "state_dim": 4}


def _shrink_layer(layer):
    mixer = layer.mixer
    names = {f.name for f in dataclasses.fields(mixer)}
    small = dict(_SMALL_MIXER)
    if getattr(mixer, "window", None) is not None:  # a sliding window (Samba's) shrinks to 4, not to blocks
        small = {**{k: v for k, v in small.items() if k != "block"}, "window": 4}
    mixer = mixer.replace(**{k: v for k, v in small.items()
                             if k in names and (k != "kv_heads" or mixer.kv_heads is not None)})
    ffn = layer.ffn
    if ffn is not None:
        ffn = ffn.replace(expert=ffn.expert.replace(ffn_dim=24)) if ffn.kind == "moe" else ffn.replace(ffn_dim=24)
    return layer.replace(mixer=mixer, ffn=ffn)


def _transformer(arch: str = "decoder", **knobs):
    """A Transformer case by the flat config's options (unchecked: the golden sizes set options some
    positions do not read)."""
    if arch == "encoder_decoder":
        return inspect.unwrap(sf.encoder_decoder)(**knobs)
    return inspect.unwrap(sf.transformer)(causal=arch == "decoder", **knobs)


def cases() -> dict[str, object]:
    """name -> model config. Presets that shrink to the same config (TorchScale's RetNet sizes) appear once."""
    out: dict[str, object] = {}
    for name in sf.list_presets():
        cfg = _shrink(name)
        if cfg not in out.values():
            out[f"preset-{name}"] = cfg
    small = dict(vocab_size=VOCAB, embed_dim=16, layers=2, heads=2, ffn_dim=24, max_positions=64,
                 xpos_scale_base=16.0, relative_buckets=8, relative_max_distance=16)
    for norm in NORMS:
        for position in POSITIONS:
            out[f"decoder-{norm}-{position}"] = _transformer(norm=norm, position=position, **small)
    extra = {
        "encoder-multiway-relative": dict(arch="encoder", multiway=2, position="relative"),
        "encoder-multiway-all-scope": dict(arch="encoder", multiway=2, multiway_scope="all", norm="subln"),
        "encdec-relative-deepnorm": dict(arch="encoder_decoder", position="relative", norm="deepnorm",
                                         share_encoder_decoder_embeddings=False, tie_embeddings=False),
        "decoder-glu-rmsnorm-untied": dict(ffn="glu", activation="swish", norm_type="rmsnorm", tie_embeddings=False,
                                           scale_embeddings=True, embedding_norm=True, bias=False),
        "decoder-blockwise-xpos": dict(position="xpos", blockwise_causal_block=4),
        "decoder-moe-softmax-top2": dict(moe=MoEConfig(experts=3, top_k=2, router="softmax", every=1,
                                                       eval_capacity_factor=None)),
        "decoder-moe-xmoe-glu": dict(moe=MoEConfig(experts=4, top_k=1, router="xmoe", router_dim=8, every=1),
                                     ffn="glu"),
        "decoder-moe-torchscale-subln": dict(moe=MoEConfig(experts=2, top_k=2, router="xmoe_torchscale",
                                                           router_dim=8, layers=(1,)), norm="subln"),
        "longnet-ragged-bidirectional": dict(arch="encoder", attention="dilated", segment_lengths=(5, 10),
                                             dilation_rates=(1, 3), norm="subln", position="xpos"),
    }
    for name, options in extra.items():
        out[name] = _transformer(**{**small, **options})
    retnet = dict(vocab_size=VOCAB, embed_dim=16, value_dim=24, heads=2, ffn_dim=24, layers=2, chunk_size=5)
    out["retnet-deepnorm-paper-decay"] = sf.retnet(norm="deepnorm", decay="paper", **retnet)
    out["retnet-torchscale-normalizer"] = sf.retnet(normalizer="torchscale", tie_embeddings=False, **retnet)
    out["retnet-moe-every-layer"] = sf.retnet(moe=MoEConfig(experts=2, top_k=2, every=1, router_dim=8), **retnet)
    return out


FLOAT64 = {name for name in cases() if name.startswith("decoder-") and name.split("-")[1] in NORMS} | {
    "preset-retnet-tiny", "preset-mt-tiny", "preset-longnet-tiny"}


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2026)
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=generator)
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    source = torch.randint(1, VOCAB, (2, LENGTH - 2), generator=generator)
    return {"ids": ids, "mask": mask, "source": source}


def _kind(cfg) -> str:
    """What a case's model is: decoder-style models decode, encoders do not, encoder-decoders read a source."""
    return arch_of(cfg)


def compute(model, cfg, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits (padded batch), the gradients of one training loss, and (decoder-style models) the logits of
    prefill + one-token steps. ``model`` in eval mode; its dtype decides the computation's."""
    ids, mask, source = data["ids"], data["mask"], data["source"]
    kind = _kind(cfg)
    ways = cfg.ways if isinstance(cfg, sf.ModelConfig) else 1
    extra = {"multiway_split": 5} if ways > 1 else {}

    def forward(tokens, token_mask=None, **kwargs):
        if kind == "encoder_decoder":
            return model(source, tokens, tgt_mask=token_mask, **kwargs)
        return model(tokens, attention_mask=token_mask, **extra, **kwargs)

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["logits"] = forward(ids, mask).logits
    model.zero_grad(set_to_none=True)
    result = forward(ids)
    loss = F.cross_entropy(result.logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()) + result.aux_loss
    loss.backward()
    out["loss"] = loss.detach().reshape(1)
    for name, param in model.named_parameters():
        if param.grad is not None:
            out[f"grad/{name}"] = param.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    if kind != "encoder":
        with torch.no_grad():
            step = forward(ids[:, :PREFILL], mask[:, :PREFILL], use_cache=True)
            logits = [step.logits]
            for t in range(PREFILL, LENGTH):
                step = forward(ids[:, t:t + 1], mask[:, :t + 1], cache=step.cache)
                logits.append(step.logits)
        out["decoded"] = torch.cat(logits, dim=1)
    return {key: value.contiguous() for key, value in out.items()}
