"""DeepNorm and Sub-LN: the constants, and exactly which weights they scale, for all three architectures."""

import math

import pytest
import torch

import scaleformer as sf
from scaleformer.layers.scaling import residual_scaling
from tests.conftest import tiny


def test_deepnorm_constants():
    # Decoder-only and encoder-only, 6 layers: α = (2·6)^(1/4), β = (8·6)^(-1/4).
    for side, arch in (("decoder", "decoder"), ("encoder", "encoder")):
        s = residual_scaling("deepnorm", side, arch, 6, 6)
        assert s.alpha == pytest.approx(12 ** 0.25) and s.gain == pytest.approx(48 ** -0.25)
    # Encoder-decoder, N = 18 encoder layers, M = 6 decoder layers.
    enc = residual_scaling("deepnorm", "encoder", "encoder_decoder", 18, 6)
    dec = residual_scaling("deepnorm", "decoder", "encoder_decoder", 18, 6)
    assert enc.alpha == pytest.approx(0.81 * (18**4 * 6) ** (1 / 16))
    assert enc.gain == pytest.approx(0.87 * (18**4 * 6) ** (-1 / 16))
    assert enc.alpha == pytest.approx(1.86611, abs=1e-4) and enc.gain == pytest.approx(0.37763, abs=1e-4)
    assert dec.alpha == pytest.approx(18 ** 0.25) and dec.gain == pytest.approx(72 ** -0.25)
    assert dec.cross_gain == dec.gain  # DeepNorm scales cross-attention's value/output too


def test_subln_constants():
    assert residual_scaling("subln", "decoder", "decoder", 4, 4).gain == pytest.approx(math.sqrt(math.log(8)))
    assert residual_scaling("subln", "encoder", "encoder", 4, 4).gain == pytest.approx(math.sqrt(math.log(8)))
    enc = residual_scaling("subln", "encoder", "encoder_decoder", 6, 3)
    dec = residual_scaling("subln", "decoder", "encoder_decoder", 6, 3)
    assert enc.gain == pytest.approx(math.sqrt(math.log(9) * math.log(12) / 3))
    assert dec.gain == pytest.approx(math.sqrt(math.log(9)))
    assert enc.alpha == dec.alpha == 1.0 and dec.cross_gain == 1.0  # Magneto: no cross-attention rescaling
    assert residual_scaling("pre", "decoder", "decoder", 4, 4).gain == 1.0


def _weights(cfg, seed=0):
    torch.manual_seed(seed)
    return dict(sf.build(cfg).named_parameters())


SCALED = ("mixer.v_proj.weight", "mixer.out_proj.weight", "fc1.weight", "fc2.weight", "gate.weight")
UNSCALED = ("mixer.q_proj.weight", "mixer.k_proj.weight")


def _check_ratios(base, scaled, side_gain, cross_gain):
    checked = 0
    for name, weight in scaled.items():
        if not name.endswith("weight") or "norm" in name or "embed" in name or "table" in name:
            continue
        side = "encoder" if name.startswith("encoder.") else "decoder"
        if name.endswith(SCALED):
            expected = side_gain[side]
        elif "cross_attn.v_proj" in name or "cross_attn.out_proj" in name:
            expected = cross_gain
        else:
            assert name.endswith(UNSCALED) or "cross_attn" in name, name
            expected = 1.0
        torch.testing.assert_close(weight, base[name] * expected, rtol=1e-6, atol=0)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("arch", ["encoder", "decoder", "encoder_decoder"])
def test_deepnorm_scales_exactly_ffn_value_and_output(arch):
    extra = dict(decoder_layers=2, layers=4) if arch == "encoder_decoder" else dict(layers=3)
    post = _weights(tiny(arch, norm="post", ffn="glu", activation="swish", **extra))
    deep = _weights(tiny(arch, norm="deepnorm", ffn="glu", activation="swish", **extra))
    n, m = extra["layers"], extra.get("decoder_layers", extra["layers"])
    gains = {side: residual_scaling("deepnorm", side, arch, n, m).gain for side in ("encoder", "decoder")}
    _check_ratios(post, deep, gains, gains["decoder"])


@pytest.mark.parametrize("arch", ["encoder", "decoder", "encoder_decoder"])
def test_subln_scales_ffn_value_output_and_adds_inner_norms(arch):
    extra = dict(decoder_layers=2, layers=4) if arch == "encoder_decoder" else dict(layers=3)
    pre = _weights(tiny(arch, norm="pre", **extra))
    subln = _weights(tiny(arch, norm="subln", **extra))
    n, m = extra["layers"], extra.get("decoder_layers", extra["layers"])
    gains = {side: residual_scaling("subln", side, arch, n, m).gain for side in ("encoder", "decoder")}
    _check_ratios(pre, subln, gains, 1.0)
    inner = [name for name in subln if "inner_norm" in name]
    assert inner and all(name not in pre for name in inner)
    assert not any("cross_attn.inner_norm" in name for name in inner)  # cross-attention: input norm only


def test_deepnorm_uses_alpha_in_the_residual():
    cfg = tiny("decoder", norm="deepnorm", layers=3)
    torch.manual_seed(0)
    model = sf.build(cfg)
    alphas = {block.alpha for block in model.decoder.blocks}
    assert len(alphas) == 1 and alphas.pop() == pytest.approx(6 ** 0.25)
    assert model.decoder.final_norm is None  # Post-LN already ends on a norm
