import pytest
import torch

from scaleformer.ops.moe import capacity_for, combine, dispatch, dispatch_one_hot_reference, route
from tests.conftest import assert_close


def test_top1_capacity_keeps_the_first_tokens_in_order():
    # 6 tokens, 2 experts; tokens 0, 1, 3, 4 prefer expert 0, tokens 2, 5 expert 1; capacity 2.
    probs = torch.tensor([[.9, .1], [.8, .2], [.3, .7], [.6, .4], [.7, .3], [.2, .8]])
    r = route(probs, top_k=1, capacity=2)
    kept = sorted(zip(r.token.tolist(), r.expert.tolist(), r.slot.tolist()))
    assert kept == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (5, 1, 1)]  # tokens 3 and 4 are over capacity
    assert r.requested.tolist() == [4, 2] and r.counts.tolist() == [2, 2]
    assert torch.equal(r.gate, probs[r.token, r.expert])


def test_top2_first_choices_claim_capacity_before_second_choices():
    probs = torch.tensor([[.6, .3, .1], [.5, .4, .1], [.1, .5, .4]])
    r = route(probs, top_k=2, capacity=2, second_expert_policy="all", normalize_gates=False)
    kept = sorted(zip(r.expert.tolist(), r.slot.tolist(), r.token.tolist()))
    # Expert 0: first choices of tokens 0, 1. Expert 1: first choice of token 2, then second choice of
    # token 0 (token 1's second choice is over capacity). Expert 2: token 2's second choice.
    assert kept == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 0), (2, 0, 2)]


def test_top2_normalized_gates_and_random_policy():
    probs = torch.tensor([[.6, .3, .1], [.5, .05, .45]])
    r = route(probs, top_k=2, capacity=None, second_expert_policy="all", normalize_gates=True)
    gates = {(t, e): g for t, e, g in zip(r.token.tolist(), r.expert.tolist(), r.gate.tolist())}
    assert gates[(0, 0)] == pytest.approx(.6 / .9) and gates[(0, 1)] == pytest.approx(.3 / .9)
    # Random policy: keep the second expert when 2·g₂ > U(0, 1). g₂ = 1/3 (token 0) and 0.45/0.95 (token 1).
    draws = torch.rand(2, generator=torch.Generator().manual_seed(7))
    r = route(probs, top_k=2, capacity=None, second_expert_policy="random", generator=torch.Generator().manual_seed(7))
    second = {t for t, e in zip(r.token.tolist(), r.expert.tolist()) if e != probs[t].argmax()}
    expected = {t for t, g2 in enumerate([.3 / .9, .45 / .95]) if 2 * g2 > draws[t]}
    assert second == expected


def test_capacity_formula():
    assert capacity_for(8192, 64, 1, 1.0) == 128
    assert capacity_for(100, 8, 2, 1.25) == 32  # ceil(1.25 · 2 · 100 / 8) = ceil(31.25)
    assert capacity_for(3, 64, 1, 1.0) == 1 and capacity_for(10, 4, 1, None) is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_index_dispatch_matches_one_hot_einsums(top_k):
    n, c, e = 37, 8, 5
    x = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(n, e, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(e, c, c, dtype=torch.float64)
    routing = route(torch.softmax(logits, -1), top_k=top_k, capacity=capacity_for(n, e, top_k, 1.0))
    fast = combine(torch.tanh(dispatch(x, routing, e) @ weight), routing, n)
    mask, weights = dispatch_one_hot_reference(x, routing, e)
    buffer = torch.einsum("nes,nc->esc", mask, x)
    ref = torch.einsum("nes,esc->nc", weights, torch.tanh(buffer @ weight))
    assert_close(fast, ref, torch.float64)
    grad = torch.randn_like(ref)
    fast_grads = torch.autograd.grad(fast, (x, logits), grad, retain_graph=True)  # the routing graph is shared
    for a, b in zip(fast_grads, torch.autograd.grad(ref, (x, logits), grad)):
        assert_close(a, b, torch.float64)
    assert (routing.counts < routing.requested).any()  # the capacity really dropped assignments
    dropped = set(range(n)) - set(routing.token.tolist())
    assert all(fast[t].abs().sum() == 0 for t in dropped)  # a token with no expert left: nothing from the layer
    if top_k == 1:
        assert dropped
