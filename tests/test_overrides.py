"""Dotted overrides: any option of a model reachable from the command line (`--model-options`, compare's
`+KEY=VALUE`, reproduce's `--set`), every error naming the path with a did-you-mean."""

import json

import pytest

import scaleformer as sf
from scaleformer.config import ConfigError
from scaleformer.overrides import apply_overrides, parse_options, steps
from scaleformer.train.trainer import with_options


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


def test_a_flat_preset_becomes_the_model_config_it_builds_when_a_path_reaches_its_layers():
    import torch

    windowed = with_options(sf.load_preset("gpt-tiny"), parse_options(("layers[*].mixer.window=8",)))
    assert isinstance(windowed, sf.ModelConfig) and {layer.mixer.window for layer in windowed.layers} == {8}
    # the conversion changes nothing else: without the override it is the same model, weight for weight
    plain = with_options(sf.load_preset("gpt-tiny"), parse_options(("layers[*].mixer.window=null",)))
    torch.manual_seed(0)
    flat = sf.build(sf.load_preset("gpt-tiny")).eval()
    converted = sf.build(plain).eval()
    converted.load_state_dict(flat.state_dict())
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(converted(ids).logits, flat(ids).logits)
    # top-level and nested keys of a flat preset stay flat
    moe = with_options(sf.load_preset("gpt-moe-tiny"), parse_options(("moe.experts=8", "layers=3")))
    assert isinstance(moe, sf.TransformerConfig) and moe.moe.experts == 8 and moe.layers == 3


@pytest.mark.parametrize("preset, option, message", [
    ("gpt-tiny", "layers[*].mixer.windw=8", "layers[0].mixer: unknown option `windw`; did you mean `window`?"),
    ("gpt-tiny", "layers[5].mixer.window=8", "index 5 is out of range: `layers` has 2 items"),
    ("gpt-tiny", "posiiton=5", "did you mean `position`?"),
    ("gpt-tiny", "layers[*].mixer.window=-1", "layers[0].mixer: window must be >= 1 or None, got -1"),
    ("gpt-tiny", "position.base=5", "position: unknown option `base`; options: max_positions"),  # learned ones
    ("tnl-tiny", "multiway.ways=2", "`multiway` is None, which has no option `ways`: give the whole object"),
    ("mt-tiny", "layers[0].mixer.window=8", "an encoder-decoder builds two stacks"),
    ("s2-tiny", 'layers[1].ffn={"kind": "moe", "expert": {"ffn_dim": 64}}', "layers[1].ffn.expert: needs a `kind`"),
    ("s2-tiny", "layers[0:0].mixer.heads=2", "selects none of the 2 items of `layers`"),
])
def test_every_error_names_the_path(preset, option, message):
    with pytest.raises(ConfigError) as error:
        with_options(sf.load_preset(preset), parse_options((option,)))
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
