import pytest
import torch

import scaleformer as sf
from scaleformer.generation import filter_top_k, filter_top_p, sample_next
from tests.conftest import make_model, tiny


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("position", ["absolute", "xpos", "relative"])
def test_greedy_generation_equals_uncached_argmax_loop(position):
    model = make_model(tiny(position=position))
    prompt = torch.randint(0, 97, (2, 5))
    assert torch.equal(sf.generate(model, prompt, 8), _greedy_without_cache(model, prompt, 8))


@pytest.mark.parametrize("options", [{}, dict(kv_heads=2, window=3)])
def test_left_padded_batch_generates_what_each_row_generates_alone(options):
    model = make_model(tiny(position="rope", norm="subln", **options))
    rows = [torch.randint(0, 97, (n,)) for n in (6, 3, 5)]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    out = sf.generate(model, ids, 7, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = sf.generate(model, row[None], 7)
        assert torch.equal(out[i, 6:], alone[0, len(row):])


def test_encoder_decoder_generation_equals_uncached_loop():
    model = make_model(tiny("encoder_decoder", position="sinusoidal"))
    src = torch.randint(0, 97, (2, 7))
    bos = torch.full((2, 1), 1)
    out = sf.generate(model, bos, 6, source_ids=src)
    tgt = bos
    for _ in range(6):
        tgt = torch.cat([tgt, model(src, tgt).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tgt)
    with pytest.raises(ValueError, match="needs source_ids"):
        sf.generate(model, bos, 3)


def _expected_with_stops(free, prompt_length, stops, pad):
    """What generation with ``stops`` must give, derived from a free-running greedy generation."""
    rows, firsts = [], []
    for row in free:
        hits = [i for i, token in enumerate(row[prompt_length:].tolist()) if token in stops]
        firsts.append(hits[0] if hits else None)
    length = free.shape[1] if None in firsts else prompt_length + max(firsts) + 1  # ends when all rows stop
    for row, first in zip(free, firsts):
        kept = row[:length].clone()
        if first is not None:
            kept[prompt_length + first + 1:] = pad
        rows.append(kept)
    return torch.stack(rows), firsts


def test_stop_token_ends_rows_and_pads_after():
    model = make_model(tiny())
    prompt = torch.randint(0, 97, (2, 4))
    free = sf.generate(model, prompt, 10)
    # Row 0 stops (at its 3rd step); row 1 stops only if it happens to emit the same token.
    one = [int(free[0, 6])]
    expected, firsts = _expected_with_stops(free, 4, one, -1)
    assert firsts[0] is not None
    assert torch.equal(sf.generate(model, prompt, 10, stop_tokens=one, pad_token=-1), expected)
    # Both rows stop, at different steps: every row is checked, and generation ends after the later stop.
    two = [int(free[0, 6]), int(free[1, 9])]
    expected, firsts = _expected_with_stops(free, 4, two, -1)
    assert None not in firsts
    assert torch.equal(sf.generate(model, prompt, 10, stop_tokens=two, pad_token=-1), expected)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = make_model(tiny())
    prompt = torch.randint(0, 97, (2, 4))
    a = sf.generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = sf.generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = sf.generate(model, prompt, 6)
    assert torch.equal(sf.generate(model, prompt, 6, temperature=0.7, top_k=1), greedy)
    assert torch.equal(sf.generate(model, prompt, 6, temperature=2.0, top_p=1e-6), greedy)


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[True, False, False, True]]
    # probs of [3, 2, 1, 0] sorted: 0.644, 0.237, 0.087, 0.032 -> p = 0.8 keeps the first two.
    assert torch.isinf(filter_top_p(logits, 0.8)).tolist() == [[True, False, False, True]]
    assert torch.isinf(filter_top_p(logits, 0.6)).tolist() == [[True, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.9)).tolist() == [[False, False, False, True]]
    counts = torch.bincount(sample_next(logits.expand(4000, 4), temperature=1.0, top_k=2,
                                        generator=torch.Generator().manual_seed(0)), minlength=4)
    assert counts[0] == counts[3] == 0
    assert abs(counts[1].item() / 4000 - 1 / (1 + torch.e ** -1)) < 0.03  # softmax over {3, 2}


def test_generate_rejects_bad_input():
    model = make_model(tiny())
    ids = torch.randint(0, 97, (2, 4))
    with pytest.raises(ValueError, match="LEFT padding"):
        sf.generate(model, ids, 2, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        sf.generate(model, ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sf.generate(model, ids, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="beyond the learned position table"):
        sf.generate(model, ids, 100)


def test_generate_restores_training_mode():
    model = make_model(tiny()).train()
    sf.generate(model, torch.randint(0, 97, (1, 3)), 2)
    assert model.training


def test_generate_stops_at_the_checkpoints_end_of_sequence_by_default(tmp_path):
    """As Hugging Face's generate stops at its config's eos: sf.load gives the model its tokenizer's eos id,
    sf.generate stops there by default, and stop_tokens=None goes on."""
    from scaleformer.data.tokenizer import ByteTokenizer, IdTokenizer

    torch.manual_seed(0)
    sf.save(sf.build(sf.load_preset("gpt-tiny", vocab_size=259)), tmp_path / "m")
    ByteTokenizer().save(tmp_path / "m")
    model = sf.load(tmp_path / "m").eval()
    assert model.eos_token_id == ByteTokenizer().eos_id
    prompt = torch.tensor([[1, 2, 3]])
    free = sf.generate(model, prompt, 6, stop_tokens=None)
    assert free.shape == (1, 9)
    model.eos_token_id = int(free[0, 3])  # pretend the first new token is the end of the text
    stopped = sf.generate(model, prompt, 6)
    assert stopped[0].tolist() == free[0].tolist()[:4]  # the prompt and the end token, then nothing
    assert torch.equal(sf.generate(model, prompt, 6, stop_tokens=None), free)
    IdTokenizer(259).save(tmp_path / "m")  # pre-tokenized ids: no end-of-sequence to stop at
    assert sf.load(tmp_path / "m").eos_token_id is None
