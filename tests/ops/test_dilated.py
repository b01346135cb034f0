"""Dilated attention (LongNet) against its dense reference: outputs and gradients, ragged lengths, padding,
the mixing weights' gradient, and TorchScale's grouped head offsets.

Where TorchScale's own DilatedAttention (GitHub; not in any PyPI release) differs from LongNet's definition,
which we keep by default (an independent audit ran its sources in float64 with an exact stand-in for
flash-attn: with ``head_offsets="grouped"`` ours matches it to 4e-15 wherever the definitions agree):

1. A non-causal length that is not a multiple of a segment: TorchScale pads the last segment with zero keys
   and values and does not mask them, so they enter the softmax (causal attention hides them: they come
   after every query). Ours attends only to real tokens ("ragged" cases below, against the dense reference).
2. A segment whose length is not a multiple of its dilation rate: TorchScale pads each segment to a multiple
   of the rate before taking every r-th position, so every later segment, and the positions it selects,
   shift by that padding. Ours cuts segments at multiples of w in the original positions ("ragged": r = 5
   does not divide w = 32).
3. The weights that mix the patterns (each pattern's softmax denominator over their sum) are computed under
   ``torch.no_grad()`` in TorchScale, so they take no gradient; in LongNet's definition the output is one
   function of q, k, v, and ours differentiates it whole (test_gradients_flow_through_the_mixing_weights).
"""

import math

import pytest
import torch

from scaleformer.ops.dilated import dilated_attention, dilated_attention_reference, dilated_bias
from tests.conftest import assert_close

CASES = {  # (T, segment_lengths, dilation_rates)
    "aligned": (16, (4, 8, 16), (1, 2, 4)),
    "ragged": (13, (4, 6, 32), (1, 3, 5)),  # T not a multiple of any w; r not dividing w; w > T
    "single": (10, (3,), (1,)),
    "longnet_like": (24, (4, 8, 16, 32), (1, 2, 4, 6)),
}


def _inputs(dtype, t, b=2, h=5, d=8):
    return [torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def _mask(b, t):
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[1, 7] = False  # a hole
    return mask


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_matches_dense_reference_outputs_and_gradients(case, causal, dtype, kernel, padded):
    t, segments, rates = CASES[case]
    q, k, v = _inputs(dtype, t)
    mask = _mask(2, t) if padded else None
    kwargs = dict(segment_lengths=segments, dilation_rates=rates, causal=causal, key_mask=mask)
    fast = dilated_attention(q, k, v, kernel=kernel, **kwargs)
    ref = dilated_attention_reference(q, k, v, **kwargs)
    assert_close(fast, ref, dtype)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(a, b, dtype)


def test_reference_is_longnets_mixture_of_patterns():
    """O = Σ_i s_i O_i / Σ_j s_j, each pattern's softmax computed on its own, by hand (one head)."""
    t, patterns = 8, [(4, 1), (8, 2)]
    q, k, v = (x.detach() for x in _inputs(torch.float64, t, b=1, h=1, d=4))
    scores = (q[0, 0] @ k[0, 0].T) / 2.0
    outputs, denominators = [], []
    for w, r in patterns:
        keep = torch.tensor([[(i // w == j // w) and (i % w) % r == 0 and (j % w) % r == 0 and j <= i
                              for j in range(t)] for i in range(t)])
        exp = torch.exp(scores) * keep
        s = exp.sum(-1, keepdim=True)
        outputs.append(torch.where(s > 0, (exp @ v[0, 0]) / s.clamp(min=1e-300), 0.0))
        denominators.append(s)
    expected = sum(s * o for s, o in zip(denominators, outputs)) / sum(denominators)
    got = dilated_attention_reference(q, k, v, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True)
    assert_close(got[0, 0], expected, torch.float64)


def test_counts_by_hand():
    pos = torch.arange(8)[None]
    counts = dilated_bias(pos, pos, heads=2, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=False).exp()
    # Head 0, query 0: pattern (4, 1) links keys 0..3; pattern (8, 2) links 0, 2, 4, 6 -> 0 and 2 twice.
    assert counts[0, 0, 0].round().long().tolist() == [2, 1, 2, 1, 1, 0, 1, 0]
    # Head 1 keeps odd offsets in pattern (8, 2): query 1 links 1, 3 twice and 5, 7 once; query 0 none extra.
    assert counts[0, 1, 1].round().long().tolist() == [1, 2, 1, 2, 0, 1, 0, 1]
    assert counts[0, 1, 0].round().long().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    causal = dilated_bias(pos, pos, heads=2, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True)
    above = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert torch.isinf(causal[0, :, above]).all() and torch.isfinite(causal[0, 0].diagonal()).all()


def test_padding_is_invisible():
    q, k, v = (x.detach() for x in _inputs(torch.float64, 12, b=1))
    keep = torch.tensor([0, 2, 3, 4, 7, 8, 9, 11])
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, keep] = True
    kwargs = dict(segment_lengths=(2, 4, 8), dilation_rates=(1, 2, 4), causal=True)
    padded = dilated_attention(q, k, v, key_mask=mask, **kwargs)
    dense = dilated_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep], **kwargs)
    assert_close(padded[:, :, keep], dense, torch.float64)
    assert torch.all(padded[:, :, ~mask[0]] == 0)


def test_gradients_flow_through_the_mixing_weights():
    """Detaching the mixing weights (as TorchScale does) changes the gradient: ours match the reference."""
    q, k, v = _inputs(torch.float64, 8, b=1, h=1)
    fast = dilated_attention(q, k, v, segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True)
    (g_fast,) = torch.autograd.grad(fast.sum(), (q,))
    # Same patterns, mixing weights held constant.
    outs, lses = [], []
    for w, r in ((4, 1), (8, 2)):
        bias = dilated_bias(torch.arange(8)[None], torch.arange(8)[None], heads=1, segment_lengths=(w,),
                            dilation_rates=(r,), causal=True)[0, 0]
        s = (q[0, 0] @ k[0, 0].T) / math.sqrt(8) + torch.where(torch.isfinite(bias), bias, -1e30)
        lses.append(torch.logsumexp(s, -1))  # rows a pattern does not cover: ~ -1e30, weight 0
        outs.append(torch.softmax(s, -1) @ v[0, 0])
    weights = torch.softmax(torch.stack(lses), 0).detach()
    frozen = (weights[..., None] * torch.stack(outs)).sum(0)
    assert_close(frozen, fast[0, 0], torch.float64)  # same values...
    (g_frozen,) = torch.autograd.grad(frozen.sum(), (q,))
    assert (g_frozen - g_fast).abs().max() > 1e-3  # ...different gradients


@pytest.mark.parametrize("segments,rates,message", [
    ((4, 8), (2, 4), "must include 1"),
    ((4,), (1, 2), "equal length"),
    ((4, 8), (1, 9), "1 <= dilation_rate <= segment_length"),
])
def test_bad_patterns_raise(segments, rates, message):
    q, k, v = _inputs(torch.float32, 8)
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=rates, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_batched_head_gathers_equal_per_head_slices(monkeypatch, causal):
    """The GPU layout path (one gather along the offset axis instead of a slice per head), run on CPU."""
    q, k, v = _inputs(torch.float64, 32, h=5)
    kwargs = dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4), causal=causal)
    sliced = dilated_attention(q, k, v, **kwargs)
    grads = torch.autograd.grad(sliced.sum(), (q, k, v))
    from scaleformer.ops.dilated import _Selection

    monkeypatch.setattr(_Selection, "_slice_per_head", staticmethod(lambda x: False))
    batched = dilated_attention(q, k, v, **kwargs)
    assert_close(batched, sliced, torch.float64)
    for a, b in zip(torch.autograd.grad(batched.sum(), (q, k, v)), grads):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_rows_past_a_block_end_never_pair_far_apart_positions(kernel):
    """xPos-like inputs (keys grow, queries shrink exponentially with position) on which q·k of two
    far-apart positions overflows float32. The fast path must only ever form products the definition
    uses or near ones: rows past a block's end copy the block's last row, not position 0 (which, paired
    with the block's late keys, overflowed to inf and turned into NaN at position 0 — seen training
    longnet-base at 32k on a GPU)."""
    t, d = 40, 8
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    growth = torch.linspace(0.5, 1.0, d, dtype=torch.float64) * (86.0 / (t - 1))  # last key ~ e^86 ≈ 2e37
    raw_q, raw_k, v = (torch.randn(2, 3, t, d, dtype=torch.float64) * 4 for _ in range(3))
    q64, k64 = raw_q * torch.exp(-pos * growth), raw_k * torch.exp(pos * growth)
    kwargs = dict(segment_lengths=(16, 32), dilation_rates=(1, 2), causal=True)  # 40 = 2.5 blocks: ragged
    exact = [x.clone().requires_grad_() for x in (q64, k64, v)]
    ref = dilated_attention_reference(*exact, **kwargs)
    ref_grads = torch.autograd.grad(ref, exact, torch.ones_like(ref))
    q, k, v32 = (x.float().requires_grad_() for x in (q64, k64, v))
    fast = dilated_attention(q, k, v32, kernel=kernel, **kwargs)
    assert torch.isfinite(fast).all()
    assert_close(fast, ref.float())
    grads = torch.autograd.grad(fast, (q, k, v32), torch.ones_like(fast))
    assert all(torch.isfinite(g).all() for g in grads)
    # q and k span 1e-37 … 1e37, so their fp32 gradients are ill-conditioned: 10× the usual tolerance
    # (the math kernel and the fused kernel land alike, at ~1.4e-5 of the largest value).
    for got, want, scale in zip(grads, ref_grads, (10, 10, 1)):
        assert_close(got, want.float(), scale=scale)


@pytest.mark.parametrize("heads, rate", [(12, 8), (16, 4), (5, 2), (3, 4), (16, 16)])
def test_grouped_offsets_are_torchscales_head_layout(heads, rate):
    """TorchScale's LongNet reshapes a segment's rows as (l, r1) and its heads as (r2, h) — heads padded to a
    multiple of r — and keeps the diagonal r1 = r2. Emulated on position and head indices here: each head
    keeps exactly the rows of one offset, the one `dilation_offsets(..., "grouped")` gives it."""
    from scaleformer.ops.dilated import dilation_offsets

    length = 4 * rate
    padded_heads = -(-heads // rate) * rate
    positions = torch.arange(length)[:, None].expand(length, padded_heads)  # (rows, heads): each cell's row
    head_ids = torch.arange(padded_heads)[None, :].expand(length, padded_heads)
    views = [x.reshape(length // rate, rate, rate, padded_heads // rate) for x in (positions, head_ids)]  # (l r1) (r2 h)
    kept = [torch.diagonal(x, dim1=1, dim2=2) for x in views]  # (l, h, r): r1 == r2
    expected = {}
    for row, head in zip(kept[0].flatten().tolist(), kept[1].flatten().tolist()):
        if head < heads:
            expected.setdefault(head, set()).add(row % rate)
    offsets = dilation_offsets(heads, rate, "grouped").tolist()
    assert all(len(rows) == 1 for rows in expected.values())
    assert {head: offsets[head] for head in expected} == {head: rows.pop() for head, rows in expected.items()}
    assert dilation_offsets(heads, rate).tolist() == [h % rate for h in range(heads)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", ["ragged", "longnet_like"])
def test_grouped_offsets_fast_path_matches_reference(case, causal):
    t, segments, rates = CASES[case]
    q, k, v = _inputs(torch.float64, t, h=6)
    kwargs = dict(segment_lengths=segments, dilation_rates=rates, causal=causal, key_mask=_mask(2, t),
                  head_offsets="grouped")
    fast, ref = dilated_attention(q, k, v, **kwargs), dilated_attention_reference(q, k, v, **kwargs)
    assert_close(fast, ref, torch.float64)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert_close(a, b, torch.float64)
    modulo = dilated_attention_reference(q, k, v, **{**kwargs, "head_offsets": "modulo"})
    assert not torch.allclose(modulo, ref)  # the rules differ for 6 heads at these rates
    with pytest.raises(ValueError, match="'modulo' or 'grouped'"):
        dilated_attention(q, k, v, **{**kwargs, "head_offsets": "other"})
