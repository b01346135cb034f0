"""Continuous batching (scaleformer.engine): requests of different lengths join and leave a running batch
between steps, each with its own options, and each gets the tokens it gets alone with ``sf.generate`` —
for every mixer's example (the conformance suite's cases), greedy and sampled with per-request seeds.
In float64, so no near-tie between two logits can flip on another CPU's rounding (a batched product may
round differently from one row's)."""

from __future__ import annotations

import pytest
import torch

import scaleformer as sf
from scaleformer.engine import Engine, PrefixCache, SamplingOptions
from tests.models.test_mixer_contract import CASES, VOCAB, build, model_config

# (prompt length, options): greedy and sampled rows, top-k and top-p, a stop token, lengths 1 to 12
REQUESTS = [(5, SamplingOptions(max_new_tokens=6)),
            (9, SamplingOptions(max_new_tokens=9, temperature=1.0, seed=1)),
            (1, SamplingOptions(max_new_tokens=4, temperature=0.7, top_k=5, seed=2)),
            (12, SamplingOptions(max_new_tokens=8, temperature=1.3, top_p=0.8, seed=3)),
            (7, SamplingOptions(max_new_tokens=7, stop_tokens=tuple(range(0, VOCAB, 3)))),
            (3, SamplingOptions(max_new_tokens=5, temperature=1.0, seed=4))]


def alone(model, prompt, options: SamplingOptions) -> list[int]:
    generator = None if options.seed is None else torch.Generator().manual_seed(options.seed)
    ids = sf.generate(model, torch.tensor([prompt]), options.max_new_tokens, temperature=options.temperature,
                      top_k=options.top_k, top_p=options.top_p, stop_tokens=options.stop_tokens, generator=generator)
    return ids[0, len(prompt):].tolist()


def run_staggered(engine: Engine, prompts, options) -> list:
    """Submit the requests two at a time, a step between, so rows join a batch that is already decoding."""
    requests = []
    for index, (prompt, option) in enumerate(zip(prompts, options)):
        requests.append(engine.submit(prompt, option))
        if index % 2:
            engine.step()
    engine.run()
    return requests


@pytest.mark.parametrize("name", list(CASES))
def test_each_request_gets_what_it_gets_alone(name):
    model = build(model_config(CASES[name]))
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n, _ in REQUESTS]
    options = [option for _, option in REQUESTS]
    engine = Engine(model, max_batch=3)  # fewer rows than requests: some wait for others to leave
    requests = run_staggered(engine, prompts, options)
    for prompt, option, request in zip(prompts, options, requests):
        assert request.tokens == alone(model, prompt, option), name
        stopped = request.tokens[-1] in option.stop_tokens
        assert request.finish_reason == ("stop" if stopped else "length")
    assert engine.cache is None and not engine.running  # every row left


def test_leaving_rows_shrink_the_cache_and_the_rest_continue_exactly():
    model = build(model_config([sf.Attention(heads=2)]))
    engine = Engine(model, max_batch=4)
    long_prompt, short_prompt = list(range(1, 40)), [5, 6]
    first = engine.submit(long_prompt, SamplingOptions(max_new_tokens=2))
    second = engine.submit(short_prompt, SamplingOptions(max_new_tokens=12))
    engine.step()
    assert engine.cache.held == len(long_prompt)  # the short row is left-padded to the long one
    while not first.done:
        engine.step()
    assert engine.cache.held == len(short_prompt) + 1  # the padding left with the long row
    engine.run()
    assert second.tokens == alone(model, short_prompt, second.options)


def test_prefix_cache_resumes_from_the_longest_stored_prefix():
    model = build(model_config([sf.Attention(heads=2), sf.Retention(heads=2)]))
    shared = torch.randint(0, VOCAB, (21,)).tolist()
    prompts = [shared + torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 6, 1)]
    option = SamplingOptions(max_new_tokens=5)
    prefixes = PrefixCache(block=8)
    engine = Engine(model, prefix_cache=prefixes)
    requests = [engine.submit(prompt, option) for prompt in prompts]
    engine.step()  # all three prefilled in order: the later two find the first one's states
    engine.run()
    assert [r.cached_prompt_tokens for r in requests] == [0, 16, 16]
    assert prefixes.hits == 2 and len(prefixes) == 3  # 8, 16 (from the first), 24 (from the second)
    for prompt, request in zip(prompts, requests):
        assert request.tokens == alone(model, prompt, option)
    # a prompt that is itself a stored prefix still runs its last token (its logits choose the first token)
    again = engine.submit(shared[:16], option)
    engine.run()
    assert again.cached_prompt_tokens == 8 and again.tokens == alone(model, shared[:16], option)


def test_prefix_cache_keeps_within_its_bytes():
    model = build(model_config([sf.Attention(heads=2)]))
    one = model(torch.zeros(1, 4, dtype=torch.long), use_cache=True).cache.nbytes()
    prefixes = PrefixCache(block=4, max_bytes=3 * one)  # room for states of 4 + 8 tokens (1 + 2 units), not more
    engine = Engine(model, prefix_cache=prefixes)
    engine.submit(list(range(1, 14)), SamplingOptions(max_new_tokens=1))
    engine.run()
    assert prefixes.nbytes <= 3 * one and len(prefixes) == 1  # 4, 8 then 12 tokens: the oldest ones left
    assert prefixes.longest(list(range(1, 14)))[0] == 12


def test_cancel_max_new_tokens_zero_and_the_context_limit():
    model = build(model_config([sf.Attention(heads=2)], position=sf.LearnedPosition(max_positions=12)))
    engine = Engine(model, max_batch=2)
    running = engine.submit([1, 2, 3], SamplingOptions(max_new_tokens=50))
    nothing = engine.submit([4], SamplingOptions(max_new_tokens=0))
    engine.step()
    assert nothing.done and nothing.finish_reason == "length" and nothing.tokens == []
    engine.run()
    assert running.finish_reason == "length" and len(running.prompt) + len(running.tokens) == 12
    cancelled = engine.submit([1, 2], SamplingOptions(max_new_tokens=50))
    engine.step()
    engine.cancel(cancelled)
    events = engine.step()
    assert (cancelled, None) in events and cancelled.finish_reason == "cancelled" and len(cancelled.tokens) == 1
    assert engine.cache is None


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([VOCAB], "token ids"), ([-1], "token ids")])
def test_bad_prompts_get_one_line(prompt, message):
    engine = Engine(build(model_config([sf.Attention(heads=2)])))
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt)


@pytest.mark.parametrize("options, message", [(dict(max_new_tokens=-1), "max_new_tokens"),
                                              (dict(temperature=float("nan")), "temperature"),
                                              (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p")])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**options)
