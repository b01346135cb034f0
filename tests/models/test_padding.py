"""Padding: real tokens of a padded row get the same logits as the unpadded row, and nothing is NaN."""

import pytest
import torch

from tests.conftest import NORMS, POSITIONS, assert_close, make_model, tiny

LENGTHS = [9, 5, 7]


def _left_pad(rows, length, pad=0):
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def _right_pad(rows, length, pad=0):
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_left_padding(position, norm):
    model = make_model(tiny(position=position, norm=norm))
    rows = [torch.randint(0, 97, (n,)) for n in LENGTHS]
    ids, mask = _left_pad(rows, max(LENGTHS))
    out = model(ids, attention_mask=mask).logits
    assert not torch.isnan(out).any()
    for i, row in enumerate(rows):
        assert_close(out[i, -len(row):], model(row[None]).logits[0])


@pytest.mark.parametrize("position", ["absolute", "rope", "xpos", "relative"])
def test_decoder_left_padded_prefill_then_decode(position):
    model = make_model(tiny(position=position, norm="subln"))
    rows = [torch.randint(0, 97, (n,)) for n in LENGTHS]
    ids, mask = _left_pad(rows, max(LENGTHS))
    steps = torch.randint(0, 97, (3, 4))
    out = model(ids, attention_mask=mask, use_cache=True)
    logits = []
    for t in range(4):
        out = model(steps[:, t:t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    logits = torch.cat(logits, 1)
    assert not torch.isnan(logits).any()
    for i, row in enumerate(rows):
        assert_close(logits[i], model(torch.cat([row, steps[i]])[None]).logits[0, -4:])


def test_hugging_face_style_full_mask_is_accepted_in_steps():
    model = make_model(tiny(position="rope"))
    rows = [torch.randint(0, 97, (n,)) for n in LENGTHS]
    ids, mask = _left_pad(rows, max(LENGTHS))
    out = model(ids, attention_mask=mask, use_cache=True)
    nxt = torch.randint(0, 97, (3, 1))
    full_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    a = model(nxt, attention_mask=full_mask, cache=out.cache).logits
    out2 = model(ids, attention_mask=mask, use_cache=True)
    b = model(nxt, cache=out2.cache).logits
    assert_close(a, b)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(nxt, attention_mask=torch.ones(3, 5), cache=out2.cache)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_padding(position, norm):
    model = make_model(tiny("encoder", position=position, norm=norm))
    rows = [torch.randint(0, 97, (n,)) for n in LENGTHS]
    for pad in (_left_pad, _right_pad):
        ids, mask = pad(rows, max(LENGTHS))
        out = model(ids, attention_mask=mask).logits
        assert not torch.isnan(out).any()
        for i, row in enumerate(rows):
            real = mask[i].bool()
            assert_close(out[i, real], model(row[None]).logits[0])


@pytest.mark.parametrize("position", ["sinusoidal", "relative", "xpos"])
def test_encoder_decoder_padding_on_both_sides(position):
    model = make_model(tiny("encoder_decoder", position=position, norm="deepnorm"))
    sources = [torch.randint(0, 97, (n,)) for n in LENGTHS]
    targets = [torch.randint(0, 97, (n,)) for n in (3, 6, 4)]
    src, src_mask = _right_pad(sources, 9)
    tgt, tgt_mask = _left_pad(targets, 6)
    out = model(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask).logits
    assert not torch.isnan(out).any()
    for i in range(3):
        alone = model(sources[i][None], targets[i][None]).logits[0]
        assert_close(out[i, -len(targets[i]):], alone)
