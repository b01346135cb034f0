import json

import pytest

import scaleformer as sf
from scaleformer.config import ConfigError
from scaleformer.models.families import arch_of
from scaleformer.presets import preset_function, preset_knobs


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
        sf.ModelConfig.from_dict({**data, "vocab_sise": 3})
    with pytest.raises(ConfigError, match="unknown config family `retnett`"):
        sf.config_from_dict({**data, "family": "retnett"})


def test_presets_and_overrides():
    required = {"gpt-tiny", "bert-tiny", "mt-tiny", "gpt-base", "bert-base", "mt-base"}
    assert required <= set(sf.list_presets())
    for name in ("gpt-base", "bert-base", "mt-base"):
        cfg = sf.load_preset(name)
        stack = cfg.decoder if isinstance(cfg, sf.EncoderDecoderConfig) else cfg
        sizes = {(len(stack.layers), layer.mixer.heads, layer.ffn.ffn_dim) for layer in stack.layers}
        assert cfg.embed_dim == 768 and sizes == {(12, 12, 3072)}
    assert [arch_of(sf.load_preset(n)) for n in ("gpt-tiny", "bert-tiny", "mt-tiny")] == ["decoder", "encoder", "encoder_decoder"]
    cfg = sf.load_preset("gpt-tiny", layers=3, norm="deepnorm")
    assert len(cfg.layers) == 3 and cfg.residual == sf.DeepNorm.for_depth(3)
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


def test_every_preset_is_its_family_function_called_with_its_knobs():
    """A preset is data: the family function and the knobs it sets, and what it returns is a model config."""
    for name in sf.list_presets():
        cfg = sf.load_preset(name)
        assert isinstance(cfg, (sf.ModelConfig, sf.EncoderDecoderConfig))
        # and every knob it sets is read (the function's own check: one that changed nothing would raise)
        assert preset_function(name)(**preset_knobs(name)) == cfg


def test_knobs_are_checked_like_options():
    with pytest.raises(ConfigError, match=r"transformer\(\) has no knob `windw`; did you mean `window`"):
        sf.transformer(windw=4)
    with pytest.raises(ConfigError, match=r"transformer\(\).position must be one of .*got 'rotary'"):
        sf.transformer(position="rotary")
    with pytest.raises(ConfigError, match=r"transformer\(\).layers must be an int, got '2'"):
        sf.transformer(layers="2")
    # JSON from a command line: objects become the configs a knob takes, lists its tuples
    moe = sf.load_preset("gpt-tiny", moe={"experts": 4, "top_k": 1}, segment_lengths=[8, 16], dilation_rates=[1, 2],
                         attention="dilated")
    assert isinstance(moe.layers[1].ffn, sf.MoE) and moe.layers[0].mixer.segment_lengths == (8, 16)


@pytest.mark.parametrize("preset,knobs,unread", [
    ("gpt-tiny", dict(causal=False, momentum=0.5), "momentum=0.5"),  # momentum sums earlier tokens: causal only
    ("longnet-tiny", dict(window=16), "window=16"),  # dilated attention has no window
    ("yoco-tiny", dict(window=64), "window=64"),  # a gated-retention self-decoder has no window
    ("gpt-tiny", dict(rope_base=5e5), "rope_base=500000.0"),  # learned positions do not rotate
])
def test_a_knob_that_changes_nothing_is_an_error(preset, knobs, unread):
    with pytest.raises(ConfigError, match=f"{unread} changes nothing in this model"):
        sf.load_preset(preset, **knobs)
    with pytest.raises(ConfigError, match="decay='retnet' has none"):  # the layer config itself refuses it
        sf.load_preset("retnet-tiny", decay_temperature=4.0)
    # the preset's own knobs are not held to it: gpt-tiny's max_positions does nothing once positions rotate
    assert sf.load_preset("gpt-tiny", position="rope").position == sf.RoPE()
