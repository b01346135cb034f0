"""Prefill + step decoding equals the full forward, at every position."""

import pytest
import torch

import scaleformer as sf
from tests.conftest import (NORMS, POSITIONS, assert_close, decode_step_by_step, decode_target_step_by_step,
                            make_model, tiny)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_cached_decoding_equals_full_forward(position, norm):
    model = make_model(tiny(position=position, norm=norm))
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids).logits
    for prefill in (1, 6):
        assert_close(decode_step_by_step(model, ids, prefill), full)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", ["sinusoidal", "rope", "relative"])
def test_encoder_decoder_cached_decoding_equals_full_forward(position, norm):
    model = make_model(tiny("encoder_decoder", position=position, norm=norm, decoder_layers=3))
    src, tgt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 7))
    src_mask = torch.ones(2, 9, dtype=torch.long)
    src_mask[1, 6:] = 0
    full = model(src, tgt, src_mask=src_mask).logits
    assert_close(decode_target_step_by_step(model, src, tgt, 3, src_mask=src_mask)[0], full)


def test_decoding_in_float64_is_exact_to_1e_10():
    model = make_model(tiny(position="xpos", norm="subln"), dtype=torch.float64)
    ids = torch.randint(0, 97, (2, 13))
    assert_close(decode_step_by_step(model, ids, 5), model(ids).logits, torch.float64)


def test_blockwise_causal_attention_masks_far_blocks_and_decodes_exactly():
    block = 4
    ids = torch.randint(0, 97, (1, 14))
    two_layers = make_model(tiny(position="xpos", blockwise_causal_block=block))
    assert_close(decode_step_by_step(two_layers, ids, 3), two_layers(ids).logits)
    # One layer, so the receptive field is one hop: positions 12, 13 (block 3) see blocks 2 and 3 only.
    # Changing tokens 0..7 leaves them unchanged, changing token 8 does not.
    model = make_model(tiny(position="xpos", blockwise_causal_block=block, layers=1))
    full = model(ids).logits
    assert_close(decode_step_by_step(model, ids, 3), full)
    changed = ids.clone()
    changed[0, :8] = (changed[0, :8] + 1) % 97
    far_changed = changed.clone()
    assert_close(model(changed).logits[0, 12:], full[0, 12:])
    changed[0, 8] = (changed[0, 8] + 1) % 97
    assert not torch.allclose(model(changed).logits[0, 13], full[0, 13], atol=1e-4)
    # Without the option the same model is ordinary causal attention.
    plain = make_model(tiny(position="xpos", layers=1))
    assert not torch.allclose(plain(far_changed).logits[0, 13], plain(ids).logits[0, 13], atol=1e-4)


@pytest.mark.parametrize("scope", ["ffn", "all"])
def test_multiway_decoding_equals_full_forward_and_uses_both_ways(scope):
    model = make_model(tiny(multiway=2, multiway_scope=scope, position="rope", norm="subln", embedding_norm=True))
    ids = torch.randint(0, 97, (2, 10))
    full = model(ids, multiway_split=4).logits
    assert_close(decode_step_by_step(model, ids, 2, multiway_split=4), full)
    assert not torch.allclose(model(ids, multiway_split=10).logits[:, 4:], full[:, 4:], atol=1e-4)
    assert_close(model(ids, multiway_split=10).logits[:, :4], full[:, :4])


def test_cache_reorder_matches_reordered_batch():
    model = make_model(tiny(position="relative"))
    ids = torch.randint(0, 97, (3, 8))
    out = model(ids[:, :6], use_cache=True)
    order = torch.tensor([2, 2, 0])  # beam search may duplicate and drop rows
    out.cache.reorder(order)
    step = model(ids[order, 6:7], cache=out.cache, use_cache=True).logits
    assert_close(step, model(torch.cat([ids[order, :6], ids[order, 6:7]], 1)).logits[:, -1:])


def test_every_model_cache_follows_the_decoding_protocol():
    from scaleformer.cache import DecodingCache

    retnet = sf.build(sf.RetNetConfig(vocab_size=97, embed_dim=16, value_dim=24, heads=2, ffn_dim=24, layers=2))
    for model in (make_model(tiny()), make_model(tiny("encoder_decoder")), retnet):
        cache = model.new_cache()
        assert isinstance(cache, DecodingCache) and cache.length == 0 and cache.batch_size is None
        ids = torch.randint(1, 97, (3, 4))
        args = (ids, ids) if isinstance(model, sf.EncoderDecoder) else (ids,)
        with torch.no_grad():
            model(*args, cache=cache)
        assert cache.length == 4 and cache.batch_size == 3 and cache.nbytes() > 0
        assert torch.equal(cache.next_position, torch.full((3,), 4))
        cache.reorder(torch.tensor([2, 2]))
        assert cache.batch_size == 2


@pytest.mark.parametrize("cache_type", ["keys", "retention"])
def test_appending_without_a_mask_is_appending_an_all_real_mask(cache_type):
    """A call without padding appends no mask (None): the cache must end where an explicit all-ones mask
    leaves it — the same next positions (a tensor per row, also from empty), slots and key masks."""
    from scaleformer.cache import RetentionCache, TransformerCache

    make = (lambda: TransformerCache.empty(2)) if cache_type == "keys" else (lambda: RetentionCache.empty(2))
    implicit, explicit = make(), make()
    for length in (3, 1, 1, 4):
        start = 0 if explicit.next_position is None else explicit.next_position[:, None]
        positions = start + torch.arange(length).expand(2, -1)
        implicit.append_tokens(None, positions)
        explicit.append_tokens(torch.ones(2, length, dtype=torch.bool), positions)
        assert torch.equal(implicit.next_position, explicit.next_position)
        assert implicit.next_position.dtype == torch.long and implicit.next_position.shape == (2,)
        assert implicit.length == explicit.length and implicit.held == explicit.held
    assert implicit.next_position.tolist() == [9, 9]
    if cache_type == "keys":
        assert torch.equal(implicit.key_mask, explicit.key_mask) and torch.equal(implicit.key_positions,
                                                                                 explicit.key_positions)
