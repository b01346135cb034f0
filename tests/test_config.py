import json

import pytest

import scaleformer as sf
from scaleformer.config import ConfigError


def test_unknown_option_names_the_closest():
    with pytest.raises(ConfigError, match=r"unknown option `layer` for TransformerConfig; did you mean `layers`\?"):
        sf.TransformerConfig(layer=3)
    with pytest.raises(ConfigError, match="did you mean `embed_dim`"):
        sf.load_preset("gpt-tiny", embed_dimm=32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(embed_dim=100, heads=3), r"heads \(3\) must divide embed_dim \(100\)"),
    (dict(norm="pree"), r"TransformerConfig.norm must be one of 'pre' \| 'post' \| 'deepnorm' \| 'subln', got 'pree'; did you mean `pre`\?"),
    (dict(position="xpso"), "did you mean `xpos`"),
    (dict(layers="12"), r"TransformerConfig.layers must be an int, got '12' \(str\)"),
    (dict(layers=0), "layers must be >= 1, got 0"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
    (dict(tie_embeddings=1), "tie_embeddings must be bool"),
    (dict(embed_dim=12, heads=4, position="rope"), r"embed_dim/heads \(12/4 = 3\) must be even"),
    (dict(arch="encoder", blockwise_causal_block=256), "blockwise_causal_block applies to causal attention"),
    (dict(arch="decoder", decoder_layers=3), "decoder_layers is only meaningful for arch='encoder_decoder'"),
    (dict(arch="encoder_decoder", multiway=2), "multiway > 1 is supported for arch='encoder' and 'decoder'"),
    (dict(position="relative", relative_buckets=32, relative_max_distance=16), "relative_max_distance \\(16\\) must exceed"),
    (dict(norm_eps=float("nan")), "norm_eps must be a finite float"),
])
def test_invalid_values_name_the_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sf.TransformerConfig(**kwargs)


def test_config_errors_are_value_errors_and_configs_are_frozen():
    assert issubclass(ConfigError, ValueError)
    cfg = sf.load_preset("gpt-tiny")
    with pytest.raises(AttributeError):
        cfg.layers = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        sf.TransformerConfig("decoder")  # keyword-only


def test_nothing_is_rewritten():
    cfg = sf.TransformerConfig(arch="encoder_decoder", layers=3, decoder_layers=None, dropout=0)
    assert cfg.decoder_layers is None and cfg.num_decoder_layers == 3 and cfg.dropout == 0


@pytest.mark.parametrize("name", sf.list_presets())
def test_presets_round_trip_through_dict_and_json(name):
    cfg = sf.load_preset(name)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    assert sf.config_from_dict(json.loads(cfg.to_json())) == cfg
    # the family is the config's own (read from it, not guessed from the preset's name)
    assert cfg.to_dict()["family"] == type(cfg).family and type(sf.config_from_dict(cfg.to_dict())) is type(cfg)


def test_from_dict_rejects_unknown_keys_and_families():
    data = sf.load_preset("gpt-tiny").to_dict()
    with pytest.raises(ConfigError, match="did you mean `vocab_size`"):
        sf.TransformerConfig.from_dict({**data, "vocab_sise": 3})
    with pytest.raises(ConfigError, match="unknown config family `retnett`"):
        sf.config_from_dict({**data, "family": "retnett"})


def test_presets_and_overrides():
    required = {"gpt-tiny", "bert-tiny", "mt-tiny", "gpt-base", "bert-base", "mt-base"}
    assert required <= set(sf.list_presets())
    for name in ("gpt-base", "bert-base", "mt-base"):
        cfg = sf.load_preset(name)
        assert (cfg.embed_dim, cfg.heads, cfg.layers, cfg.ffn_dim) == (768, 12, 12, 3072)
    assert {sf.load_preset(n).arch for n in ("gpt-tiny", "bert-tiny", "mt-tiny")} == {"decoder", "encoder", "encoder_decoder"}
    cfg = sf.load_preset("gpt-tiny", layers=3, norm="deepnorm")
    assert cfg.layers == 3 and cfg.norm == "deepnorm"
    with pytest.raises(ConfigError, match="unknown preset 'gpt-tinny'; did you mean `gpt-tiny`"):
        sf.load_preset("gpt-tinny")


@pytest.mark.parametrize("name", ["gpt-tiny", "bert-tiny", "mt-tiny"])
def test_tiny_presets_build_and_run(name):
    import torch

    model = sf.build(sf.load_preset(name))
    ids = torch.randint(0, 512, (2, 6))
    out = model(ids, ids[:, :4]) if name == "mt-tiny" else model(ids)
    assert out.logits.shape == (2, 4 if name == "mt-tiny" else 6, 512)
    assert out.aux_loss is not None and out.aux_loss.item() == 0.0
    assert torch.isfinite(out.logits).all()
