"""Speculative decoding: greedy output identical to the target's own for every pairing of attention,
recurrent and hybrid models (their states rolled back past each rejection), and sampled output following
the target's distribution exactly, checked against that distribution enumerated on a 4-token vocabulary."""

from __future__ import annotations

import itertools

import pytest
import torch

import scaleformer as sf
from scaleformer.speculative import SpeculativeStats, next_token_probs, speculative_generate

PAIRS = [("gpt-tiny", "gpt-tiny"), ("gdn-hybrid-tiny", "mamba2-tiny"), ("samba-tiny", "retnet-tiny"),
         ("jamba-tiny", "gpt-tiny"), ("yoco-mamba2-tiny", "s2-tiny"), ("retnet-tiny", "gpt-tiny")]


def _model(name: str, seed: int, **knobs) -> torch.nn.Module:
    # float64: the target scores a round's drafts in one call, plain decoding one token a call; their logits
    # differ by rounding, which in float32 could flip a near-tie argmax on another CPU, never in float64 here
    torch.manual_seed(seed)
    return sf.build(sf.load_preset(name, **knobs)).double().eval()


@pytest.mark.parametrize("target_name, draft_name", PAIRS)
def test_greedy_output_is_the_targets_own(target_name, draft_name):
    target, draft = _model(target_name, 1), _model(draft_name, 2)
    ids = torch.randint(1, 512, (2, 7))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # a left-padded row
    expected = sf.generate(target, ids, 12, attention_mask=mask, stop_tokens=None)
    for lookahead in (1, 4):
        stats = SpeculativeStats()
        got = sf.generate(target, ids, 12, attention_mask=mask, stop_tokens=None, draft=draft, lookahead=lookahead,
                          stats=stats)
        assert torch.equal(got, expected)
        assert stats.drafted >= 12 and stats.target_calls >= stats.rounds
    # the target as its own draft: every proposal accepted, k + 1 tokens per verification
    stats = SpeculativeStats()
    assert torch.equal(sf.generate(target, ids, 12, attention_mask=mask, stop_tokens=None, draft=target,
                                   lookahead=3, stats=stats), expected)
    assert stats.acceptance_rate == 1.0 and stats.tokens_per_round == 4.0


def test_stop_tokens_end_a_row_as_generate_does():
    target, draft = _model("gpt-tiny", 1), _model("gdn-tiny", 2)
    ids = torch.randint(1, 512, (2, 5))
    plain = sf.generate(target, ids, 10, stop_tokens=None)
    stop = int(plain[0, 7])  # the third token row 0 generates
    expected = sf.generate(target, ids, 10, stop_tokens=stop, pad_token=3)
    assert torch.equal(sf.generate(target, ids, 10, stop_tokens=stop, pad_token=3, draft=draft, lookahead=4), expected)


def _peaky(model: torch.nn.Module, gain: float) -> torch.nn.Module:
    """Sharper next-token distributions (the final norm's weight × gain), so that draft and target differ."""
    with torch.no_grad():
        model.decoder.final_norm.weight.mul_(gain)
    return model


# chi-square's 99.9% quantiles for 1 … 15 degrees of freedom
CHI2_999 = (10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26, 32.91, 34.53, 36.12, 37.70)


def test_samples_follow_the_targets_distribution():
    """Two tokens after a fixed prompt, vocabulary 4: the 16 outcomes' exact probabilities under an attention
    target, against 1,000 speculative samples with a RetNet draft (its state restored after each rejection).
    Outcomes expected fewer than 5 times are pooled into one cell; a chi-square test at p = 0.001 with a fixed
    generator (deterministic). The draft's first-token distribution differs from the target's by up to 0.65,
    so sampling from the draft (the rule skipped) scores in the hundreds of thousands, and a residual drawn
    from p instead of max(0, p − q) scores about 46 on the first token alone."""
    target = _peaky(_model("gpt-tiny", 1, vocab_size=4), 1.5)
    draft = _peaky(_model("retnet-tiny", 7, vocab_size=4), 1.5)
    prompt = torch.tensor([[1, 2, 3]])
    options = dict(temperature=1.0, top_k=None, top_p=None)
    with torch.no_grad():
        first = next_token_probs(target(prompt).logits[0, -1], **options)
        exact = {(a, b): float(first[a] * next_token_probs(target(torch.cat([prompt, torch.tensor([[a]])], 1))
                                                             .logits[0, -1], **options)[b])
                 for a, b in itertools.product(range(4), repeat=2)}
        draft_first = next_token_probs(draft(prompt).logits[0, -1], **options)
    assert float((first - draft_first).abs().max()) > 0.5  # the two models disagree
    generator = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(exact, 0)
    stats = SpeculativeStats()
    samples = 1000
    for _ in range(samples):
        ids, _ = speculative_generate(target, draft, prompt, 2, lookahead=2, generator=generator, stats=stats,
                                      **options)
        counts[tuple(ids[0, 3:].tolist())] += 1
    kept = [o for o in exact if samples * exact[o] >= 5]
    cells = [(counts[o], samples * exact[o]) for o in kept]
    cells.append((samples - sum(c for c, _ in cells), samples * (1 - sum(exact[o] for o in kept))))
    chi_square = sum((observed - expected) ** 2 / expected for observed, expected in cells if expected > 0)
    assert chi_square < CHI2_999[len(cells) - 2], (chi_square, counts, exact)
    assert 0.1 < stats.acceptance_rate < 0.9  # the rule really accepted some proposals and rejected others


def test_bad_pairs_are_one_clear_error():
    target = _model("gpt-tiny", 1)
    with pytest.raises(ValueError, match=r"the draft's vocabulary \(97\) is not the target's \(512\)"):
        speculative_generate(target, _model("gpt-tiny", 2, vocab_size=97), torch.tensor([[1, 2]]), 3)
    with pytest.raises(ValueError, match="lookahead must be >= 1"):
        sf.generate(target, torch.tensor([[1, 2]]), 3, draft=target, lookahead=0)
    with pytest.raises(ValueError, match="not on_token"):
        sf.generate(target, torch.tensor([[1, 2]]), 3, draft=target, on_token=print)
