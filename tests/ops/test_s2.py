"""S2-Attention: the block rule by hand, the kept-blocks fast path against the dense-mask reference (outputs
and gradients, fp32 and fp64, odd lengths, grouped heads, dense heads, user layouts), coverage of the heads'
shards, and models with S2 layers: cached decoding, padding, packing, the fast path against the reference."""

import itertools

import pytest
import torch

import scaleformer as sf
from scaleformer.ops.s2 import S2Layout, s2_attention, s2_attention_reference
from tests.conftest import assert_close, decode_step_by_step


def test_block_rule_by_hand():
    layout = S2Layout(block=4, local_blocks=2, vert_stride=4, head_offset=1, dense_heads=1)
    blocks = torch.arange(7)
    got = layout.blocks(3, blocks[:, None], blocks[None, :], causal=True)
    step = 1  # max(1, 4 // 3)
    for h, i, j in itertools.product(range(3), range(7), range(7)):
        rule = j <= i and (h < 1 or i - j < 2 or (j + h * step + 1) % 4 == 0)
        assert bool(got[h, i, j]) == rule, (h, i, j)
    both = layout.blocks(3, blocks[:, None], blocks[None, :], causal=False)
    assert bool(both[2, 0, 6]) == ((6 + 2 + 1) % 4 == 0) and bool(both[1, 3, 4])  # later blocks, either side


def _dkernel_block_mask(heads: int, blocks: int, local_blocks: int, vert_stride: int) -> torch.Tensor:
    """DKernel's causal block mask (the rule Phi-3-small's sparse attention uses), written out as it states it:
    key block j is kept for head h when (j + h·step + 1) mod vert_stride == 0, step = max(1, stride // heads),
    besides the local window."""
    step = max(1, vert_stride // heads)
    mask = torch.zeros(heads, blocks, blocks, dtype=torch.bool)
    for h in range(heads):
        for i in range(blocks):
            for j in range(i + 1):
                mask[h, i, j] = i - j < local_blocks or (j + h * step + 1) % vert_stride == 0
    return mask


def test_the_default_layout_is_dkernels_at_phi3_smalls_shape():
    """Phi-3-small: 32 heads, 16 local blocks, stride 8; 64 query and key blocks (4,096 positions of 64)."""
    blocks = torch.arange(64)
    expected = _dkernel_block_mask(32, 64, 16, 8)
    default = S2Layout(block=64, local_blocks=16, vert_stride=8)
    assert torch.equal(default.blocks(32, blocks[:, None], blocks[None, :], causal=True), expected)
    for config in (sf.S2Attention(heads=32), sf.S2Config(), sf.load_preset("s2-base").layers[0].mixer):
        assert config.head_offset == 1
    old = S2Layout(block=64, local_blocks=16, vert_stride=8, head_offset=0).blocks(32, blocks[:, None], blocks[None, :],
                                                                                   causal=True)
    assert int((old != expected).sum()) == 9408  # the audit's count of entries the earlier default got wrong
    assert bool(expected[0, 63, 7]) and not bool(expected[0, 63, 8])  # head 0 reads blocks 7, 15, 23, ...


def test_a_model_saved_with_the_earlier_offset_keeps_it(tmp_path):
    """Saved configs record every field: one written with offset 0 computes what it computed."""
    cfg = sf.load_preset("s2-tiny")
    layers = tuple(layer.replace(mixer=layer.mixer.replace(head_offset=0)) if layer.mixer.kind == "s2" else layer
                   for layer in cfg.layers)
    torch.manual_seed(0)
    model = sf.build(cfg.replace(layers=layers)).eval()
    sf.save(model, tmp_path / "m")
    loaded = sf.load(tmp_path / "m")
    assert loaded.config.layers[0].mixer.head_offset == 0
    ids = torch.randint(0, 512, (1, 70))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("heads_cover", [True, False])
def test_heterogeneous_heads_cover_every_earlier_block(heads_cover):
    heads = 4 if heads_cover else 2
    layout = S2Layout(block=4, local_blocks=1, vert_stride=4)
    blocks = torch.arange(20)
    union = layout.blocks(heads, blocks[:, None], blocks[None, :], causal=True).any(0)
    assert bool((union == (blocks[None, :] <= blocks[:, None])).all()) == heads_cover  # needs heads >= stride
    homo = S2Layout(block=4, local_blocks=1, vert_stride=4, homo_head=True)
    assert not bool(homo.blocks(4, blocks[:, None], blocks[None, :], causal=True).any(0).tril().all())


LAYOUTS = {
    "heterogeneous": S2Layout(block=4, local_blocks=2, vert_stride=3),
    "homo-dense-head": S2Layout(block=4, local_blocks=1, vert_stride=4, homo_head=True, dense_heads=1),
    "offset": S2Layout(block=5, local_blocks=2, vert_stride=2, head_offset=3),
    "custom-rule": S2Layout(block=3, custom=lambda i, j, h: (i - j).abs() <= h),
    "custom-mask": S2Layout(block=4, custom=torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(0)) < 0.4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_the_reference_with_gradients(name, causal, dtype):
    layout = LAYOUTS[name]
    q = torch.randn(2, 4, 37, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    fast = s2_attention(q, k, v, layout, causal=causal, budget_bytes=4096)  # a small budget: several groups
    ref = s2_attention_reference(q, k, v, layout, causal=causal)
    assert_close(fast, ref, dtype)
    weights = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                    torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("layout", [S2Layout(block=4, local_blocks=4, vert_stride=3, head_offset=1),
                                    S2Layout(block=3, local_blocks=3, vert_stride=2, homo_head=True, dense_heads=2)])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_windows_and_strides_with_padding_equal_the_reference(layout, padded):
    """Long enough that the sliding local windows and several vertical runs per head are used; padding
    anywhere in a row (real tokens take the slots in order, padding rows come out zero)."""
    q = torch.randn(2, 4, 53, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 4, 53, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    key_mask = torch.rand(2, 53, generator=torch.Generator().manual_seed(1)) < 0.8 if padded else None
    fast = s2_attention(q, k, v, layout, key_mask=key_mask)
    if key_mask is None:
        ref = s2_attention_reference(q, k, v, layout)
    else:
        positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
        mask = (key_mask[:, None, :] & key_mask[:, :, None])[:, None]
        ref = s2_attention_reference(q, k, v, layout, q_positions=positions, k_positions=positions, mask=mask)
        ref = ref * key_mask[:, None, :, None]
    assert_close(fast, ref, torch.float64)
    weights = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), (q, k, v)),
                    torch.autograd.grad((ref * weights).sum(), (q, k, v))):
        assert_close(a, b, torch.float64)


def test_bidirectional_padding_equals_the_reference():
    layout = LAYOUTS["offset"]
    q, k, v = (torch.randn(2, 4, 23, 8, dtype=torch.float64) for _ in range(3))
    key_mask = torch.tensor([[True] * 23, [True] * 14 + [False] * 9])
    mask = key_mask[:, None, None, :]
    ref = s2_attention_reference(q, k, v, layout, causal=False, mask=mask) * key_mask[:, None, :, None]
    assert_close(s2_attention(q, k, v, layout, causal=False, key_mask=key_mask), ref, torch.float64)


@pytest.mark.parametrize("name", ["heterogeneous", "homo-dense-head", "offset", "custom-mask", "custom-rule"])
def test_read_later_is_any_later_query_block(name):
    layout, heads, n = LAYOUTS[name], 4, 12
    blocks = torch.arange(n)
    reads = layout.blocks(heads, blocks[:, None], blocks[None, :], causal=True)  # (H, i, j)
    h = torch.arange(heads)[:, None, None]
    later = layout.read_later(heads, h, blocks[None, :, None], blocks[None, None, :])  # (H, first, j)
    for first in range(n):
        truth = reads[:, first:].any(1)  # (H, j)
        assert bool((later[:, first] >= truth).all())  # never drops a block a later query reads
        if not callable(layout.custom):  # and keeps nothing else (a callable layout keeps everything)
            assert bool((later[:, first] == truth).all()), (name, first)


def test_the_reference_is_dense_attention_under_the_mask_written_out():
    layout = LAYOUTS["heterogeneous"]
    q, k, v = (torch.randn(1, 4, 13, 8, dtype=torch.float64) for _ in range(3))
    out = s2_attention_reference(q, k, v, layout)
    for h, t in itertools.product(range(4), range(13)):
        seen = [s for s in range(t + 1) if layout.blocks(4, torch.tensor(t // 4), torch.tensor(s // 4), True)[h]]
        scores = (q[0, h, t] @ k[0, h, seen].T / 8**0.5).softmax(-1)
        assert_close(out[0, h, t], scores @ v[0, h, seen], torch.float64)


def s2_model(impl="sdpa", dtype=torch.float64, causal=True):
    mixer = sf.S2Attention(heads=4, kv_heads=2, block=4, local_blocks=2, vert_stride=3, dense_heads=1, impl=impl)
    cfg = sf.ModelConfig(vocab_size=97, embed_dim=32, position=sf.RoPE(), causal=causal,
                         layers=(sf.LayerConfig(mixer=mixer), sf.LayerConfig(mixer=sf.Attention(heads=4, kv_heads=2)),
                                 sf.LayerConfig(mixer=mixer)))
    torch.manual_seed(0)
    return sf.build(cfg).to(dtype).eval()


def test_model_fast_path_equals_the_reference_model_with_gradients():
    fast, ref = s2_model(), s2_model("reference")
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 97, (2, 29))
    results = []
    for model in (fast, ref):
        logits = model(ids).logits
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[0][0], results[1][0], torch.float64)
    for name, grad in results[0][1].items():
        assert_close(grad, results[1][1][name], torch.float64)


@pytest.mark.parametrize("prefill", [1, 10])
def test_prefill_then_steps_equal_the_full_forward(prefill):
    model = s2_model()
    ids = torch.randint(0, 97, (2, 31))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits, torch.float64)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_reduced_cache_holds_only_readable_blocks_and_decodes_exactly(kv_heads):
    """Left-padded rows decoded token by token equal the full forward, while each key/value head holds only
    the blocks one of its query heads can still read: counted exactly against the rule."""
    mixer = sf.S2Attention(heads=4, kv_heads=kv_heads, block=2, local_blocks=2, vert_stride=4)
    cfg = sf.ModelConfig(vocab_size=97, embed_dim=32, position=sf.RoPE(),
                         layers=(sf.LayerConfig(mixer=mixer), sf.LayerConfig(mixer=mixer)))
    torch.manual_seed(0)
    model = sf.build(cfg).to(torch.float64).eval()
    ids = torch.randint(0, 97, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    out = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
    logits = [out.logits]
    for t in range(7, 40):
        out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    stepped = torch.cat(logits, dim=1)
    assert_close(stepped[0], model(ids[:1]).logits[0], torch.float64)
    assert_close(stepped[1, 5:], model(ids[1:, 5:]).logits[0], torch.float64)
    out = model(ids[:1, :7], use_cache=True)
    for t in range(7, 40):
        out = model(ids[:1, t:t + 1], cache=out.cache, use_cache=True)
    cache = out.cache.layers[0]
    first = 39 // 2  # compacted when the last call (position 39) started
    group = 4 // kv_heads
    for g in range(kv_heads):
        held = sorted(p for p in cache.positions[0, g].tolist() if p >= 0)
        wanted = [p for p in range(40) if p // 2 > first - 2 or any(
            (p // 2 + h + 1) % 4 == 0 for h in range(g * group, (g + 1) * group))]  # the default offset, 1
        assert held == wanted
    per_slot = 2 * kv_heads * 8 * 8  # keys and values, fp64 head dim 8
    assert cache.full_nbytes() == 40 * per_slot and cache.nbytes() < cache.full_nbytes()


@pytest.mark.parametrize("causal", [True, False])
def test_padding_and_packed_documents(causal):
    model = s2_model(causal=causal)
    rows = [torch.randint(0, 97, (n,)) for n in (21, 9)]
    ids, mask = torch.zeros(2, 21, dtype=torch.long), torch.zeros(2, 21, dtype=torch.long)
    for i, row in enumerate(rows):
        if causal:  # left padding for a decoder, right padding for an encoder
            ids[i, 21 - len(row):], mask[i, 21 - len(row):] = row, 1
        else:
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
    out = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        got = out[i, 21 - len(row):] if causal else out[i, :len(row)]
        assert_close(got, model(row[None]).logits[0], torch.float64)
    packed = model(torch.cat(rows)[None], document_ids=torch.tensor([[0] * 21 + [1] * 9])).logits[0]
    assert_close(packed[21:], model(rows[1][None]).logits[0], torch.float64)


def test_presets_and_config_errors():
    tiny = sf.load_preset("s2-tiny")
    kinds = [layer.mixer.kind for layer in tiny.layers]
    assert kinds == ["s2", "attention"] and tiny.layers[0].mixer.kv_heads == 1
    assert sf.ModelConfig.from_dict(tiny.to_dict()) == tiny
    assert sf.build(tiny)(torch.randint(0, 512, (1, 70))).logits.shape == (1, 70, 512)
    base = sf.load_preset("s2-base").layers[0].mixer
    assert (base.block, base.local_blocks, base.vert_stride, base.heads // base.kv_heads) == (64, 16, 8, 4)
    with pytest.raises(sf.ConfigError, match="dense_heads must be in"):
        sf.S2Attention(heads=4, dense_heads=5)
    with pytest.raises(sf.ConfigError, match="S2 vert_stride must be >= 1"):
        sf.S2Attention(heads=4, vert_stride=0)
    with pytest.raises(sf.ConfigError, match="dense_heads and head_offset must be >= 0"):
        sf.S2Attention(heads=4, head_offset=-1)
    with pytest.raises(sf.ConfigError, match=r"layers\[0\]: S2-Attention does not support a T5"):
        sf.ModelConfig(vocab_size=97, embed_dim=32, position=sf.T5Bias(),
                       layers=(sf.LayerConfig(mixer=sf.S2Attention(heads=4)),))


def test_flat_config_s2_in_every_transformer_family():
    """attention="s2" in a flat TransformerConfig: S2 layers with dense ones in between (the hybrid stack),
    bidirectional in an encoder and causal in a decoder; the fast path equals the reference kernels, and an
    encoder-decoder decodes step by step (with the reduced cache) exactly as it runs whole."""
    from tests.conftest import decode_target_step_by_step
    s2 = sf.S2Config(block=4, local_blocks=2, vert_stride=4, dense_every=2)
    common = dict(vocab_size=61, embed_dim=32, heads=4, kv_heads=2, position="rope", attention="s2", s2=s2)
    for arch in ("encoder", "decoder", "encoder_decoder"):
        cfg = sf.TransformerConfig(arch=arch, layers=4, **common)
        torch.manual_seed(0)
        fast = sf.build(cfg).to(torch.float64).eval()
        ref = sf.build(cfg.replace(attention_impl="reference")).to(torch.float64).eval()
        ref.load_state_dict(fast.state_dict())
        ids = torch.randint(0, 61, (2, 27))
        args = (ids, ids[:, :19]) if arch == "encoder_decoder" else (ids,)
        assert_close(fast(*args).logits, ref(*args).logits, torch.float64)
        if arch == "encoder_decoder":
            stepped, cache = decode_target_step_by_step(fast, ids, ids[:, :19], 3)
            assert_close(stepped, fast(*args).logits, torch.float64)
            kinds = [type(layer).__name__ for layer in cache.layers]
            assert kinds == ["S2KVCache", "KVCache", "S2KVCache", "KVCache"]
    from scaleformer.models.families import model_config
    assert [layer.mixer.kind for layer in model_config(sf.TransformerConfig(layers=4, **common)).layers] == [
        "s2", "attention", "s2", "attention"]
    assert sf.TransformerConfig.from_dict(sf.TransformerConfig(**common).to_dict()).s2 == s2
    with pytest.raises(sf.ConfigError, match="s2 is only used with attention='s2'"):
        sf.TransformerConfig(vocab_size=61, s2=s2)
    with pytest.raises(sf.ConfigError, match="attention='s2' does not support position='relative'"):
        sf.TransformerConfig(vocab_size=61, attention="s2", position="relative")
    with pytest.raises(sf.ConfigError, match="S2 vert_stride must be >= 1"):
        sf.S2Config(vert_stride=0)
