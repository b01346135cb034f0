"""LongNet models: dilated attention on the Transformer family — reference, cached decoding, padding."""

import pytest
import torch

import scaleformer as sf
from tests.conftest import assert_close, decode_step_by_step, fast_and_reference, make_model, tiny

PATTERNS = {
    "geometric": ((4, 8, 16), (1, 2, 4)),
    "ragged": ((3, 7, 64), (1, 3, 5)),  # lengths not multiples of w, r not dividing w, w beyond the sequence
}


def longnet(arch="decoder", patterns="geometric", **overrides):
    segments, rates = PATTERNS[patterns]
    base = dict(norm="subln", position="xpos", attention="dilated", segment_lengths=segments, dilation_rates=rates)
    base.update(overrides)
    return tiny(arch, **base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
@pytest.mark.parametrize("patterns", PATTERNS)
def test_fast_model_matches_reference_model(patterns, arch, dtype):
    cfg = longnet(arch, patterns)
    fast, ref = fast_and_reference(cfg, dtype)
    ids = torch.randint(0, 97, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :5] = 0
    out_fast, out_ref = fast(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(out_fast[real], out_ref[real], dtype)
    (out_fast[real] ** 2).sum().backward()
    (out_ref[real] ** 2).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in fast.named_parameters():
        assert_close(param.grad, ref_grads[name].grad, dtype)


@pytest.mark.parametrize("patterns", PATTERNS)
@pytest.mark.parametrize("prefill", [1, 6])
def test_cached_decoding_equals_full_forward_at_every_position(patterns, prefill):
    model = make_model(longnet(patterns=patterns))
    ids = torch.randint(0, 97, (2, 22))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits)


def test_left_padded_prefill_and_decoding_equal_unpadded_rows():
    model = make_model(longnet(patterns="ragged"))
    rows = [torch.randint(0, 97, (n,)) for n in (12, 5, 9)]
    ids, mask = torch.zeros(3, 12, dtype=torch.long), torch.zeros(3, 12, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 12 - len(row):], mask[i, 12 - len(row):] = row, 1
    out = model(ids, attention_mask=mask, use_cache=True)
    steps = torch.randint(0, 97, (3, 4))
    decoded = torch.cat([model(steps[:, t:t + 1], cache=out.cache).logits for t in range(4)], 1)
    assert not torch.isnan(out.logits).any() and not torch.isnan(decoded).any()
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, steps[i]])[None]).logits[0]
        assert_close(out.logits[i, 12 - len(row):], alone[:len(row)])
        assert_close(decoded[i], alone[len(row):])


def test_generate_with_longnet_and_dilation_matters():
    model = make_model(longnet())
    prompt = torch.randint(0, 97, (2, 6))
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(sf.generate(model, prompt, 10), ids)
    dense = make_model(tiny(norm="subln", position="xpos"))
    dense.load_state_dict(model.state_dict())
    long_ids = torch.randint(0, 97, (1, 20))
    assert not torch.allclose(dense(long_ids).logits, model(long_ids).logits, atol=1e-3)


def test_presets_and_config_errors():
    base = sf.load_preset("longnet-base")
    mixer = base.layers[0].mixer
    assert (base.embed_dim, mixer.heads, len(base.layers), base.residual.kind, base.position.kind) == (768, 12, 12, "subln", "xpos")
    assert mixer.segment_lengths == (2048, 4096, 8192, 16384, 32768) and mixer.dilation_rates == (1, 2, 4, 6, 12)
    model = sf.build(sf.load_preset("longnet-tiny"))
    assert model(torch.randint(0, 512, (1, 300))).logits.shape == (1, 300, 512)
    encoder = sf.build(sf.load_preset("longnet-tiny", causal=False))
    assert encoder(torch.randint(0, 512, (1, 300))).logits.shape == (1, 300, 512)
    with pytest.raises(sf.ConfigError, match="must include 1"):
        sf.load_preset("longnet-tiny", dilation_rates=(2, 2, 4))
    with pytest.raises(sf.ConfigError, match="dilated attention does not support a T5 relative bias"):
        sf.load_preset("longnet-tiny", position="relative")
    with pytest.raises(sf.ConfigError, match=r"segment_lengths=\(4,\) changes nothing in this model"):
        sf.load_preset("gpt-tiny", segment_lengths=(4,), dilation_rates=(1,))
    with pytest.raises(sf.ConfigError, match="does not support position='relative'"):  # an old flat config too
        sf.TransformerConfig(attention="dilated", segment_lengths=(4,), dilation_rates=(1,), position="relative")
    assert sf.config_from_dict(base.to_dict()) == base
