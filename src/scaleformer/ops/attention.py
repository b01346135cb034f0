"""Scaled dot-product attention: one contract, a fast path and a pure-PyTorch reference.

Shapes (legend used throughout the package):
    B batch, H heads, T / Tq / Tk sequence lengths (queries / keys), D head dim.

Contract of :func:`attention` and :func:`attention_reference`:
    q (B, H, Tq, D), k and v (B, H_kv, Tk, D) -> out (B, H, Tq, D); H_kv divides H and query head h
        reads key/value head h // (H / H_kv) (grouped-query attention; H_kv = H is multi-head, 1 multi-query)
    mask: bool, broadcastable to (B, H, Tq, Tk), True = the query may attend to the key.
    bias: float, broadcastable to (B, H, Tq, Tk), added to the scores (relative position bias).
    causal: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, so it is right with a cache).
    sink: float (H,), attention sinks (gpt-oss): one learned logit per query head in every row's softmax
        denominator and nothing in its numerator, softmax over [scores, sink] with the sink's column dropped,
        so a row may give less than all of its mass to the keys.
    Every query row must see at least one key; the layers guarantee it by always letting a query see
    its own position (a padded query then attends to itself instead of producing NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "attention_reference", "causal_mask", "repeat_kv_heads"]


def repeat_kv_heads(x: Tensor, heads: int) -> Tensor:
    """Key or value heads (B, H_kv, T, D) repeated to (B, H, T, D): each serves H / H_kv query heads in a row."""
    kv_heads = x.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads cannot be shared evenly by {heads} query heads")
    return x if kv_heads == heads else x.repeat_interleave(heads // kv_heads, dim=1)


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> Tensor:
    """Bool (Tq, Tk) mask, True where key j <= query i + (Tk - Tq)."""
    q_index = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= q_index


def _combined_mask(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> Tensor | None:
    if causal:
        tri = causal_mask(q.shape[-2], k.shape[-2], q.device)
        mask = tri if mask is None else mask & tri
    return mask


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
                        causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                        sink: Tensor | None = None) -> Tensor:
    """Attention written out: softmax(q kᵀ · scale + bias, masked) v, in float32 or wider."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    mask = _combined_mask(q, k, mask, causal)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sink is not None:  # one more column in the softmax, dropped after it
        column = sink.to(compute_dtype)[:, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.to(compute_dtype)).to(q.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None,
              causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
              sink: Tensor | None = None) -> Tensor:
    """Attention through ``torch.nn.functional.scaled_dot_product_attention`` (same contract as the reference)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if sink is not None:
        return _with_sink(q, k, v, sink, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)
    if kv_heads != heads and q.shape[-2] < k.shape[-2]:
        return _grouped_as_rows(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)
    # Full-length calls (training, prefill): the grouped heads are repeated (a copy of this call's keys only;
    # the cache keeps H_kv heads), so the fused causal kernels apply.
    k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
    if bias is None and mask is None and causal and q.shape[-2] == k.shape[-2]:
        # SDPA's is_causal is top-left aligned, which matches ours only when Tq == Tk; it lets SDPA pick a
        # flash/efficient kernel with no mask tensor at all.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    mask = _combined_mask(q, k, mask, causal)
    attn_mask: Tensor | None = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)


def _grouped_as_rows(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, bias: Tensor | None, causal: bool,
                     scale: float | None, dropout_p: float) -> Tensor:
    """Grouped-query attention without copying keys: the G = H / H_kv query heads that read one key/value
    head become G× more query rows of that head. For decoding steps (few queries, a long cache), where
    repeating the cached keys and values would cost more than the attention itself."""
    b, heads, tq, d = q.shape
    kv_heads, tk = k.shape[1], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads cannot be shared evenly by {heads} query heads")
    group = heads // kv_heads
    mask = _combined_mask(q, k, mask, causal)  # explicit: the rows are regrouped, a causal flag would misalign
    attn_mask: Tensor | None = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    if attn_mask is not None:  # (B | 1, H | 1, Tq, Tk) -> (B | 1, H_kv, G·Tq, Tk), head h = kv·G + j
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        attn_mask = attn_mask.expand(attn_mask.shape[0], heads, tq, tk).reshape(-1, kv_heads, group * tq, tk)
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, group * tq, d), k, v, attn_mask=attn_mask,
                                         scale=scale, dropout_p=dropout_p)
    return out.reshape(b, heads, tq, d)


def _with_sink(q: Tensor, k: Tensor, v: Tensor, sink: Tensor, *, mask: Tensor | None, bias: Tensor | None,
               causal: bool, scale: float | None, dropout_p: float) -> Tensor:
    """Attention sinks: exp(sink) in every row's denominator, nothing in its numerator.

    Without a mask or bias, as many queries as keys (training, prefill) or no causal constraint, the fused
    kernels keep working: every head gets one more channel, 1 in each query and 0 in each real key, so the
    scores are unchanged (the scale stays 1/√D), and one more key, 0 but for sink / scale in that channel
    (score = sink), with a zero value. Causal calls also get a dummy first query, so SDPA's top-left causal
    mask lets real query i see the sink and keys 0 … i; its output row and the extra channel are dropped.
    Everything else (decoding steps, masks, biases) is written out per key/value head, the G query heads of
    a group as G·Tq rows of it (no copy of the cached keys and values), the sink one more softmax column."""
    b, heads, tq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    kv_heads, tk = k.shape[1], k.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads cannot be shared evenly by {heads} query heads")
    if mask is None and bias is None and (tq == tk or not causal) and tq > 1:
        k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
        sink_key = torch.cat([k.new_zeros(b, heads, 1, d), (sink / scale).to(k.dtype)[None, :, None, None]
                              .expand(b, heads, 1, 1)], dim=-1)
        keys = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)
        values = F.pad(v, (0, 1, 1, 0))  # the sink's value row, and the extra channel: zeros
        queries = F.pad(q, (0, 1), value=1.0)
        if causal:
            queries = F.pad(queries, (0, 0, 1, 0))  # the dummy first query (all zeros)
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=causal, scale=scale, dropout_p=dropout_p)
        return out[:, :, 1:, :d] if causal else out[..., :d]
    group = heads // kv_heads
    scores = (q.reshape(b, kv_heads, group * tq, d) @ k.transpose(-1, -2)).view(b, heads, tq, tk) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    mask = _combined_mask(q, k, mask, causal)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    column = sink.to(scores.dtype)[None, :, None, None].expand(b, heads, tq, 1)
    probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1, dtype=torch.promote_types(
        scores.dtype, torch.float32))[..., :-1].to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs.reshape(b, kv_heads, group * tq, tk) @ v).view(b, heads, tq, d)
