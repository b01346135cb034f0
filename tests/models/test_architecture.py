"""A model is data: typed layer configs, round trips, nested errors, the flat configs as constructors, and
hybrid stacks (MoE every second layer, dense and dilated alternating, retention then attention) with every
equivalence the single-kind models have."""

import dataclasses
import inspect

import pytest
import torch

import scaleformer as sf
from scaleformer.cache import KVCache, RetentionState
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.presets import preset_function, preset_knobs
from tests.conftest import assert_close, decode_step_by_step

WIDTH = dict(vocab_size=97, embed_dim=32)


def _model(cfg, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = sf.build(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


SMALL = dict(vocab_size=97, embed_dim=32, heads=2, ffn_dim=24, layers=2)


def _small_knobs(name):
    """A preset's knobs at test size (its structure kept)."""
    family, knobs = preset_function(name).__name__, preset_knobs(name)
    if family == "retnet":
        return {**knobs, **SMALL, "value_dim": 24}
    if family == "yoco":
        return {**knobs, **SMALL, "self_heads": 2, "kv_heads": 1}
    segments = (4, 8, 16, 32, 64)[:len(knobs["dilation_rates"])]
    return {**knobs, **SMALL, "max_positions": 64, "segment_lengths": segments}


def _flat(family, knobs):
    """The flat config of an earlier version with these options."""
    if family == "transformer":
        causal = knobs.pop("causal")
        return sf.TransformerConfig(arch="decoder" if causal else "encoder", **knobs)
    if family == "encoder_decoder":
        return sf.TransformerConfig(arch="encoder_decoder", **knobs)
    if family == "yoco":  # it wrote each self-decoder option only for its own kind (and has no later knob)
        fields = {f.name for f in dataclasses.fields(sf.YOCOConfig)}
        return sf.YOCOConfig(**{k: v for k, v in knobs.items() if k in fields
                                and knobs["self_decoder"] in sf.YOCOConfig.ONLY_FOR.get(k, (knobs["self_decoder"],))})
    return sf.RetNetConfig(**knobs)


#: presets made after the flat configs were frozen (issue 33): no file of an earlier version holds them
NEWER_THAN_FLAT_CONFIGS = {"diff2-tiny", "yoco-mamba2-tiny"}


@pytest.mark.parametrize("preset", [p for p in sf.list_presets() if p.endswith("tiny") and p not in NEWER_THAN_FLAT_CONFIGS
                                    and preset_function(p).__name__ in ("transformer", "encoder_decoder", "retnet", "yoco")])
def test_an_old_flat_config_reads_as_the_model_config_its_preset_function_builds(preset):
    """A config.json of an earlier version (a flat config) is the model config the preset's family function
    builds from the same options, and the model it built takes the new model's weights and computes the same."""
    family, knobs = preset_function(preset).__name__, _small_knobs(preset)
    data = inspect.unwrap(preset_function(preset))(**knobs)
    flat = _flat(family, dict(knobs))
    assert sf.model_config(flat) == data
    assert type(data).from_json(data.to_json()) == data  # round trip, tagged unions included
    assert sf.config_from_dict(data.to_dict()) == data
    old, new = _model(flat), sf.build(data).eval()
    new.load_state_dict(old.state_dict())  # the same parameter names and shapes
    ids = torch.randint(0, 97, (2, 9))
    if family == "encoder_decoder":
        assert torch.equal(old(ids, ids).logits, new(ids, ids).logits)
    else:
        assert torch.equal(old(ids).logits, new(ids).logits)


def test_nested_errors_name_the_path_and_suggest():
    data = sf.ModelConfig(layers=sf.uniform(sf.LayerConfig(mixer=sf.Attention(heads=4)), 2), **WIDTH).to_dict()
    data["layers"][1]["mixer"]["heds"] = 4
    with pytest.raises(sf.ConfigError, match=r"layers\[1\]\.mixer: unknown option `heds` for Attention; did you mean `heads`"):
        sf.ModelConfig.from_dict(data)
    data["layers"][1]["mixer"] = {"kind": "atention"}
    with pytest.raises(sf.ConfigError, match=r"layers\[1\]\.mixer: unknown kind 'atention'.*did you mean `attention`"):
        sf.ModelConfig.from_dict(data)
    with pytest.raises(sf.ConfigError, match=r"layers\[0\]: heads \(5\) must divide embed_dim \(32\)"):
        sf.ModelConfig(layers=(sf.LayerConfig(mixer=sf.Attention(heads=5)),), **WIDTH)


def test_an_option_that_cannot_apply_cannot_be_written():
    with pytest.raises(sf.ConfigError, match="unknown option `window` for DilatedAttention"):
        sf.DilatedAttention(window=4)
    with pytest.raises(sf.ConfigError, match="unknown option `kv_heads` for Retention"):
        sf.Retention(kv_heads=1)
    with pytest.raises(sf.ConfigError, match="unknown option `experts` for GLU"):
        sf.GLU(experts=4)
    with pytest.raises(sf.ConfigError, match="retention is causal"):
        sf.ModelConfig(causal=False, layers=(sf.LayerConfig(mixer=sf.Retention(value_dim=24)),), **WIDTH)


def test_moe_every_second_layer():
    dense = sf.LayerConfig(mixer=sf.Attention(heads=4), ffn=sf.GLU(ffn_dim=48))
    layers = sf.every(2, sf.uniform(dense, 4), lambda layer: layer.replace(
        ffn=sf.MoE(expert=sf.GLU(ffn_dim=24), routing=sf.RouterConfig(experts=3, top_k=2))))
    model = _model(sf.ModelConfig(layers=layers, position=sf.RoPE(), **WIDTH))
    assert [isinstance(b.ffn, MoEFeedForward) for b in model.decoder.blocks] == [False, True, False, True]
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids)
    assert out.aux_loss > 0
    assert_close(decode_step_by_step(model, ids, 4), out.logits)


def test_dense_every_other_layer_and_dilated_in_between():
    dense = sf.LayerConfig(mixer=sf.Attention(heads=4))
    dilated = sf.LayerConfig(mixer=sf.DilatedAttention(heads=4, segment_lengths=(2, 4), dilation_rates=(1, 2)))
    cfg = sf.ModelConfig(layers=(dense, dilated, dense, dilated), position=sf.XPos(scale_base=16.0), **WIDTH)
    model = _model(cfg)
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids).logits
    assert_close(decode_step_by_step(model, ids, 3), full)
    only_dense = _model(cfg.replace(layers=(dense,) * 4))
    only_dense.load_state_dict(model.state_dict())
    assert not torch.allclose(only_dense(ids).logits, full, atol=1e-4)  # the dilated layers really are dilated


def test_retention_first_half_then_attention():
    retention = sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48, chunk_size=3), ffn=sf.GLU(ffn_dim=48, bias=False))
    attention = sf.LayerConfig(mixer=sf.Attention(heads=4, kv_heads=2))
    cfg = sf.ModelConfig(layers=(retention, retention, attention, attention), position=sf.RoPE(), **WIDTH)
    model = _model(cfg)
    cache = model.new_cache()
    assert [type(layer) for layer in cache.layers] == [RetentionState, RetentionState, KVCache, KVCache]
    ids = torch.randint(0, 97, (3, 10))
    full = model(ids).logits
    assert_close(decode_step_by_step(model, ids, 4), full)
    for form in ("parallel", "recurrent"):
        assert_close(model(ids, form=form).logits, full)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the row's tokens get the logits they get alone
    assert_close(model(ids, attention_mask=mask).logits[1, 4:], model(ids[1:2, 4:]).logits[0])
    documents = torch.tensor([[0] * 4 + [1] * 6] * 3)
    packed = model(ids, document_ids=documents).logits
    assert_close(packed[:, 4:], model(ids[:, 4:]).logits)


def test_a_model_config_saves_and_loads(tmp_path):
    cfg = sf.ModelConfig(layers=(sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48)),
                                 sf.LayerConfig(mixer=sf.Attention(heads=4, window=4))),
                         residual=sf.DeepNorm.for_depth(2), norm_type="rmsnorm", **WIDTH)
    model = _model(cfg)
    sf.save(model, tmp_path / "hybrid")
    loaded = sf.load(tmp_path / "hybrid").eval()
    assert loaded.config == cfg
    ids = torch.randint(0, 97, (2, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_residual_constants_for_depth():
    deep, sub = sf.DeepNorm.for_depth(6), sf.SubLN.for_depth(6)
    assert deep.alpha == pytest.approx(12**0.25) and deep.beta == pytest.approx(48**-0.25)
    assert sub.gamma == pytest.approx(torch.log(torch.tensor(12.0)).sqrt().item())
    flat = sf.model_config(sf.TransformerConfig(layers=6, norm="deepnorm", **WIDTH, heads=4, ffn_dim=48))
    assert flat.residual == deep
    pair = sf.model_config(sf.TransformerConfig(arch="encoder_decoder", **WIDTH, heads=4, ffn_dim=48))
    assert isinstance(pair, sf.EncoderDecoderConfig) and not pair.encoder.causal and pair.decoder.causal
    assert sf.model_config(pair, "encoder") == pair.encoder


def test_combinations_that_cannot_be_built_fail_at_construction():
    retention = sf.LayerConfig(mixer=sf.Retention(heads=2, value_dim=48))
    with pytest.raises(sf.ConfigError, match="T5 relative bias is one table.*no attention layers"):
        sf.ModelConfig(layers=(retention,), position=sf.T5Bias(), **WIDTH)
    with pytest.raises(sf.ConfigError, match="rotary positions.*one head width"):
        sf.ModelConfig(layers=(sf.LayerConfig(mixer=sf.Attention(heads=4)), sf.LayerConfig(mixer=sf.Attention(heads=2))),
                       position=sf.RoPE(), **WIDTH)
    decoder_side = sf.ModelConfig(layers=(sf.LayerConfig(mixer=sf.Attention(heads=4), cross_attention=sf.Attention(heads=4)),),
                                  **WIDTH)
    with pytest.raises(sf.ConfigError, match="decoder side of an encoder-decoder"):
        sf.build(decoder_side)
    with pytest.raises(ValueError, match="form='parallel' chooses how retention layers run.*; this model has none"):
        _model(sf.ModelConfig(layers=(sf.LayerConfig(mixer=sf.Attention(heads=4)),), **WIDTH))(
            torch.randint(0, 97, (1, 4)), form="parallel")
