"""S2-Attention (arXiv 2407.17678): sparsely-sharded attention, each head reading a different strided shard
of the context plus a local window, at the granularity of blocks of ``block`` positions.

Query block i, key block j, head h (blocks of positions: block = position // b):

    causal:        visible iff j ≤ i and (i − j < local_blocks or (j + h·step + offset) mod vert_stride == 0)
    bidirectional: visible iff |i − j| < local_blocks or (j + h·step + offset) mod vert_stride == 0

with step = max(1, ⌊vert_stride / H⌋) (heterogeneous heads, whose shards together cover every block) or 0
(``homo_head``: one shard for every head); the first ``dense_heads`` heads see every block. Within a causal
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

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from scaleformer.ops.attention import attention_reference, repeat_kv_heads

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
    head_offset: int = 0
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
        i, j = query_blocks[None], key_blocks[None]
        if self.custom is not None:
            if callable(self.custom):
                seen = self.custom(i, j, h).expand(heads, *torch.broadcast_shapes(i.shape[1:], j.shape[1:]))
            else:
                seen = self.custom.to(query_blocks.device)[h, i, j]
            seen = seen | (i == j)  # a query always reads its own block (as the rule's local window does)
        else:
            step = 0 if self.homo_head else max(1, self.vert_stride // heads)
            distance = i - j if causal else (i - j).abs()
            seen = (distance < self.local_blocks) | ((j + h * step + self.head_offset) % self.vert_stride == 0)
            seen = seen | (h < self.dense_heads)
        return seen & (j <= i) if causal else seen


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
                 budget_bytes: int = 256 * 2**20) -> Tensor:
    """S2 attention over whole sequences (positions 0..T−1, no padding), visiting only kept blocks.

    Dense heads run one fused causal (or full) attention; the sparse heads gather, per query block, the
    key blocks they read (padded to the most any query block reads) and attend over those alone, in groups
    of query blocks whose gathered keys fit ``budget_bytes``. Same result as the reference.
    """
    heads = q.shape[1]
    k, v = repeat_kv_heads(k, heads), repeat_kv_heads(v, heads)
    dense = min(layout.dense_heads, heads) if layout.custom is None else 0
    out = []
    if dense:
        out.append(F.scaled_dot_product_attention(q[:, :dense], k[:, :dense], v[:, :dense], is_causal=causal))
    if dense < heads:
        out.append(_sparse_heads(q[:, dense:], k[:, dense:], v[:, dense:], layout, causal, first=dense, total=heads,
                                 budget_bytes=budget_bytes))
    return torch.cat(out, dim=1) if len(out) > 1 else out[0]


def _sparse_heads(q: Tensor, k: Tensor, v: Tensor, layout: S2Layout, causal: bool, *, first: int, total: int,
                  budget_bytes: int) -> Tensor:
    b, heads, t, d = q.shape
    size = layout.block
    n = math.ceil(t / size)
    pad = n * size - t
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    blocks = torch.arange(n, device=q.device)
    kept = layout.blocks(total, blocks[:, None], blocks[None, :], causal)[first:first + heads]  # (h, N, N)
    counts = kept.sum(-1)  # (h, N) key blocks each query block reads
    width = int(counts.max())
    # (h, N, M): the key blocks each query block reads, first the kept ones (ascending), then padding slots
    order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.gather(kept, -1, order)
    q_blocks = q.view(b, heads, n, size, d)
    k_blocks, v_blocks = k.view(b, heads, n, size, d), v.view(b, heads, n, size, d)
    offsets = torch.arange(size, device=q.device)
    key_pos = order[..., None] * size + offsets  # (h, N, M, b) positions of the gathered keys
    group = max(1, budget_bytes // max(1, b * heads * width * size * d * q.element_size() * 2))
    head_index = torch.arange(heads, device=q.device)[:, None, None]
    outputs = []
    for start in range(0, n, group):
        rows = slice(start, min(n, start + group))
        # Pad each group only to its own widest row: the cost follows the blocks visited (causal rows near
        # the start read few blocks) rather than the widest row of the sequence.
        reach = int(counts[:, rows].max())
        index = order[:, rows, :reach]  # (h, G, M_g)
        keys = k_blocks[:, head_index, index].flatten(3, 4)  # (B, h, G, M_g·b, D)
        values = v_blocks[:, head_index, index].flatten(3, 4)
        seen = valid[:, rows, :reach, None] & (key_pos[:, rows, :reach] < t)  # (h, G, M_g, b): kept, not tail padding
        seen = seen.flatten(2)[:, :, None, :]  # (h, G, 1, M_g·b)
        if causal:
            query_pos = (blocks[rows, None] * size + offsets)[None, :, :, None]  # (1, G, b, 1)
            seen = seen & (key_pos[:, rows, :reach].flatten(2)[:, :, None, :] <= query_pos)
        seen = seen | ~seen.any(-1, keepdim=True)  # tail-padding queries: any row, discarded below
        g = index.shape[1]
        # The fused CPU kernel takes 4-D calls (heads × query blocks as one head dimension) with a 4-D additive
        # mask; a boolean or 3-D mask sends SDPA down its math path, ~4× slower (measured)
        bias = torch.zeros(seen.expand(heads, g, size, -1).shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~seen, float("-inf")).flatten(0, 1)[None]
        out = F.scaled_dot_product_attention(q_blocks[:, :, rows].flatten(1, 2), keys.flatten(1, 2),
                                             values.flatten(1, 2), attn_mask=bias)
        outputs.append(out.unflatten(1, (heads, g)))
    return torch.cat(outputs, dim=2).flatten(2, 3)[:, :, :t]
