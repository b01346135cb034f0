"""DIFF Transformer V2: the layer is the published formula written out by hand (pairs of adjacent query
heads inside one key/value group, a token-wise sigmoid λ, no per-head norm), and not the cross-group pairing
the authors warn against; decoding, padding, packed documents and the reference kernels agree."""

import math

import pytest
import torch

import scaleformer as sf
from scaleformer.layers.diff_attention import DifferentialAttentionV2
from tests.conftest import (assert_close, assert_fast_equals_reference, assert_rows_alone, decode_step_by_step,
                            make_model, tiny)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, DifferentialAttentionV2)]


def _by_hand(layer, x, *, heads, kv_heads, pairs):
    """The V2 layer in float64 from its definition: RoPE (rotating channel pairs 2i, 2i+1) on 2h query heads
    and h_kv key heads of width d; a_j = softmax(q_j K_gᵀ/√d + causal) V_g with g = ⌊j / (2h / h_kv)⌋; output
    head i = a_{pairs(i)[0]} − sigmoid(λ_{t,i}) a_{pairs(i)[1]}, λ_t = W_λ x_t; concatenated, then W_O."""
    b, t, width = x.shape
    d = width // heads
    q = (x @ layer.q_proj.weight.T).view(b, t, 2 * heads, d).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T).view(b, t, kv_heads, d).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T).view(b, t, kv_heads, d).transpose(1, 2)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)

    def rope(z):
        even, odd = z[..., 0::2], z[..., 1::2]
        return torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1).flatten(-2)

    q, k = rope(q), rope(k)
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    per_group = 2 * heads // kv_heads
    a = [torch.softmax(q[:, j] @ k[:, j // per_group].transpose(-1, -2) / math.sqrt(d) + causal, -1) @ v[:, j // per_group]
         for j in range(2 * heads)]
    lam = torch.sigmoid(x @ layer.lambda_proj.weight.T)  # (B, T, h)
    out = [a[first] - lam[..., i, None] * a[second] for i, (first, second) in enumerate(pairs(heads))]
    return torch.cat(out, -1) @ layer.out_proj.weight.T


def _adjacent(heads):
    return [(2 * i, 2 * i + 1) for i in range(heads)]


def _across_groups(heads):  # the "wrong implementation": attn[:, :h] against attn[:, h:]
    return [(i, i + heads) for i in range(heads)]


def test_the_layer_is_the_published_formula_and_not_the_cross_group_pairing():
    torch.manual_seed(0)
    model = make_model(tiny(attention="diff2", position="rope", kv_heads=2, bias=False, layers=1), dtype=torch.float64)
    layer = _layers(model)[0]
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    ctx = model.decoder.context(torch.zeros(2, 7, dtype=torch.long), None, None, None, None)
    out = layer(x, ctx)
    assert_close(out, _by_hand(layer, x, heads=4, kv_heads=2, pairs=_adjacent), torch.float64)
    wrong = _by_hand(layer, x, heads=4, kv_heads=2, pairs=_across_groups)
    # head i and head i + h read different key/value groups here (4 query heads per group of 8): far apart
    assert (out - wrong).abs().max() > 1e-2 * out.abs().max()


def test_no_per_head_norm_and_twice_the_query_heads():
    dense, v2 = sf.build(tiny(position="rope", bias=False)), sf.build(tiny(attention="diff2", position="rope", bias=False))
    layer = _layers(v2)[0]
    assert (layer.heads, layer.head_dim, tuple(layer.q_proj.weight.shape)) == (4, 8, (64, 32))
    assert not any("norm" in name for name, _ in layer.named_parameters())
    # per layer: W_Q doubles (32·32 more) and W_λ adds 32·4
    extra = 2 * (32 * 32 + 32 * 4)
    assert sum(p.numel() for p in v2.parameters()) == sum(p.numel() for p in dense.parameters()) + extra


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("options", [{}, {"kv_heads": 2}, {"kv_heads": 1, "window": 3}])
def test_prefill_then_steps_equal_the_full_forward(impl, options):
    model = make_model(tiny(attention="diff2", attention_impl=impl, position="rope", **options))
    ids = torch.randint(0, 97, (2, 11))
    for prefill in (1, 5):
        assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits)


def test_left_padding_and_packed_documents_change_nothing():
    assert_rows_alone(make_model(tiny(attention="diff2", position="rope", kv_heads=2)), [8, 3, 5])


def test_fast_path_and_reference_agree_on_logits_and_gradients():
    grads = assert_fast_equals_reference(lambda impl: make_model(tiny(attention="diff2", attention_impl=impl,
                                                                      position="rope", kv_heads=2), dtype=torch.float64))
    assert grads["decoder.blocks.0.mixer.lambda_proj.weight"].abs().sum() > 0  # λ is learned


def test_config_errors_preset_and_round_trip(tmp_path):
    with pytest.raises(sf.ConfigError, match="layers.0.: differential attention V2 does not support a T5 relative bias"):
        sf.transformer(attention="diff2", position="relative", embed_dim=32, heads=4)
    with pytest.raises(sf.ConfigError, match=r"kv_heads \(3\) must be >= 1 and divide heads \(4\)"):
        sf.DiffAttentionV2(heads=4, kv_heads=3)
    config = sf.load_preset("diff2-tiny")
    assert config.layers[0].mixer == sf.DiffAttentionV2(heads=4, bias=True)
    model = sf.build(config)
    ids = torch.randint(0, 512, (2, 6))
    sf.save(model, tmp_path / "m")
    assert torch.equal(sf.load(tmp_path / "m")(ids).logits, model(ids).logits)
    assert sf.ModelConfig.from_dict(config.to_dict()) == config
