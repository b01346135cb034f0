"""Dotted overrides: any option of a model reachable from the command line (`--model-options`, compare's
`+KEY=VALUE`, reproduce's `--set`), every error naming the path with a did-you-mean."""

import json

import pytest

import scaleformer as sf
from scaleformer.config import ConfigError
from scaleformer.overrides import apply_overrides, parse_options, steps
from scaleformer.models.families import with_options
from scaleformer.presets import preset_with_options


def test_paths_parse_into_names_indices_and_slices():
    assert steps("layers[1::2].ffn") == ["layers", slice(1, None, 2), "ffn"]
    assert steps("layers[*].mixer.window") == ["layers", slice(None), "mixer", "window"]
    assert steps("a[-1][0:2].b") == ["a", -1, slice(0, 2), "b"]
    for bad in ("layers[x]", "layers[1:2:0]", "layers.", ".a", "a b", "a[1:2:3:4]"):
        with pytest.raises(ConfigError):
            steps(bad)
    assert parse_options(("a.b=3", 'c={"kind": "glu"}', "d=text")) == {"a.b": 3, "c": {"kind": "glu"}, "d": "text"}
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_options(("window",))


def test_overrides_set_exactly_the_selected_items_and_leave_the_input_alone():
    data = {"layers": [{"mixer": {"window": None}} for _ in range(5)], "position": {"kind": "rope", "base": 1.0}}
    before = json.dumps(data)
    out = apply_overrides(data, {"layers[1::2].mixer.window": 8, "layers[-1].mixer.window": 2, "position.base": 5.0})
    assert [layer["mixer"]["window"] for layer in out["layers"]] == [None, 8, None, 8, 2]
    assert out["position"] == {"kind": "rope", "base": 5.0} and json.dumps(data) == before


def test_a_layer_list_model_is_changed_per_layer():
    cfg = with_options(sf.load_preset("s2-tiny"), parse_options((
        "layers[*].mixer.kv_heads=2", "position.base=500000",
        'layers[1::2].ffn={"kind": "moe", "expert": {"kind": "glu", "ffn_dim": 64}, "routing": {"experts": 8}}')))
    assert [layer.mixer.kv_heads for layer in cfg.layers] == [2, 2] and cfg.position == sf.RoPE(base=500000)
    assert isinstance(cfg.layers[0].ffn, sf.MLP) and cfg.layers[1].ffn.routing.experts == 8


def test_knobs_and_paths_mix_on_a_preset():
    """A key naming a knob of the preset's family function sets it (a path into a knob that holds a config
    too); any other key is a path into the model config the function returns."""
    cfg = preset_with_options("gpt-moe-tiny", parse_options(("moe.experts=8", "layers=3", "position=rope",
                                                             "layers[2].mixer.window=4")))
    assert len(cfg.layers) == 3 and cfg.position == sf.RoPE() and cfg.layers[1].ffn.routing.experts == 8
    assert [layer.mixer.window for layer in cfg.layers] == [None, None, 4]
    assert cfg == sf.load_preset("gpt-moe-tiny", moe=sf.MoEConfig(experts=8, top_k=1), layers=3, position="rope").replace(
        layers=cfg.layers)
    pair = preset_with_options("mt-tiny", parse_options(("decoder.layers[*].mixer.window=4", "decoder_layers=3")))
    assert [layer.mixer.window for layer in pair.decoder.layers] == [4, 4, 4] and len(pair.encoder.layers) == 2
    with pytest.raises(ConfigError, match="`moe` is None, which has no option `experts`"):
        preset_with_options("gpt-tiny", parse_options(("moe.experts=8",)))


def test_an_old_flat_config_file_takes_its_own_options_then_paths():
    """A JSON config of an earlier version: its own fields first, as it reads them, then paths into the model
    config it builds."""
    flat = sf.TransformerConfig(vocab_size=512, embed_dim=64, heads=4, ffn_dim=128, layers=2)
    cfg = with_options(flat, parse_options(("layers=3", "layers[*].mixer.window=8")))
    assert isinstance(cfg, sf.ModelConfig) and [layer.mixer.window for layer in cfg.layers] == [8, 8, 8]


@pytest.mark.parametrize("preset, option, message", [
    ("gpt-tiny", "layers[*].mixer.windw=8", "layers[0].mixer: unknown option `windw`; did you mean `window`?"),
    ("gpt-tiny", "layers[5].mixer.window=8", "index 5 is out of range: `layers` has 2 items"),
    ("gpt-tiny", "posiiton=5", "did you mean `position`?"),
    ("gpt-tiny", "layers[*].mixer.window=-1", "layers[0].mixer: window must be >= 1 or None, got -1"),
    ("gpt-tiny", "position.base=5", "position: unknown option `base`; options: max_positions"),  # learned ones
    ("tnl-tiny", "multiway.ways=2", "`multiway` is None, which has no option `ways`: give the whole object"),
    ("mt-tiny", "layers[0].mixer.window=8", "unknown option `layers`; options: encoder, decoder"),
    ("s2-tiny", 'layers[1].ffn={"kind": "moe", "expert": {"ffn_dim": 64}}', "layers[1].ffn.expert: needs a `kind`"),
    ("s2-tiny", "layers[0:0].mixer.heads=2", "selects none of the 2 items of `layers`"),
])
def test_every_error_names_the_path(preset, option, message):
    with pytest.raises(ConfigError) as error:
        preset_with_options(preset, parse_options((option,)))
    assert message in str(error.value)


def test_the_command_line_takes_paths_everywhere(tmp_path, capsys):
    import argparse

    from scaleformer import compare
    from scaleformer.cli import main
    from scaleformer.reproduce.common import override
    from scaleformer.train.trainer import model_config

    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(["s2-tiny+layers[1].mixer.window=4+position.kind=xpos"])
    with pytest.raises(ConfigError, match="`position.kind` says which component this is"):
        model_config(compare._train_config(args, args.models[0], tmp_path))
    args = parser.parse_args(["gpt-tiny+layers[1].mixer.window=4"])
    cfg = model_config(compare._train_config(args, args.models[0], tmp_path))
    assert [layer.mixer.window for layer in cfg.layers] == [None, 4]
    assert override({"widths": [32, 48], "steps": 5}, {"widths[0]": 16}) == {"widths": [16, 48], "steps": 5}
    with pytest.raises(ConfigError, match="setting `widths` takes numbers"):
        override({"widths": [32, 48]}, {"widths[1]": "wide"})
    assert main(["reproduce", "mqar", "--quick", "--out", str(tmp_path), "--set", "widthz[0]=16"]) == 2
    assert "unknown setting `widthz`; did you mean `widths`?" in capsys.readouterr().err
