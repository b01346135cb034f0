"""Momentum attention (arXiv 2212.10559): MoAttn(V, K, q_t) = Attn(V, K, q_t) + Σ_{i<t} η^{t−i} v_i. The
layer against the formula written out, and every equivalence a decoder keeps."""

import pytest
import torch

import scaleformer as sf
from scaleformer.cache import MomentumKVCache
from scaleformer.layers.attention import MomentumAttention, Projections, SoftmaxAttention
from scaleformer.layers.context import Context
from tests.conftest import assert_close, decode_step_by_step, decode_target_step_by_step, make_model, tiny


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_the_layer_is_the_formula_written_out(kv_heads):
    torch.manual_seed(0)
    eta = 0.7
    projections = Projections(embed_dim=32, heads=4, kv_heads=kv_heads)
    layer = MomentumAttention(projections, momentum=eta).double()
    plain = SoftmaxAttention(projections).double()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    positions = torch.arange(9).expand(2, 9)
    ctx = lambda: Context(positions=positions, key_positions=positions, causal=True)  # noqa: E731
    v = (x @ layer.v_proj.weight.T + layer.v_proj.bias).view(2, 9, kv_heads or 4, 8).transpose(1, 2)
    t = torch.arange(9)
    weights = torch.where(t[None, :] < t[:, None], eta ** (t[:, None] - t[None, :]).double(), 0.0)  # (T, T): i < t
    momentum = (weights @ v).repeat_interleave(4 // (kv_heads or 4), dim=1)  # each key/value head serves its group
    attention = plain(x, ctx())
    expected = attention + (momentum.transpose(1, 2).reshape(2, 9, 32)) @ layer.out_proj.weight.T
    assert_close(layer(x, ctx()), expected, torch.float64)


@pytest.mark.parametrize("options", [{}, {"kv_heads": 2}, {"window": 4}, {"position": "xpos"}])
@pytest.mark.parametrize("prefill", [1, 6])
def test_prefill_then_steps_equal_the_full_forward(options, prefill):
    model = make_model(tiny(**{"position": "rope", "momentum": 0.6, **options}), torch.float64)
    ids = torch.randint(0, 97, (2, 13))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits, torch.float64)


def test_left_padding_packing_and_the_cache():
    model = make_model(tiny(position="rope", momentum=0.6), torch.float64)
    rows = [torch.randint(0, 97, (n,)) for n in (9, 4)]
    ids, mask = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    out = model(ids, attention_mask=mask, use_cache=True)
    for i, row in enumerate(rows):
        assert_close(out.logits[i, 9 - len(row):], model(row[None]).logits[0], torch.float64)
    step = torch.randint(0, 97, (2, 1))
    following = model(step, cache=out.cache).logits[:, 0]
    for i, row in enumerate(rows):
        assert_close(following[i], model(torch.cat([row, step[i]])[None]).logits[0, -1], torch.float64)
    assert all(isinstance(part, MomentumKVCache) and part.momentum.shape == (2, 4, 1, 8) for part in out.cache.layers)
    packed = model(torch.cat(rows)[None], document_ids=torch.tensor([[0] * 9 + [1] * 4])).logits[0]
    assert_close(packed[:9], model(rows[0][None]).logits[0], torch.float64)
    assert_close(packed[9:], model(rows[1][None]).logits[0], torch.float64)
    out.cache.reorder(torch.tensor([1, 1]))  # beam search moves the momentum sums with the keys
    assert torch.equal(out.cache.layers[0].momentum[0], out.cache.layers[0].momentum[1])


def test_encoder_decoder_and_config():
    model = make_model(tiny("encoder_decoder", momentum=0.5), torch.float64)
    src, tgt = torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 6))
    assert_close(decode_target_step_by_step(model, src, tgt, 2)[0], model(src, tgt).logits, torch.float64)
    from scaleformer.layers.attention import MomentumAttention

    assert not any(isinstance(b.mixer, MomentumAttention) for b in model.encoder.blocks)
    assert all(isinstance(b.mixer, MomentumAttention) and b.mixer.momentum == 0.5 for b in model.decoder.blocks)
    with pytest.raises(sf.ConfigError, match=r"momentum \(η\) must be in \(0, 1\)"):
        tiny(momentum=1.0)
    with pytest.raises(sf.ConfigError, match="bidirectional"):
        tiny("encoder", momentum=0.5)
    with pytest.raises(sf.ConfigError, match="not attention='diff'"):
        tiny(attention="diff", position="rope", momentum=0.5)
    with pytest.raises(sf.ConfigError, match="needs causal=True"):
        sf.ModelConfig(vocab_size=97, embed_dim=32, causal=False,
                       layers=(sf.LayerConfig(mixer=sf.Attention(heads=4, momentum=0.5)),))
