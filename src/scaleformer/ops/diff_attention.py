"""Differential attention (DIFF Transformer, arXiv 2410.05258): two softmax maps, one subtracted from the other.

Shapes: B batch, h differential heads, T / S query / key lengths, d component head dim.

Contract of :func:`diff_attention` and :func:`diff_attention_reference` (the layout the projections give):
    q (B, 2h, T, d): component heads; differential head i owns components 2i (first map) and 2i + 1 (second)
    k (B, 2g, S, d): 2g key component heads (g = key/value heads); component head m reads key head
        m // (h / g), as the paper's code repeats them
    v (B, 2g, S, d): value head j is the pair of value component heads 2j, 2j + 1 joined (width 2d);
        differential head i reads value head i // (h / g)
    lam: scalar tensor λ; mask, bias, causal as in :mod:`scaleformer.ops.attention`
    -> (B, h, T, 2d):  (softmax(q₁k₁ᵀ/√d) − λ·softmax(q₂k₂ᵀ/√d)) v

Because both maps multiply the same values, the difference of the maps times v is the difference of two
ordinary attention outputs: the fast path is two fused attention calls; the reference builds both maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scaleformer.ops.attention import attention, attention_reference, causal_mask, repeat_kv_heads

__all__ = ["diff_attention", "diff_attention_reference", "components"]


def components(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q₁, q₂, k₁, k₂, v): each (B, h, ·, d) but v (B, h, S, 2d), every differential head's own."""
    heads = q.shape[1] // 2
    if q.shape[1] % 2 or k.shape[1] % 2 or v.shape[1] != k.shape[1]:
        raise ValueError(f"expected 2h query and 2g key/value component heads, got {q.shape[1]}, {k.shape[1]}, "
                         f"{v.shape[1]}")
    k = repeat_kv_heads(k, 2 * heads)
    joined = v.unflatten(1, (-1, 2)).transpose(2, 3).flatten(-2)  # (B, g, S, 2d): heads 2j and 2j+1 side by side
    return q[:, 0::2], q[:, 1::2], k[:, 0::2], k[:, 1::2], repeat_kv_heads(joined, heads)


def diff_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, *, mask: Tensor | None = None,
                   bias: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """Fast path: softmax(q₁k₁ᵀ)v − λ·softmax(q₂k₂ᵀ)v through two fused attention calls."""
    q1, q2, k1, k2, values = components(q, k, v)
    first = attention(q1, k1, values, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p)
    second = attention(q2, k2, values, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p)
    return first - lam.to(first.dtype) * second


def diff_attention_reference(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, *, mask: Tensor | None = None,
                             bias: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """The definition: both maps written out, their difference applied to the values (float32 or wider)."""
    if dropout_p:
        return _reference_with_dropout(q, k, v, lam, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p)
    q1, q2, k1, k2, values = components(q, k, v)
    dtype = torch.promote_types(q.dtype, torch.float32)
    if causal:
        tri = causal_mask(q.shape[-2], k.shape[-2], q.device)
        mask = tri if mask is None else mask & tri

    def softmax_map(queries: Tensor, keys: Tensor) -> Tensor:
        scores = queries.to(dtype) @ keys.to(dtype).transpose(-1, -2) * queries.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias.to(dtype)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)

    difference = softmax_map(q1, k1) - lam.to(dtype) * softmax_map(q2, k2)
    return (difference @ values.to(dtype)).to(v.dtype)


def _reference_with_dropout(q, k, v, lam, *, mask, bias, causal, dropout_p):
    # Dropout draws one mask per map; the op reference does the same, one map at a time.
    q1, q2, k1, k2, values = components(q, k, v)
    first = attention_reference(q1, k1, values, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p)
    second = attention_reference(q2, k2, values, mask=mask, bias=bias, causal=causal, dropout_p=dropout_p)
    return first - lam.to(first.dtype) * second
