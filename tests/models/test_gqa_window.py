"""Grouped-query attention (kv_heads) and sliding-window attention (window): their definitions, and every
equivalence dense attention has — cached decoding, left padding, beam reorder — with the cache they shrink."""

import pytest
import torch

import scaleformer as sf
from scaleformer.ops.attention import attention_reference
from tests.conftest import (NORMS, POSITIONS, assert_close, decode_step_by_step, decode_target_step_by_step,
                            make_model, tiny)


def _as_multi_head(model, heads, kv_heads):
    """The same function as a multi-head model: each key/value head's weights copied to the query heads it serves."""
    cfg = model.config.replace(kv_heads=None)
    dense = sf.build(cfg).eval()
    state = {}
    group, head_dim = heads // kv_heads, cfg.embed_dim // heads
    for name, value in model.state_dict().items():
        if any(f"mixer.{p}_proj." in name or f"cross_attn.{p}_proj." in name for p in ("k", "v")):
            value = value.unflatten(0, (kv_heads, head_dim)).repeat_interleave(group, 0).flatten(0, 1)
        state[name] = value
    dense.load_state_dict(state)
    return dense


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(arch, kv_heads):
    model = make_model(tiny(arch, position="rope", kv_heads=kv_heads))
    assert model.state_dict()[next(n for n in model.state_dict() if "mixer.k_proj.weight" in n)].shape == (8 * kv_heads, 32)
    dense = _as_multi_head(model, 4, kv_heads)
    ids, mask = torch.randint(0, 97, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    if arch == "encoder_decoder":
        args, kwargs = (ids, ids[:, :6]), dict(src_mask=mask)
    else:
        args, kwargs = (ids,), dict(attention_mask=mask)
    assert_close(model(*args, **kwargs).logits, dense(*args, **kwargs).logits)


def test_grouped_query_reference_op_is_the_formula():
    q, k, v = torch.randn(2, 6, 5, 4, dtype=torch.float64), torch.randn(2, 3, 7, 4, dtype=torch.float64), torch.randn(
        2, 3, 7, 4, dtype=torch.float64)
    out = attention_reference(q, k, v, causal=True)
    for head in range(6):  # query head h reads key/value head h // 2
        kv = head // 2
        scores = q[:, head] @ k[:, kv].transpose(-1, -2) / 2.0
        scores = scores.masked_fill(torch.ones(5, 7, dtype=torch.bool).tril(2).logical_not(), float("-inf"))
        assert_close(out[:, head], torch.softmax(scores, -1) @ v[:, kv], torch.float64)
    with pytest.raises(ValueError, match="cannot be shared evenly"):
        attention_reference(q, torch.randn(2, 4, 7, 4), torch.randn(2, 4, 7, 4))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("options", [dict(kv_heads=1), dict(window=3), dict(kv_heads=2, window=4)])
def test_cached_decoding_equals_full_forward(position, options):
    model = make_model(tiny(position=position, norm="subln", **options))
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids).logits
    for prefill in (1, 6):
        assert_close(decode_step_by_step(model, ids, prefill), full)


@pytest.mark.parametrize("norm", NORMS)
def test_sliding_window_is_the_windowed_mask(norm):
    """Each query sees exactly its own and the window-1 previous positions: with one layer, changing a token
    outside a query's window leaves its logits unchanged, changing the oldest token inside changes them;
    a window covering the sequence is ordinary causal attention."""
    window, ids = 4, torch.randint(0, 97, (1, 12))
    model = make_model(tiny(position="rope", norm=norm, window=window, layers=1))
    full = model(ids).logits
    changed = ids.clone()
    changed[0, :7] = (changed[0, :7] + 1) % 97  # outside the window of positions 10 and 11
    assert_close(model(changed).logits[0, 10:], full[0, 10:])
    changed[0, 7] = (changed[0, 7] + 1) % 97  # the oldest position position 10 sees
    assert not torch.allclose(model(changed).logits[0, 10], full[0, 10], atol=1e-4)
    unlimited = make_model(tiny(position="rope", norm=norm, layers=1))
    assert_close(make_model(tiny(position="rope", norm=norm, window=12, layers=1))(ids).logits, unlimited(ids).logits)


def test_bidirectional_window_sees_both_sides():
    model = make_model(tiny("encoder", position="relative", window=3, layers=1))
    ids = torch.randint(0, 97, (1, 10))
    full = model(ids).logits
    changed = ids.clone()
    changed[0, [0, 1, 2, 8, 9]] = (changed[0, [0, 1, 2, 8, 9]] + 1) % 97  # more than 2 away from positions 5
    assert_close(model(changed).logits[0, 5], full[0, 5])
    changed[0, 7] = (changed[0, 7] + 1) % 97  # 2 after position 5: inside
    assert not torch.allclose(model(changed).logits[0, 5], full[0, 5], atol=1e-4)


def test_rolling_cache_holds_only_the_window_and_stays_exact_with_left_padding():
    window = 4
    model = make_model(tiny(position="xpos", window=window, kv_heads=2))
    rows = [torch.randint(0, 97, (n,)) for n in (6, 2, 4)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    steps = torch.randint(0, 97, (3, 9))
    out = model(ids, attention_mask=mask, use_cache=True)
    logits = []
    for t in range(9):
        out = model(steps[:, t:t + 1], attention_mask=torch.ones(3, 1, dtype=torch.long), cache=out.cache)
        logits.append(out.logits)
        assert out.cache.held <= window - 1 + 4  # the longest row needs window - 1; the others' padding ages out
        assert out.cache.length == 6 + t + 1  # slots consumed, as a Hugging Face full mask counts them
    assert out.cache.held == window - 1
    logits = torch.cat(logits, 1)
    for i, row in enumerate(rows):
        assert_close(logits[i], model(torch.cat([row, steps[i]])[None]).logits[0, -9:])


def test_cache_bytes_shrink_by_the_group_and_the_window():
    ids = torch.randint(0, 97, (2, 40))
    full = make_model(tiny(position="rope"))(ids, use_cache=True).cache.nbytes()
    grouped = make_model(tiny(position="rope", kv_heads=1))(ids, use_cache=True).cache.nbytes()
    windowed = make_model(tiny(position="rope", window=8))(ids, use_cache=True).cache.nbytes()
    assert grouped * 4 == full and windowed * 40 == full * 7


@pytest.mark.parametrize("options", [dict(kv_heads=2), dict(window=3)])
def test_cache_reorder_matches_reordered_batch(options):
    model = make_model(tiny(position="relative", **options))
    ids = torch.randint(0, 97, (3, 9))
    out = model(ids[:, :6], use_cache=True)
    order = torch.tensor([2, 2, 0])  # beam search may duplicate and drop rows
    out.cache.reorder(order)
    step = model(ids[order, 6:7], cache=out.cache, use_cache=True)
    step = model(ids[order, 7:9], cache=step.cache, use_cache=True).logits
    assert_close(step, model(ids[order]).logits[:, -2:])


def test_window_and_kv_heads_are_checked():
    with pytest.raises(sf.ConfigError, match="kv_heads \\(3\\) must be >= 1 and divide heads \\(4\\)"):
        tiny(kv_heads=3)
    with pytest.raises(sf.ConfigError, match="window must be >= 1"):
        tiny(window=0)
    with pytest.raises(sf.ConfigError, match="different sparsities"):
        tiny(window=4, blockwise_causal_block=4)
    with pytest.raises(sf.ConfigError, match="different sparsities"):
        tiny(window=4, attention="dilated", segment_lengths=(4,), dilation_rates=(1,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [dict(causal=True), dict(mask=True), dict(mask=True, bias=True, causal=True),
                                     dict(bias=True)])
def test_grouped_fast_path_for_few_queries_matches_the_reference(options, dtype):
    """Decoding steps (fewer queries than keys) regroup query heads as rows instead of repeating the keys:
    the same values and gradients as the reference."""
    from scaleformer.ops.attention import attention

    q = torch.randn(2, 8, 3, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 11, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    kwargs = dict(causal=options.get("causal", False))
    if options.get("mask"):
        kwargs["mask"] = torch.rand(2, 1, 3, 11) > 0.3
        kwargs["mask"][..., -1] = True
    if options.get("bias"):
        kwargs["bias"] = torch.randn(2, 8, 3, 11, dtype=dtype)
    fast, reference = attention(q, k, v, **kwargs), attention_reference(q, k, v, **kwargs)
    assert_close(fast, reference, dtype)
    grad = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("options", [dict(kv_heads=2), dict(window=3), dict(kv_heads=1, window=2)])
def test_encoder_decoder_cached_decoding_with_grouped_heads_and_windows(options):
    """kv_heads applies to self- and cross-attention; a window to self-attention (the source stays whole)."""
    model = make_model(tiny("encoder_decoder", position="rope", norm="deepnorm", **options))
    src, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 8))
    src_mask = torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 6:] = 0
    full = model(src, tgt, src_mask=src_mask).logits
    decoded, cache = decode_target_step_by_step(model, src, tgt, 3, src_mask=src_mask)
    assert_close(decoded, full)
    if "window" in options:
        assert cache.held == options["window"] - 1
