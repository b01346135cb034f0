"""YOCO (You Only Cache Once): a self-decoder (gated retention or sliding-window attention), one global
key/value projection, and cross-decoder layers that all attend to it. The model against its formula
written out; every equivalence a decoder keeps (cached decoding, padding, packing, forms, kept logits); and
the cache: one layer's keys and values, whatever the depth."""

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.cache import KVCache, RetentionState
from tests.conftest import assert_close, decode_step_by_step

SELF_DECODERS = {
    "gated_retention": dict(self_decoder="gated_retention"),
    "sliding_window": dict(self_decoder="sliding_window", self_heads=4, window=4),
    "gated_deltanet": dict(self_decoder="gated_deltanet", chunk_size=3),
}


def yoco(dtype=torch.float32, seed=0, **overrides):
    base = dict(vocab_size=97, embed_dim=32, layers=4, self_heads=2, heads=4, kv_heads=2, ffn_dim=48)
    if overrides.get("self_decoder", "gated_retention") == "gated_retention":
        base["chunk_size"] = 4  # gated retention's chunks (a sliding-window self-decoder has none)
    cfg = sf.YOCOConfig(**{**base, **overrides})
    torch.manual_seed(seed)
    model = sf.build(cfg).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, so the tests see them
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _rope(x, positions, base=10000.0):
    """Interleaved RoPE written out: pair (2i, 2i+1) at position n rotated by n·base^(-2i/D)."""
    d = x.shape[-1]
    angle = positions[:, None, :, None].double() * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_the_model_is_yocos_formula_written_out():
    """h = self-decoder(√d · E[ids]); K = RoPE(RMSNorm(h) W_K), V = RMSNorm(h) W_V once (2 key/value heads);
    every cross-decoder layer: h += W_O softmax_causal(RoPE(RMSNorm(h) W_Q) Kᵀ/√D) V (each key/value head
    serving 2 query heads), h += SwiGLU(RMSNorm(h)); logits = RMSNorm(h) Eᵀ."""
    model = yoco(torch.float64)
    ids = torch.randint(0, 97, (2, 9))
    b, t, heads, kv_heads, d = 2, 9, 4, 2, 8
    positions = torch.arange(t).expand(b, t)
    stack = model.decoder
    h = stack.embed_tokens(ids) * 32**0.5
    for block in stack.blocks[:2]:  # the self-decoder: gated retention blocks (tested on their own elsewhere)
        h = block(h, stack.context(ids, None, None, None, None))
    kv = stack.global_kv
    normed = _rms(h, kv.norm.weight)
    split = lambda x, n: x.view(b, t, n, d).transpose(1, 2)  # noqa: E731
    key = _rope(split(normed @ kv.k_proj.weight.T, kv_heads), positions)
    value = split(normed @ kv.v_proj.weight.T, kv_heads)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for block in stack.blocks[2:]:
        attn = block.mixer
        query = _rope(split(_rms(h, block.mixer_norm.weight) @ attn.q_proj.weight.T, heads), positions)
        scores = query @ key.repeat_interleave(2, dim=1).transpose(-1, -2) / d**0.5
        mixed = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ value.repeat_interleave(2, dim=1)
        h = h + mixed.transpose(1, 2).reshape(b, t, 32) @ attn.out_proj.weight.T
        x = _rms(h, block.ffn_norm.weight)
        ffn = block.ffn
        h = h + (F.silu(x @ ffn.fc1.weight.T) * (x @ ffn.gate.weight.T)) @ ffn.fc2.weight.T
    logits = _rms(h, stack.final_norm.weight) @ model.embed_tokens.weight.T
    assert_close(model(ids).logits, logits, torch.float64)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_the_cross_decoder_attends_with_the_chosen_kernel(impl):
    cfg = sf.model_config(sf.YOCOConfig(vocab_size=97, embed_dim=32, layers=4, self_heads=2, heads=4, kv_heads=2,
                                        ffn_dim=48, chunk_size=4))
    cross = cfg.layers[-1].mixer.replace(impl=impl)
    cfg = cfg.replace(layers=cfg.layers[:2] + (cfg.layers[2].replace(mixer=cross),) * 2)
    torch.manual_seed(0)
    model = sf.build(cfg).double().eval()
    assert all(block.mixer.impl == impl for block in model.decoder.blocks[2:])
    baseline = yoco(torch.float64)
    model.load_state_dict(baseline.state_dict())
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        assert_close(model(ids, **kwargs).logits, baseline(ids, **kwargs).logits, torch.float64)


@pytest.mark.parametrize("self_decoder", list(SELF_DECODERS))
@pytest.mark.parametrize("prefill", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefill_then_steps_equal_the_full_forward(self_decoder, prefill, dtype):
    model = yoco(dtype, **SELF_DECODERS[self_decoder])
    ids = torch.randint(0, 97, (2, 13))
    assert_close(decode_step_by_step(model, ids, prefill), model(ids).logits, dtype)


@pytest.mark.parametrize("self_decoder", list(SELF_DECODERS))
def test_kept_logits_equal_the_last_rows_and_the_cross_decoder_skips_the_rest(self_decoder):
    model = yoco(torch.float64, **SELF_DECODERS[self_decoder])
    ids = torch.randint(0, 97, (2, 13))
    full = model(ids).logits
    seen = []
    for block in model.decoder.blocks[2:]:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    for keep in (1, 3, 13, 20):
        seen.clear()
        assert_close(model(ids, logits_to_keep=keep).logits, full[:, -keep:], torch.float64)
        assert seen == [min(keep, 13)] * 2  # both cross-decoder layers ran on the kept tokens alone
    # A prefill that keeps one token's logits still caches every token's keys and values: decoding continues
    out = model(ids[:, :9], use_cache=True, logits_to_keep=1)
    assert out.cache.stages["global_kv"].length == 9
    for index in range(9, 13):
        out = model(ids[:, index:index + 1], cache=out.cache)
        assert_close(out.logits[:, 0], full[:, index], torch.float64)


@pytest.mark.parametrize("self_decoder", list(SELF_DECODERS))
@pytest.mark.parametrize("keep", [0, 1])
def test_left_padded_rows_equal_unpadded_rows_and_decode_on(self_decoder, keep):
    model = yoco(torch.float64, **SELF_DECODERS[self_decoder])
    rows = [torch.randint(0, 97, (n,)) for n in (9, 3, 6)]
    ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    following = torch.randint(0, 97, (3, 4))
    out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=keep)
    padded, steps = out.logits, []
    for index in range(4):
        out = model(following[:, index:index + 1], cache=out.cache)
        steps.append(out.logits[:, 0])
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, following[i]])[None]).logits[0]
        expected = alone[len(row) - 1:len(row)] if keep else alone[:len(row)]
        assert_close(padded[i, -expected.shape[0]:], expected, torch.float64)
        assert_close(torch.stack([s[i] for s in steps]), alone[len(row):], torch.float64)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_every_retention_form_gives_the_same_model(form):
    model = yoco(torch.float64)
    ids = torch.randint(0, 97, (2, 11))
    assert_close(model(ids, form=form).logits, model(ids, form="parallel").logits, torch.float64)


@pytest.mark.parametrize("self_decoder", list(SELF_DECODERS))
def test_packed_documents_equal_separate_rows(self_decoder):
    model = yoco(**SELF_DECODERS[self_decoder])
    a, b = torch.randint(0, 97, (5,)), torch.randint(0, 97, (7,))
    packed = model(torch.cat([a, b])[None], document_ids=torch.tensor([[0] * 5 + [1] * 7])).logits[0]
    assert_close(packed[:5], model(a[None]).logits[0])
    assert_close(packed[5:], model(b[None]).logits[0])
    kept = model(torch.cat([a, b])[None], document_ids=torch.tensor([[0] * 5 + [1] * 7]), logits_to_keep=2).logits
    assert_close(kept[0], packed[-2:])


@pytest.mark.parametrize("layers", [2, 4, 8])
def test_the_cache_holds_one_layers_keys_and_values_whatever_the_depth(layers):
    model = yoco(layers=layers)
    out = model(torch.randint(0, 97, (3, 20)), use_cache=True)
    cache = out.cache
    one_layer = 3 * 2 * 20 * 8 * 2 * 4  # B · key/value heads · tokens · head width · (K, V) · fp32
    assert cache.stages["global_kv"].nbytes() == one_layer
    assert [type(part) for part in cache.layers] == [RetentionState] * (layers // 2) + [type(None)] * (layers - layers // 2)
    state = 3 * 2 * 16 * 16 * 4  # B · heads · key width · value width · fp32: fixed, whatever the length
    assert cache.nbytes() == one_layer + (layers // 2) * state
    out = model(torch.randint(0, 97, (3, 1)), cache=cache)
    assert cache.nbytes() == one_layer * 21 // 20 + (layers // 2) * state


def test_sliding_window_layers_keep_only_their_window_beside_the_whole_shared_cache():
    model = yoco(**SELF_DECODERS["sliding_window"])
    ids = torch.randint(0, 97, (2, 30))
    out = model(ids[:, :10], use_cache=True)
    for index in range(10, 30):
        out = model(ids[:, index:index + 1], cache=out.cache)
        windows = [part for part in out.cache.layers if isinstance(part, KVCache)]
        assert len(windows) == 2 and all(part.length == 3 for part in windows)  # the next query's 3 predecessors
        assert out.cache.stages["global_kv"].length == index + 1 and out.cache.length == index + 1


def test_beam_reorder_moves_the_shared_cache():
    model = yoco()
    ids = torch.randint(0, 97, (3, 8))
    out = model(ids, use_cache=True)
    out.cache.reorder(torch.tensor([2, 2, 0]))
    step = torch.randint(0, 97, (3, 1))
    reordered = model(step, cache=out.cache).logits[:, 0]
    expected = model(torch.cat([ids[[2, 2, 0]], step], 1)).logits[:, -1]
    assert_close(reordered, expected)


def test_generation_prefills_without_the_cross_decoder_for_earlier_prompt_tokens():
    model = yoco()
    seen = []
    for block in model.decoder.blocks[2:]:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    prompts = torch.randint(1, 97, (2, 12))
    ids = sf.generate(model, prompts, 5)
    assert seen == [1] * 2 * 5  # the prompt's prefill and each step: one token through each cross layer
    expected = prompts
    for _ in range(5):  # greedy without a cache
        expected = torch.cat([expected, model(expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, expected)


def test_gradients_reach_every_parameter_and_bitlinear_applies():
    model = yoco().train()
    logits = model(torch.randint(0, 97, (2, 9))).logits
    (logits * torch.randn_like(logits)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    quantised = yoco(linear="bitlinear")
    kinds = {type(m).__name__ for name, m in quantised.named_modules() if name.endswith(("k_proj", "q_proj"))}
    assert kinds == {"BitLinear"}  # the global key/value projection and the cross-decoder's queries too


def test_config_errors_presets_and_round_trip(tmp_path):
    with pytest.raises(sf.ConfigError, match=r"kv_heads \(3\) must divide heads \(4\)"):
        sf.YOCOConfig(embed_dim=32, self_heads=2, heads=4, kv_heads=3)
    with pytest.raises(sf.ConfigError, match="self_heads .* must equal heads"):
        sf.YOCOConfig(embed_dim=32, self_decoder="sliding_window", self_heads=2, heads=4, kv_heads=2)
    with pytest.raises(sf.ConfigError, match="layers must be >= 2"):
        sf.YOCOConfig(layers=1)
    # an option the chosen self-decoder would ignore is refused (yoco-tiny once set a window that did nothing)
    with pytest.raises(sf.ConfigError, match="window applies to self_decoder='sliding_window' only"):
        sf.YOCOConfig(window=64)
    for option in ({"chunk_size": 16}, {"decay_temperature": 8.0}, {"retention_backend": "torch"}):
        with pytest.raises(sf.ConfigError, match=f"{next(iter(option))} applies to self_decoder='gated_retention'"):
            sf.YOCOConfig(self_decoder="sliding_window", self_heads=6, **option)
    with pytest.raises(sf.ConfigError, match="chunk_size=16 changes nothing"):  # the knobs hold the same rule
        sf.yoco(self_decoder="sliding_window", self_heads=6, chunk_size=16)
    cfg = sf.load_preset("yoco-tiny")
    with pytest.raises(sf.ConfigError, match="cross-decoder layers .* must end the stack"):
        cfg.replace(layers=cfg.layers[2:3] + cfg.layers[:2])
    with pytest.raises(sf.ConfigError, match="share one key/value projection"):
        cfg.replace(layers=cfg.layers[:3] + (cfg.layers[3].replace(mixer=sf.CrossDecoderAttention(heads=4)),))
    assert sf.ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.layers[-1].mixer.kind == "cross_decoder"
    model = sf.build(sf.load_preset("yoco-tiny"))
    assert model.new_cache().stages["global_kv"] is not None  # one shared key/value cache
    ids = torch.randint(0, 512, (2, 6))
    sf.save(model, tmp_path / "m")
    assert torch.equal(sf.load(tmp_path / "m")(ids).logits, model(ids).logits)
    base = sf.load_preset("yoco-base")
    cross = base.layers[-1].mixer
    assert (base.embed_dim, len(base.layers), base.embed_dim // cross.heads, cross.kv_heads) == (768, 12, 128, 2)


def test_bad_logits_to_keep_is_one_clear_error():
    model = yoco()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            model(torch.randint(0, 97, (1, 4)), logits_to_keep=bad)


def test_a_config_saved_with_an_ignored_window_loads_as_the_model_it_built(tmp_path):
    """Earlier versions saved every self-decoder option, the unused ones too (yoco-tiny: window 64 beside gated
    retention): such a checkpoint still loads, into the same model, with the same logits."""
    import json

    model = yoco()
    sf.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["window"] is None
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "window": 64}))  # as the earlier code wrote it
    loaded = sf.load(tmp_path / "m")
    assert loaded.config == model.config
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(sf.ConfigError, match="window applies to self_decoder='sliding_window' only"):
        sf.YOCOConfig.from_dict({**config, "window": 64})  # a config a user writes is held to the rule
