"""Decoding state as an object, for every mixer's example (the conformance suite's cases): a prefill in
chunks of any size equals one call; ``fork``, ``snapshot``/``restore`` and ``save_cache``/``load_cache``
continue bit for bit as the original does; ``truncate`` rolls attention caches back exactly and refuses,
in one line naming the way out, the states it cannot roll back."""

from __future__ import annotations

import pytest
import torch

import scaleformer as sf
from scaleformer.cache import load_cache, save_cache
from tests.conftest import assert_close
from tests.models.test_mixer_contract import CASES, VOCAB, build, model_config


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param, CASES[request.param]


def _continue(model, cache, ids):
    return model(ids, cache=cache, use_cache=True).logits


def test_chunked_prefill_equals_one_call(case):
    _, mixers = case
    model = build(model_config(mixers))
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        for chunks in ([3, 1, 4, 5], [6, 7], [1] * 13):
            out, logits, start = None, [], 0
            for size in chunks:
                out = model(ids[:, start:start + size], cache=None if out is None else out.cache, use_cache=True)
                logits.append(out.logits)
                start += size
            assert_close(torch.cat(logits, 1), full, torch.float64)


def test_fork_snapshot_restore_and_files_continue_exactly(case, tmp_path):
    _, mixers = case
    model = build(model_config(mixers))
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).cache
        snapshot, fork = cache.snapshot(), cache.fork()
        save_cache(cache, tmp_path / "cache.safetensors")
        expected = _continue(model, cache, ids[:, 6:9])  # moves the original on
        assert torch.equal(_continue(model, fork, ids[:, 6:9]), expected)
        cache.restore(snapshot)
        assert torch.equal(_continue(model, cache, ids[:, 6:9]), expected)
        cache.restore(snapshot)  # a snapshot restores any number of times
        assert cache.length == snapshot.length == 6
        assert torch.equal(_continue(model, cache, ids[:, 6:9]), expected)
        loaded = load_cache(tmp_path / "cache.safetensors", model)
        assert loaded.length == 6 and loaded.nbytes() == snapshot.cache.nbytes()
        assert torch.equal(_continue(model, loaded, ids[:, 6:9]), expected)


def test_truncate_rolls_attention_back_and_refuses_the_rest(case):
    name, mixers = case
    model = build(model_config(mixers))
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
        expected = _continue(model, cache.fork(), ids[:, 5:8])
        _continue(model, cache, torch.randint(0, VOCAB, (2, 3)))  # three drafted tokens, all rejected
        try:
            cache.truncate(5)
        except ValueError as error:
            message = str(error)
            assert "snapshot()" in message and "\n" not in message
            kinds = {type(part).__name__ for part in cache.parts}
            assert kinds != {"KVCache"} or cache.dropped or any(part.length != cache.held for part in cache.parts), name
            return
        assert cache.length == 5
        assert_close(_continue(model, cache, ids[:, 5:8]), expected, torch.float64)


def test_plain_attention_truncates_and_windows_refuse_only_once_they_forgot():
    model = build(model_config((sf.Attention(heads=2, kv_heads=1),) * 2))
    cache = model(torch.randint(0, VOCAB, (1, 6)), use_cache=True).cache
    cache.truncate(2)
    assert cache.length == 2 and int(cache.next_position) == 2
    with pytest.raises(ValueError, match="cannot roll a cache of 2 slots back to 3"):
        cache.truncate(3)
    windowed = build(model_config((sf.Attention(heads=2, window=3),) * 2))
    cache = windowed(torch.randint(0, VOCAB, (1, 8)), use_cache=True).cache
    with pytest.raises(ValueError, match="sliding window already forgot"):
        cache.truncate(6)


def test_a_cache_file_from_another_model_or_a_damaged_one_is_one_clear_error(tmp_path):
    attention = build(model_config((sf.Attention(heads=2),) * 2))
    retention = build(model_config((sf.Retention(heads=2, value_dim=16),) * 2))
    save_cache(attention(torch.randint(0, VOCAB, (1, 4)), use_cache=True).cache, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=r"does not fit this model's at cache.layers\[0\]: a KVCache where this model "
                                         "keeps RetentionState"):
        load_cache(tmp_path / "a.safetensors", retention)
    three = build(model_config((sf.Attention(heads=2),) * 3))
    with pytest.raises(ValueError, match="2 entries, this model's has 3"):
        load_cache(tmp_path / "a.safetensors", three)
    (tmp_path / "bad.safetensors").write_bytes(b"not a cache at all")
    with pytest.raises(ValueError, match="bad.safetensors: not a cache file"):
        load_cache(tmp_path / "bad.safetensors", attention)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "bad.safetensors"]  # no temporaries left
