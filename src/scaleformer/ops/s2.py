"""S2-Attention (arXiv 2407.17678): sparsely-sharded attention, each head reading a different strided shard
of the context plus a local window, at the granularity of blocks of ``block`` positions.

Query block i, key block j, head h (blocks of positions: block = position // b):

    causal:        visible iff j ≤ i and (i − j < local_blocks or (j + h·step + offset) mod vert_stride == 0)
    bidirectional: visible iff |i − j| < local_blocks or (j + h·step + offset) mod vert_stride == 0

with step = max(1, ⌊vert_stride / H⌋) (heterogeneous heads, whose shards together cover every block) or 0
(``homo_head``: one shard for every head) and offset 1 by default: DKernel's rule, which Phi-3-small uses
(``(j + h·step + 1) mod vert_stride == 0``; head 0 reads blocks 7, 15, 23, ... at stride 8, ending each
shard at the block just before a multiple of the stride; layouts saved before this default record offset 0,
and keep it). The first ``dense_heads`` heads see every block. Within a causal
block a query sees only the keys at or before its own position. A user layout replaces the rule: a
boolean (H, N_q, N_k) block mask, or a function (query block, key block, head) -> bool tensors; a query
block always reads itself as well, so no query is left without keys. The heads' shards cover every block
only when heads ≥ vert_stride (then step = 1; Phi-3-small: 32 heads, stride 8).

:func:`s2_attention_reference` applies that mask densely (the readable definition, and the path for
padding, packed documents and cached steps); :func:`s2_attention` visits only the kept blocks: per head
and query block it gathers the kept key blocks and runs one fused attention over them, query blocks in
groups so memory stays bounded. Shapes: B batch, H heads, H_kv key/value heads, T length, D head dim.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleformer.ops.attention import attention_reference, repeat_kv_heads
from scaleformer.ops.dilated import kernel_backward, kernel_forward, kernel_name, merge_by_lse, with_real_tokens_first

__all__ = ["S2Layout", "s2_attention", "s2_attention_reference", "s2_token_mask"]

BlockRule = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class S2Layout:
    """Which key blocks each head's query blocks read (see the module docstring)."""

    block: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    homo_head: bool = False
    dense_heads: int = 0
    #: 1 is DKernel's (and Phi-3-small's) rule: head 0 reads blocks stride-1, 2·stride-1, ...
    head_offset: int = 1
    #: a user layout: (H, N_q, N_k) bool block mask (N ≥ the blocks used), or f(i, j, h) -> bool, broadcasting
    custom: Tensor | BlockRule | None = None

    def __post_init__(self) -> None:
        for name in ("block", "local_blocks", "vert_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"S2 {name} must be >= 1, got {getattr(self, name)}")
        if self.dense_heads < 0 or self.head_offset < 0:
            raise ValueError("S2 dense_heads and head_offset must be >= 0")

    def blocks(self, heads: int, query_blocks: Tensor, key_blocks: Tensor, causal: bool) -> Tensor:
        """Bool (H, *broadcast(query_blocks, key_blocks)): head h's query block reads the key block."""
        h = torch.arange(heads, device=query_blocks.device).view(heads, *([1] * query_blocks.dim()))
        return self.reads(heads, h, query_blocks[None], key_blocks[None], causal)

    def reads(self, heads: int, h: Tensor, i: Tensor, j: Tensor, causal: bool) -> Tensor:
        """Bool broadcast(h, i, j): head h (of ``heads``) at query block i reads key block j."""
        if self.custom is not None:
            if callable(self.custom):
                seen = self.custom(i, j, h)
            else:
                seen = self.custom.to(i.device)[h, i, j]
            seen = seen | (i == j)  # a query always reads its own block (as the rule's local window does)
        else:
            step = 0 if self.homo_head else max(1, self.vert_stride // heads)
            distance = i - j if causal else (i - j).abs()
            seen = (distance < self.local_blocks) | ((j + h * step + self.head_offset) % self.vert_stride == 0)
            seen = seen | (h < self.dense_heads)
        seen = seen.expand(torch.broadcast_shapes(h.shape, i.shape, j.shape))
        return seen & (j <= i) if causal else seen

    def read_later(self, heads: int, h: Tensor, first_query_block: Tensor, j: Tensor) -> Tensor:
        """Bool broadcast(h, first_query_block, j): causal head h reads key block j from some query block
        at or after ``first_query_block`` (decoding: which cached blocks a future query can still read).
        A callable layout cannot be asked about every future block: it keeps everything."""
        if self.custom is None:
            step = 0 if self.homo_head else max(1, self.vert_stride // heads)
            seen = (j > first_query_block - self.local_blocks) | (h < self.dense_heads)
            seen = seen | ((j + h * step + self.head_offset) % self.vert_stride == 0)
        elif callable(self.custom):
            seen = torch.ones((), dtype=torch.bool, device=j.device)
        else:  # any later row of the mask, or the block's own row (always read)
            later = self.custom.to(j.device, torch.int8).flip(1).cummax(1).values.flip(1).bool()  # any row ≥ i reads j
            rows = first_query_block.clamp(max=self.custom.shape[1] - 1)
            seen = later[h, rows, j] | (j >= first_query_block)
        return seen.expand(torch.broadcast_shapes(h.shape, first_query_block.shape, j.shape))


def s2_token_mask(layout: S2Layout, heads: int, q_pos: Tensor, k_pos: Tensor, causal: bool) -> Tensor:
    """Bool (B, H, T, S) from positions (B, T), (B, S): the layout's blocks, and order within them."""
    seen = layout.blocks(heads, q_pos[:, :, None] // layout.block, k_pos[:, None, :] // layout.block, causal)
    seen = seen.transpose(0, 1)  # (B, H, T, S)
    return seen & (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) if causal else seen


def s2_attention_reference(q: Tensor, k: Tensor, v: Tensor, layout: S2Layout, *, causal: bool = True,
                           q_positions: Tensor | None = None, k_positions: Tensor | None = None,
                           mask: Tensor | None = None) -> Tensor:
    """Dense attention under the S2 mask. Positions (B, T) / (B, S) default to 0..T−1; ``mask`` (B, 1, T, S)
    bool further restricts it (padding, documents, slot causality). A query that sees no key (only
    possible for padding) keeps its own slot, as every attention here does."""
    b, heads, t, _ = q.shape
    s = k.shape[2]
    if q_positions is None:
        q_positions = torch.arange(s - t, s, device=q.device).expand(b, t)
    if k_positions is None:
        k_positions = torch.arange(s, device=q.device).expand(b, s)
    seen = s2_token_mask(layout, heads, q_positions, k_positions, causal)
    if mask is not None:
        seen = seen & mask
    own = torch.arange(s, device=q.device)[None, :] == torch.arange(s - t, s, device=q.device)[:, None]
    seen = seen | (own & ~seen.any(-1, keepdim=True))
    return attention_reference(q, k, v, mask=seen)


def s2_attention(q: Tensor, k: Tensor, v: Tensor, layout: S2Layout, *, causal: bool = True,
                 key_mask: Tensor | None = None, scale: float | None = None, kernel: str = "auto",
                 budget_bytes: int = 64 * 2**20) -> Tensor:
    """S2 attention over whole sequences (positions 0..T−1), visiting only the kept blocks; same function as
    :func:`s2_attention_reference` (with ``mask`` = the key mask). ``key_mask`` (B, T) bool marks real tokens
    (padding anywhere: real tokens are moved to the front, so slot equals position); padding rows come out 0.

    How: every query block reads its own block (causal within it, in one call for all blocks), and, in
    separate calls, the other key blocks it keeps: all visible, so no mask is built. Query blocks are
    bucketed by how many such blocks they read, so a call's gathered keys need no padding either; the two
    parts are merged by log-sum-exp. Dense heads run one fused attention. ``kernel`` as in
    :func:`scaleformer.ops.dilated.dilated_attention`; ``budget_bytes`` bounds one call's gathered keys and
    values. ``kernel="triton"`` runs every head in one block-sparse Triton kernel instead, its tile lists
    made from the layout (:mod:`scaleformer.ops.block_sparse_triton`).
    """
    b, heads, t, d = q.shape
    scale = d**-0.5 if scale is None else scale
    k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
    if kernel == "triton":
        from scaleformer.ops.block_sparse_triton import block_sparse_attention, tile_size

        passes = (_triton_pass(layout, heads, t, causal, tile_size(q.device), q.device),)
        return with_real_tokens_first(
            lambda q, k, v, lengths: block_sparse_attention(q, k, v, passes, causal=causal, lengths=lengths,
                                                            scale=scale), q, k, v, key_mask)

    def kept_blocks(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None) -> Tensor:
        dense = min(layout.dense_heads, heads) if layout.custom is None else 0
        out = []
        if dense:
            out.append(_dense_heads(q[:, :dense], k[:, :dense], v[:, :dense], causal, lengths, scale))
        if dense < heads:
            sparse = [x[:, dense:].contiguous() for x in (q, k, v)]
            if causal and layout.custom is None:  # the rule's windows and strides: views, no gathers
                parts = _causal_rule_parts(layout, heads, dense, math.ceil(t / layout.block))
                out.append(_S2CausalRule.apply(*sparse, parts, scale, kernel_name(q, kernel, has_bias=False)))
            else:
                plan = _plan(layout, heads, dense, t, causal, q.device,
                             budget_bytes // max(1, b * d * q.element_size() * 2))
                bias = None if causal or (lengths is None and t % layout.block == 0) else _key_bias(
                    lengths if lengths is not None else torch.full((b,), t, device=q.device), plan.n * layout.block,
                    q.dtype)
                out.append(_S2Attention.apply(*sparse, plan, bias, scale,
                                              kernel_name(q, kernel, has_bias=bias is not None)))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]

    return with_real_tokens_first(kept_blocks, q, k, v, key_mask)


@functools.lru_cache(maxsize=32)
def _triton_pass(layout: S2Layout, heads: int, t: int, causal: bool, tile: int, device: torch.device):
    """The layout as one block-sparse pass of the Triton kernel (every head, dense ones included)."""
    from scaleformer.ops.block_sparse_triton import block_layout_pass

    blocks = torch.arange(math.ceil(t / layout.block), device=device)
    kept = layout.blocks(heads, blocks[:, None], blocks[None, :], causal)  # (H, N, N)
    return block_layout_pass(t, kept, layout.block, causal, tile)


def _dense_heads(q: Tensor, k: Tensor, v: Tensor, causal: bool, lengths: Tensor | None, scale: float) -> Tensor:
    if lengths is None or causal:  # causal: padding (a tail) is never before a real query
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    bias = _key_bias(lengths, q.shape[2], q.dtype)[:, None, None, :]  # (B, 1, 1, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(-1, -1, q.shape[2], -1), scale=scale)


def _key_bias(lengths: Tensor, slots: int, dtype: torch.dtype) -> Tensor:
    """(B, slots) additive: 0 on real keys, a large finite negative on padding (an all-padding row stays
    finite: uniform weights over its padding, discarded anyway)."""
    masked = max(-1e9, torch.finfo(dtype).min / 2)
    positions = torch.arange(slots, device=lengths.device)
    return torch.zeros(lengths.shape[0], slots, dtype=dtype, device=lengths.device).masked_fill(
        positions[None, :] >= lengths[:, None], masked)


@dataclass(frozen=True)
class _Bucket:
    """Query blocks (one per row: head ``head``, block ``query``) that each read ``keys`` (R, C) other blocks."""

    head: Tensor
    query: Tensor
    keys: Tensor


@dataclass(frozen=True)
class _Plan:
    n: int  # blocks (the last one may be partial: it is padded)
    size: int
    heads: int  # sparse heads
    causal: bool
    buckets: tuple[_Bucket, ...]


def _plan(layout: S2Layout, heads: int, first: int, t: int, causal: bool, device: torch.device,
          budget_rows: int) -> _Plan:
    """The off-diagonal kept blocks of the sparse heads, bucketed by how many each query block reads and
    split so that one call gathers at most ``budget_rows`` key rows."""
    n = math.ceil(t / layout.block)
    blocks = torch.arange(n, device=device)
    kept = layout.blocks(heads, blocks[:, None], blocks[None, :], causal)[first:]  # (h, N, N)
    kept = kept & ~torch.eye(n, dtype=torch.bool, device=device)  # the diagonal has its own call
    counts = kept.sum(-1)  # (h, N)
    order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices  # kept blocks first, ascending
    buckets = []
    for count in torch.unique(counts).tolist():
        if count == 0:
            continue
        head, query = (counts == count).nonzero(as_tuple=True)
        keys = order[head, query, :count]
        rows = max(1, budget_rows // (count * layout.block))
        for start in range(0, head.shape[0], rows):
            part = slice(start, start + rows)
            buckets.append(_Bucket(head[part], query[part], keys[part]))
    return _Plan(n=n, size=layout.block, heads=kept.shape[0], causal=causal, buckets=tuple(buckets))


def _blocks(x: Tensor, plan: "_Plan | _RuleParts") -> Tensor:
    """(B, h, T, D) -> (B, h, N, b, D), the tail padded with zeros."""
    pad = plan.n * plan.size - x.shape[2]
    return (F.pad(x, (0, 0, 0, pad)) if pad else x).unflatten(2, (plan.n, plan.size))


class _S2Attention(torch.autograd.Function):
    """Forward and backward of the sparse heads over blocked tensors: the diagonal call, then each bucket.
    Backward feeds every call the merged output and log-sum-exp (see scaleformer.ops.dilated's kernels)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, bias: Tensor | None, scale: float, kernel: str):
        t = q.shape[2]
        qb, kb, vb = (_blocks(x, plan) for x in (q, k, v))
        b, h, n, size, d = qb.shape
        diag_bias = None if bias is None else bias.view(b, 1, n, 1, size).expand(b, h, n, 1, size).flatten(1, 2)
        out, lse = kernel_forward(qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2), plan.causal, diag_bias,
                                  scale, kernel)
        out, lse = out.unflatten(1, (h, n)).to(torch.promote_types(q.dtype, torch.float32)), lse.unflatten(1, (h, n))
        for bucket in plan.buckets:
            keys, values, key_bias = _gather_keys(kb, vb, bias, bucket, size)
            o_i, lse_i = kernel_forward(qb[:, bucket.head, bucket.query], keys, values, False, key_bias, scale, kernel)
            rows = (slice(None), bucket.head, bucket.query)
            out[rows], lse[rows] = merge_by_lse(out[rows], lse[rows], o_i, lse_i)
        out = out.to(q.dtype)
        ctx.save_for_backward(qb, kb, vb, out, lse, bias)
        ctx.plan, ctx.scale, ctx.kernel, ctx.t = plan, scale, kernel, t
        return out.flatten(2, 3)[:, :, :t]

    @staticmethod
    def backward(ctx, grad):
        qb, kb, vb, out, lse, bias = ctx.saved_tensors
        plan, scale, kernel, t = ctx.plan, ctx.scale, ctx.kernel, ctx.t
        b, h, n, size, d = qb.shape
        grad = _blocks(grad, plan).contiguous()
        diag_bias = None if bias is None else bias.view(b, 1, n, 1, size).expand(b, h, n, 1, size).flatten(1, 2)
        dq, dk, dv = kernel_backward(grad.flatten(1, 2), qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2),
                                     out.flatten(1, 2), lse.flatten(1, 2), plan.causal, diag_bias, scale, kernel)
        dq, dk, dv = (g.unflatten(1, (h, n)).contiguous() for g in (dq, dk, dv))
        for bucket in plan.buckets:
            keys, values, key_bias = _gather_keys(kb, vb, bias, bucket, size)
            rows = (slice(None), bucket.head, bucket.query)
            dq_i, dk_i, dv_i = kernel_backward(grad[rows], qb[rows], keys, values, out[rows], lse[rows], False,
                                               key_bias, scale, kernel)
            dq[rows] += dq_i.to(dq.dtype)
            index = (bucket.head[:, None], bucket.keys)  # a key block may appear in many rows: accumulate
            for target, g in ((dk, dk_i), (dv, dv_i)):
                target.transpose(0, 2).transpose(0, 1).index_put_(  # (h, N, B, b, D) view
                    index, g.unflatten(2, (-1, size)).to(target.dtype).permute(1, 2, 0, 3, 4), accumulate=True)
        return (*(g.flatten(2, 3)[:, :, :t] for g in (dq, dk, dv)), None, None, None, None)


def _gather_keys(kb: Tensor, vb: Tensor, bias: Tensor | None, bucket: _Bucket,
                 size: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """A bucket's key and value blocks, (B, R, C·b, D) each, and their key bias (B, R, 1, C·b) or None."""
    index = (slice(None), bucket.head[:, None], bucket.keys)
    keys, values = kb[index].flatten(2, 3), vb[index].flatten(2, 3)
    if bias is None:
        return keys, values, None
    key_bias = bias.view(bias.shape[0], -1, size)[:, bucket.keys].flatten(2)[:, :, None, :]
    return keys, values, key_bias


# The causal rule without gathers. Besides its own block (the diagonal call), query block i of head h reads
#   local:    blocks max(0, i−L+1) .. i−1, a contiguous run: a prefix of the keys while i < L−1 (one call per
#             such i, every head), then a window of L−1 blocks sliding by one block — an overlapping strided
#             view of the keys (one call per head);
#   vertical: blocks j ≤ i−L with j ≡ c_h (mod stride): a prefix of that head's keys compacted to every
#             stride-th block, the same prefix (m blocks) for a run of `stride` consecutive query blocks (one
#             call per head and m).
# Every part's keys are all visible, so no call needs a mask; the parts are merged by log-sum-exp.


@dataclass(frozen=True)
class _RuleParts:
    n: int  # blocks (the last one may be partial: it is padded)
    size: int
    local: int  # L − 1 off-diagonal local blocks
    columns: tuple[int, ...]  # per sparse head: c_h, the first block of its vertical shard
    stride: int
    runs: tuple[tuple[int, int, int, int], ...]  # (head, m, first query block, end query block)


@functools.lru_cache(maxsize=64)
def _causal_rule_parts(layout: S2Layout, heads: int, first: int, n: int) -> _RuleParts:
    """The calls of the causal rule for ``heads`` heads (sparse from ``first``) over ``n`` blocks; depends
    only on shapes, so built once and shared by every layer and step."""
    step = 0 if layout.homo_head else max(1, layout.vert_stride // heads)
    s, local = layout.vert_stride, layout.local_blocks
    columns = tuple((-(h * step + layout.head_offset)) % s for h in range(first, heads))
    runs = []
    for head, column in enumerate(columns):
        m = 1
        while (start := column + local + (m - 1) * s) < n:
            runs.append((head, m, start, min(n, start + s)))
            m += 1
    return _RuleParts(n=n, size=layout.block, local=local - 1, columns=columns, stride=s, runs=tuple(runs))


def _rule_calls(qb: Tensor, kb: Tensor, vb: Tensor, parts: _RuleParts, compacted: list[tuple[Tensor, Tensor]]):
    """Yield (rows, q, k, v, kind, info) for every off-diagonal call: ``rows`` indexes the (B, h, N, b, ·)
    outputs it writes; q (B, G, rows·b, D), k and v (B, G, keys, D) are views."""
    b, h, n, size, d = qb.shape
    for i in range(1, min(n, parts.local)):  # i < L − 1: every earlier block is local
        yield (slice(None), slice(None), i), qb[:, :, i], kb[:, :, :i].flatten(2, 3), vb[:, :, :i].flatten(2, 3), \
            "prefix", i
    if parts.local and n > parts.local:
        windows = n - parts.local
        for head in range(h):
            k_windows, v_windows = (x[:, head].as_strided((b, windows, parts.local * size, d),
                                                          (x.stride(0), size * d, d, 1)) for x in (kb, vb))
            yield (slice(None), head, slice(parts.local, n)), qb[:, head, parts.local:], k_windows, v_windows, \
                "window", head
    for head, m, start, end in parts.runs:
        keys, values = compacted[head]
        yield (slice(None), head, slice(start, end)), qb[:, head, start:end].flatten(1, 2)[:, None], \
            keys[:, :m].flatten(1, 2)[:, None], values[:, :m].flatten(1, 2)[:, None], "vertical", (head, m)


def _compact(kb: Tensor, vb: Tensor, parts: _RuleParts) -> list[tuple[Tensor, Tensor]]:
    return [(kb[:, head, column::parts.stride].contiguous(), vb[:, head, column::parts.stride].contiguous())
            for head, column in enumerate(parts.columns)]


class _S2CausalRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, parts: _RuleParts, scale: float, kernel: str):
        t = q.shape[2]
        qb, kb, vb = (_blocks(x, parts).contiguous() for x in (q, k, v))
        b, h, n, size, d = qb.shape
        out, lse = kernel_forward(qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2), True, None, scale, kernel)
        out = out.unflatten(1, (h, n)).to(torch.promote_types(q.dtype, torch.float32))
        lse = lse.unflatten(1, (h, n))
        for rows, q_i, k_i, v_i, _, _ in _rule_calls(qb, kb, vb, parts, _compact(kb, vb, parts)):
            o_i, lse_i = kernel_forward(q_i, k_i, v_i, False, None, scale, kernel)
            o_rows, lse_rows = out[rows], lse[rows]
            merged, merged_lse = merge_by_lse(o_rows, lse_rows, o_i.reshape(o_rows.shape), lse_i.reshape(lse_rows.shape))
            o_rows.copy_(merged)
            lse_rows.copy_(merged_lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(qb, kb, vb, out, lse)
        ctx.parts, ctx.scale, ctx.kernel, ctx.t = parts, scale, kernel, t
        return out.flatten(2, 3)[:, :, :t]

    @staticmethod
    def backward(ctx, grad):
        qb, kb, vb, out, lse = ctx.saved_tensors
        parts, scale, kernel, t = ctx.parts, ctx.scale, ctx.kernel, ctx.t
        b, h, n, size, d = qb.shape
        grad = _blocks(grad, parts).contiguous()
        dq, dk, dv = kernel_backward(grad.flatten(1, 2), qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2),
                                     out.flatten(1, 2), lse.flatten(1, 2), True, None, scale, kernel)
        dq, dk, dv = (g.unflatten(1, (h, n)).contiguous() for g in (dq, dk, dv))
        compacted = _compact(kb, vb, parts)
        compacted_grads = [(torch.zeros_like(keys), torch.zeros_like(values)) for keys, values in compacted]
        for rows, q_i, k_i, v_i, kind, info in _rule_calls(qb, kb, vb, parts, compacted):
            shape = q_i.shape
            dq_i, dk_i, dv_i = kernel_backward(grad[rows].reshape(shape), q_i, k_i, v_i, out[rows].reshape(shape),
                                               lse[rows].reshape(shape[:-1]), False, None, scale, kernel)
            dq[rows] += dq_i.reshape(dq[rows].shape).to(dq.dtype)
            for target, g, compact in ((dk, dk_i, 0), (dv, dv_i, 1)):
                if kind == "prefix":  # keys: blocks 0 .. i−1 of every head
                    target[:, :, :info] += g.unflatten(2, (info, size)).to(target.dtype)
                elif kind == "window":  # window w holds blocks w .. w+L−2 (w = query block − L + 1)
                    g = g.unflatten(2, (parts.local, size))
                    windows = g.shape[1]
                    for offset in range(parts.local):
                        target[:, info, offset:offset + windows] += g[:, :, offset].to(target.dtype)
                else:  # vertical: the first m compacted blocks of the head
                    head, m = info
                    compacted_grads[head][compact][:, :m] += g[:, 0].unflatten(1, (m, size)).to(target.dtype)
        for head, column in enumerate(parts.columns):
            dk[:, head, column::parts.stride] += compacted_grads[head][0]
            dv[:, head, column::parts.stride] += compacted_grads[head][1]
        return (*(g.flatten(2, 3)[:, :, :t] for g in (dq, dk, dv)), None, None, None)
