"""DIFF Transformer's differential attention in every family: the layer is the paper's formula, cached
decoding and padding are exact, half the heads give a Transformer's parameter count."""

import math

import pytest
import torch

import scaleformer as sf
from scaleformer.layers.diff_attention import DifferentialAttention, lambda_init_for_depth
from tests.conftest import (assert_close, assert_fast_equals_reference, decode_step_by_step,
                            decode_target_step_by_step, make_model, tiny)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, DifferentialAttention)]


def test_lambda_init_follows_depth_and_matches_the_paper():
    assert lambda_init_for_depth(1) == pytest.approx(0.2)
    assert lambda_init_for_depth(4) == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    model = make_model(tiny(attention="diff", layers=3))
    assert [layer.lambda_init for layer in _layers(model)] == [pytest.approx(lambda_init_for_depth(d)) for d in (1, 2, 3)]
    fixed = sf.build(sf.ModelConfig(vocab_size=97, embed_dim=32, layers=(sf.LayerConfig(
        mixer=sf.DiffAttention(heads=2, lambda_init=0.5)),)))
    assert _layers(fixed)[0].lambda_init == 0.5


def test_half_the_heads_match_a_transformers_parameters():
    diff = sf.build(tiny(attention="diff"))
    dense = sf.build(tiny())
    extra = sum(4 * layer.head_dim + 2 * layer.head_dim for layer in _layers(diff))  # λ vectors, head norm
    assert sum(p.numel() for p in diff.parameters()) == sum(p.numel() for p in dense.parameters()) + extra
    assert [(layer.diff_heads, layer.head_dim) for layer in _layers(diff)] == [(2, 8), (2, 8)]


def test_the_layer_is_the_papers_formula_written_out():
    """Against the DIFF paper's equations, computed independently of our ops: RoPE on 2h component heads,
    maps softmax(Q_c K_cᵀ/√d + causal), λ from its four vectors, per-head RMSNorm (affine), × (1 − λ_init)."""
    torch.manual_seed(0)
    model = make_model(tiny(attention="diff", position="rope", layers=1), dtype=torch.float64)
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.head_norm.weight.normal_()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    ctx = model.decoder.context(torch.zeros(2, 6, dtype=torch.long), None, None, None, None)
    out = layer(x, ctx)
    h, d, t = 2, 8, 6
    q = (x @ layer.q_proj.weight.T + layer.q_proj.bias).view(2, t, 2 * h, d).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T + layer.k_proj.bias).view(2, t, 2 * h, d).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T + layer.v_proj.bias).view(2, t, h, 2 * d).transpose(1, 2)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    def rope(z):  # rotate channel pairs (2i, 2i+1)
        even, odd = z[..., 0::2], z[..., 1::2]
        return torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1).flatten(-2)
    q, k = rope(q), rope(k)
    causal = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    maps = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, -1).view(2, h, 2, t, t)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + layer.lambda_init)
    attn = (maps[:, :, 0] - lam * maps[:, :, 1]) @ v
    attn = attn * torch.rsqrt(attn.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.head_norm.weight
    expected = (attn * (1 - layer.lambda_init)).transpose(1, 2).reshape(2, t, 32) @ layer.out_proj.weight.T \
        + layer.out_proj.bias
    assert_close(out, expected, torch.float64)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("prefill", [1, 5])
@pytest.mark.parametrize("options", [{}, {"kv_heads": 2}, {"window": 3}, {"position": "xpos"}])
def test_prefill_then_steps_equal_the_full_forward(impl, prefill, options):
    model = make_model(tiny(attention="diff", attention_impl=impl, **{"position": "rope", **options}))
    ids = torch.randint(0, 97, (2, 11))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits)


def test_grouped_query_cache_holds_the_key_value_component_heads():
    model = make_model(tiny(attention="diff", kv_heads=2, position="rope"))
    out = model(torch.randint(0, 97, (1, 5)), use_cache=True)
    # 2 layers × K and V × (2 key/value heads × 2 components) × 5 tokens × 8 wide × fp32
    assert out.cache.nbytes() == 2 * 2 * 2 * 5 * 8 * 4


def test_left_padded_rows_equal_unpadded_rows():
    model = make_model(tiny(attention="diff", position="rope"))
    rows = [torch.randint(0, 97, (n,)) for n in (8, 3, 5)]
    ids, mask = torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 8 - len(row):], mask[i, 8 - len(row):] = row, 1
    out = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        assert_close(out[i, 8 - len(row):], model(row[None]).logits[0])


def test_fast_path_and_reference_models_agree_on_logits_and_gradients():
    grads = assert_fast_equals_reference(lambda impl: make_model(tiny(attention="diff", attention_impl=impl,
                                                                      position="rope"), dtype=torch.float64))
    assert grads["decoder.blocks.0.mixer.lambda_q1"].abs().sum() > 0  # λ is learned


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_every_family(arch):
    model = make_model(tiny(arch, attention="diff", position="rope"))
    ids = torch.randint(0, 97, (2, 7))
    if arch == "encoder":
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        out = model(ids, attention_mask=mask).logits
        assert_close(out[1, :5], model(ids[1:, :5]).logits[0])  # right padding is invisible both ways
    else:
        full = model(ids, ids[:, :6]).logits
        assert full.shape == (2, 6, 97) and len(_layers(model)) == 4  # encoder and decoder self-attention
        assert_close(decode_target_step_by_step(model, ids, ids[:, :6], 2)[0], full)


def test_config_errors_and_preset(tmp_path):
    with pytest.raises(sf.ConfigError, match="heads .* must be even"):
        tiny(attention="diff", heads=1)
    with pytest.raises(sf.ConfigError, match="does not support position='relative'"):
        tiny(attention="diff", position="relative")
    with pytest.raises(sf.ConfigError, match=r"2 × heads \(6\) must divide embed_dim"):
        sf.ModelConfig(vocab_size=97, embed_dim=32, layers=(sf.LayerConfig(mixer=sf.DiffAttention(heads=3)),))
    model = sf.build(sf.load_preset("diff-tiny"))
    ids = torch.randint(0, 512, (2, 6))
    sf.save(model, tmp_path / "m")
    assert torch.equal(sf.load(tmp_path / "m")(ids).logits, model(ids).logits)
    data = sf.model_config(sf.load_preset("diff-tiny")).to_dict()
    assert data["layers"][0]["mixer"]["kind"] == "diff_attention"
    assert sf.ModelConfig.from_dict(data) == sf.model_config(sf.load_preset("diff-tiny"))


def test_packed_documents_equal_separate_rows():
    model = make_model(tiny(attention="diff", position="rope"))
    a, b = torch.randint(0, 97, (4,)), torch.randint(0, 97, (6,))
    packed = model(torch.cat([a, b])[None], document_ids=torch.tensor([[0] * 4 + [1] * 6])).logits[0]
    assert_close(packed[:4], model(a[None]).logits[0])
    assert_close(packed[4:], model(b[None]).logits[0])
