"""Block-sparse flash attention as Triton kernels: one kernel for dilated attention (LongNet) and S2-Attention.

Status (issue 19): verified on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``) against the
dense references; not yet run or timed on a GPU.

A pass attends within a *view* of the sequence. For head h, view row i is position

    pos(i) = (i // L)·W + (h mod R) + R·(i mod L),     L = ceil(W / R) rows per segment,

real when (h mod R) + R·(i mod L) < W and pos(i) < the row's length. A query row attends to the real key
rows of its own segment (i // L), and with ``causal`` only to rows j ≤ i (positions increase with i in a
segment). One pass of this shape is:
- one dilated pattern (w, r): W = w, R = r. The kernel addresses the kept rows itself (strided loads, no
  gathers), so a pattern costs (T/r)·(w/r) scores, not T·w;
- dense or S2 attention: W = T, R = 1 (one segment), with a list of the key tiles each query tile reads;
  for S2 the layout's block mask gives the list, and where a layout block is smaller than a tile the
  kernel also reads the block mask per element.

Which key tiles a query tile visits is a list (per head, or shared by all heads), and the transposed list
drives the key-side backward. Dilated attention runs one pass per pattern, a rate-1 pattern first; each
pass merges its output and log-sum-exp into the running ones at its own rows in its epilogue, so the
patterns' softmax-denominator weighting (LongNet's merge) is exact and nothing T × T or per-pattern is
stored. Forward: P launches; backward: 2P (keys and values per key tile; queries per query tile), each
recomputing probabilities from the merged log-sum-exp, which is exactly the gradient of the merged output.

Numerics: scores, softmax statistics and accumulators are float32; log-sum-exps are kept in base 2.
Half-precision inputs go into the dot products as they are on a GPU; float32 inputs (and every input under
the interpreter, which cannot multiply bfloat16 matrices) are multiplied at IEEE float32 precision.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["Pass", "block_layout_pass", "block_sparse_attention", "dense_pass", "dilated_passes", "tile_lists",
           "tile_size"]

_LOG2E = math.log2(math.e)


@triton.jit
def _view_rows(tile, h, W, R, L, G, n, BLOCK: tl.constexpr):
    """View rows of one tile: (row index, segment, position, real). Head h keeps offset (h // G) mod R: G = 1
    gives h mod R, G = ⌈H/R⌉ TorchScale's grouped rule."""
    i = tile * BLOCK + tl.arange(0, BLOCK)
    within = (h // G) % R + R * (i % L)
    position = (i // L) * W + within
    return i, i // L, position, (within < W) & (position < n)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _allowed(i, seg_i, pos_i, real_i, j, seg_j, pos_j, real_j, mask_ptr, NB, GRAIN,
             CAUSAL: tl.constexpr, FINE: tl.constexpr):
    """(BM, BN) bool: query row i may read key row j (same segment, both real, causal, the fine mask)."""
    allowed = real_i[:, None] & real_j[None, :] & (seg_i[:, None] == seg_j[None, :])
    if CAUSAL:
        allowed = allowed & (j[None, :] <= i[:, None])
    if FINE:
        fine = tl.load(mask_ptr + (pos_i[:, None] // GRAIN) * NB + pos_j[None, :] // GRAIN, mask=allowed, other=0)
        allowed = allowed & (fine != 0)
    return allowed


@triton.jit
def _forward(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, len_ptr, idx_ptr, cnt_ptr, mask_ptr,
             H, T, D, W, R, L, G, MAXK, list_heads, NB, GRAIN, scale,
             CAUSAL: tl.constexpr, MERGE: tl.constexpr, FINE: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    qt, bh = tl.program_id(0), tl.program_id(1)
    h, b = bh % H, bh // H
    n = tl.load(len_ptr + b)
    i, seg_i, pos_i, real_i = _view_rows(qt, h, W, R, L, G, n, BM)
    cols = tl.arange(0, BD)
    in_d = cols[None, :] < D
    base = bh.to(tl.int64) * T * D
    q = tl.load(q_ptr + base + pos_i[:, None] * D + cols[None, :], mask=real_i[:, None] & in_d, other=0.0)
    lists = (h % list_heads) * tl.num_programs(0) + qt
    mask_ptr = mask_ptr + (h % list_heads) * NB * NB
    m = tl.full((BM,), float("-inf"), tl.float32)
    total = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)
    for c in range(0, tl.load(cnt_ptr + lists)):
        kt = tl.load(idx_ptr + lists * MAXK + c)
        j, seg_j, pos_j, real_j = _view_rows(kt, h, W, R, L, G, n, BN)
        k, v = _key_side(k_ptr, v_ptr, bh, T, D, pos_j, real_j, cols, in_d)
        allowed = _allowed(i, seg_i, pos_i, real_i, j, seg_j, pos_j, real_j, mask_ptr, NB, GRAIN, CAUSAL, FINE)
        s = tl.where(allowed, _dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m - shift)
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    seen = total > 0
    lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
    out = acc / tl.where(seen, total, 1.0)[:, None]
    rows = bh.to(tl.int64) * T + pos_i
    if MERGE:  # the running result of the earlier passes at these rows: merge by log-sum-exp
        old_lse = tl.load(lse_ptr + rows, mask=real_i, other=float("-inf"))
        old = tl.load(o_ptr + base + pos_i[:, None] * D + cols[None, :], mask=real_i[:, None] & in_d, other=0.0)
        top = tl.maximum(old_lse, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_old, w_new = tl.exp2(old_lse - top), tl.exp2(lse - top)
        weight = w_old + w_new
        some = weight > 0
        out = (old * w_old[:, None] + out * w_new[:, None]) / tl.where(some, weight, 1.0)[:, None]
        lse = tl.where(some, top + tl.log2(tl.where(some, weight, 1.0)), float("-inf"))
    tl.store(o_ptr + base + pos_i[:, None] * D + cols[None, :], out, mask=real_i[:, None] & in_d)
    tl.store(lse_ptr + rows, lse, mask=real_i)


@triton.jit
def _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, T, D, pos_i, real_i, cols, in_d):
    """A query tile's q and output gradient, merged log-sum-exp and rowsum(dO ∘ O), as the backward needs."""
    at = bh.to(tl.int64) * T * D + pos_i[:, None] * D + cols[None, :]
    q = tl.load(q_ptr + at, mask=real_i[:, None] & in_d, other=0.0)
    do = tl.load(do_ptr + at, mask=real_i[:, None] & in_d, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + pos_i, mask=real_i, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + pos_i, mask=real_i, other=0.0)
    return q, do, lse, delta


@triton.jit
def _key_side(k_ptr, v_ptr, bh, T, D, pos_j, real_j, cols, in_d):
    """A key tile's k and v."""
    at = bh.to(tl.int64) * T * D + pos_j[:, None] * D + cols[None, :]
    return (tl.load(k_ptr + at, mask=real_j[:, None] & in_d, other=0.0),
            tl.load(v_ptr + at, mask=real_j[:, None] & in_d, other=0.0))


@triton.jit
def _probabilities(q, k, lse, allowed, scale, IEEE: tl.constexpr):
    """exp(score − merged log-sum-exp), zero where not allowed (base 2 throughout)."""
    return tl.where(allowed, tl.exp2(_dot(q, tl.trans(k), IEEE) * scale - lse[:, None]), 0.0)


@triton.jit
def _backward_keys(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, len_ptr, idx_ptr, cnt_ptr,
                   mask_ptr, H, T, D, W, R, L, G, MAXK, list_heads, NB, GRAIN, scale, sm_scale,
                   CAUSAL: tl.constexpr, FINE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    """dk, dv of one key tile, over the query tiles that read it; added into the running gradients."""
    kt, bh = tl.program_id(0), tl.program_id(1)
    h, b = bh % H, bh // H
    n = tl.load(len_ptr + b)
    j, seg_j, pos_j, real_j = _view_rows(kt, h, W, R, L, G, n, BN)
    cols = tl.arange(0, BD)
    in_d = cols[None, :] < D
    base = bh.to(tl.int64) * T * D
    key_mask = real_j[:, None] & in_d
    k, v = _key_side(k_ptr, v_ptr, bh, T, D, pos_j, real_j, cols, in_d)
    lists = (h % list_heads) * tl.num_programs(0) + kt
    mask_ptr = mask_ptr + (h % list_heads) * NB * NB
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    for c in range(0, tl.load(cnt_ptr + lists)):
        qt = tl.load(idx_ptr + lists * MAXK + c)
        i, seg_i, pos_i, real_i = _view_rows(qt, h, W, R, L, G, n, BM)
        q, do, lse, delta = _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, T, D, pos_i, real_i, cols, in_d)
        allowed = _allowed(i, seg_i, pos_i, real_i, j, seg_j, pos_j, real_j, mask_ptr, NB, GRAIN, CAUSAL, FINE)
        p = _probabilities(q, k, lse, allowed, scale, IEEE)
        dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    offsets = base + pos_j[:, None] * D + cols[None, :]
    tl.store(dk_ptr + offsets, tl.load(dk_ptr + offsets, mask=key_mask, other=0.0) + dk * sm_scale, mask=key_mask)
    tl.store(dv_ptr + offsets, tl.load(dv_ptr + offsets, mask=key_mask, other=0.0) + dv, mask=key_mask)


@triton.jit
def _backward_queries(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, len_ptr, idx_ptr, cnt_ptr,
                      mask_ptr, H, T, D, W, R, L, G, MAXK, list_heads, NB, GRAIN, scale, sm_scale,
                      CAUSAL: tl.constexpr, FINE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    """dq of one query tile, over the key tiles it reads; added into the running gradient."""
    qt, bh = tl.program_id(0), tl.program_id(1)
    h, b = bh % H, bh // H
    n = tl.load(len_ptr + b)
    i, seg_i, pos_i, real_i = _view_rows(qt, h, W, R, L, G, n, BM)
    cols = tl.arange(0, BD)
    in_d = cols[None, :] < D
    base = bh.to(tl.int64) * T * D
    query_mask = real_i[:, None] & in_d
    q, do, lse, delta = _query_side(q_ptr, do_ptr, lse_ptr, delta_ptr, bh, T, D, pos_i, real_i, cols, in_d)
    lists = (h % list_heads) * tl.num_programs(0) + qt
    mask_ptr = mask_ptr + (h % list_heads) * NB * NB
    dq = tl.zeros((BM, BD), tl.float32)
    for c in range(0, tl.load(cnt_ptr + lists)):
        kt = tl.load(idx_ptr + lists * MAXK + c)
        j, seg_j, pos_j, real_j = _view_rows(kt, h, W, R, L, G, n, BN)
        k, v = _key_side(k_ptr, v_ptr, bh, T, D, pos_j, real_j, cols, in_d)
        allowed = _allowed(i, seg_i, pos_i, real_i, j, seg_j, pos_j, real_j, mask_ptr, NB, GRAIN, CAUSAL, FINE)
        p = _probabilities(q, k, lse, allowed, scale, IEEE)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    offsets = base + pos_i[:, None] * D + cols[None, :]
    tl.store(dq_ptr + offsets, tl.load(dq_ptr + offsets, mask=query_mask, other=0.0) + dq * sm_scale,
             mask=query_mask)


# ----------------------------------------------------------------------------------------------------------
# Passes: which view and which tiles
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Pass:
    """One launch's view (segment W, rate R, L rows per segment, ``rows`` view rows in all) and its tile
    lists: ``queries`` = (index (h, NQ, K) int32, count (h, NQ) int32) of the key tiles each query tile
    reads, ``keys`` the transposed lists; h is 1 (shared by every head) or the number of heads. ``fine``
    (h, NB, NB) int8 is read per element where tiles are coarser than the layout's blocks of ``grain``.
    Head h keeps offset (h // ``group``) mod rate."""

    segment: int
    rate: int
    per_segment: int
    rows: int
    queries: tuple[Tensor, Tensor]
    keys: tuple[Tensor, Tensor]
    fine: Tensor | None = None
    grain: int = 1
    group: int = 1  # head h keeps offset (h // group) mod rate: 1 for h mod rate, ⌈H/rate⌉ for the grouped rule


def tile_size(device: torch.device) -> int:
    """Rows per tile: 64 on a GPU; 16 on the CPU, where the interpreter runs one program at a time."""
    return 64 if device.type == "cuda" else 16


def tile_lists(reads: Tensor) -> tuple[Tensor, Tensor]:
    """(index (h, N, K) int32, count (h, N) int32) from a tile mask (h, N, M) bool: row n's True columns
    first, ascending; K = the most any row reads (at least 1, so the index is never empty)."""
    count = reads.sum(-1)
    width = max(1, int(count.max())) if count.numel() else 1
    order = torch.sort((~reads).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return order.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def _segment_tiles(rows: int, per_segment: int, tile: int, causal: bool, device: torch.device) -> Tensor:
    """(1, N, N) bool tile mask of one view: tiles that share a segment (and, causal, not wholly after)."""
    n = -(-rows // tile)
    first = torch.arange(n, device=device) * tile
    last = torch.clamp(first + tile - 1, max=rows - 1)
    seg_first, seg_last = first // per_segment, last // per_segment
    reads = (seg_first[None, :] <= seg_last[:, None]) & (seg_first[:, None] <= seg_last[None, :])
    if causal:
        reads = reads & (first[None, :] <= last[:, None])
    return reads[None]


def _make_pass(t: int, segment: int, rate: int, tile: int, causal: bool, device: torch.device,
               reads: Tensor | None = None, fine: Tensor | None = None, grain: int = 1, group: int = 1) -> Pass:
    segment = min(segment, t)  # a segment longer than the sequence is the whole sequence
    per_segment = -(-segment // rate)
    rows = -(-t // segment) * per_segment
    if reads is None:
        reads = _segment_tiles(rows, per_segment, tile, causal, device)
    return Pass(segment, rate, per_segment, rows, tile_lists(reads), tile_lists(reads.transpose(1, 2)), fine, grain,
                group)


@functools.lru_cache(maxsize=64)
def dilated_passes(t: int, patterns: tuple[tuple[int, int], ...], causal: bool, tile: int, device: torch.device,
                   heads: int = 1, head_offsets: str = "modulo") -> tuple[Pass, ...]:
    """One pass per dilated pattern (w, r), a rate-1 pattern first (it reaches every real row, so the later
    passes always merge into a finished row); ``head_offsets`` as in :func:`scaleformer.ops.dilated.dilated_attention`
    ("grouped" needs ``heads``). Depends only on shapes: built once per length."""
    ordered = sorted(patterns, key=lambda p: p[1] != 1)
    return tuple(_make_pass(t, w, r, tile, causal, device, group=-(-heads // r) if head_offsets == "grouped" else 1)
                 for w, r in ordered)


@functools.lru_cache(maxsize=8)
def dense_pass(t: int, causal: bool, tile: int, device: torch.device) -> Pass:
    """Plain attention over the whole sequence as a single pass (the baseline, and S2's dense heads)."""
    return _make_pass(t, t, 1, tile, causal, device)


def block_layout_pass(t: int, blocks: Tensor, grain: int, causal: bool, tile: int) -> Pass:
    """A pass over a block layout: ``blocks`` (h, NB, NB) bool, query block × key block of ``grain`` positions.
    A tile pair is visited when any block pair it overlaps is kept; where blocks are finer than tiles
    (grain not a multiple of the tile) the kernel also reads ``blocks`` per element."""
    n = -(-t // tile)
    nb = blocks.shape[-1]
    first = torch.arange(n, device=blocks.device) * tile
    lo, hi = first // grain, torch.clamp(first + tile - 1, max=t - 1) // grain
    # Any kept block in a rectangle of blocks, by 2-D prefix sums.
    sums = torch.nn.functional.pad(blocks.int().cumsum(1).cumsum(2), (1, 0, 1, 0))
    rect = (sums[:, hi + 1][:, :, hi + 1] - sums[:, lo][:, :, hi + 1] - sums[:, hi + 1][:, :, lo] + sums[:, lo][:, :, lo])
    reads = rect > 0
    if causal:
        reads = reads & torch.ones(n, n, dtype=torch.bool, device=blocks.device).tril()
    fine = None if grain % tile == 0 else blocks.to(torch.int8).contiguous()
    assert fine is None or fine.shape[-1] == nb
    return _make_pass(t, t, 1, tile, causal, blocks.device, reads=reads, fine=fine, grain=grain)


# ----------------------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_args(p: Pass, lists: tuple[Tensor, Tensor], h: int, t: int, d: int, lengths: Tensor):
    index, count = lists
    fine = p.fine if p.fine is not None else count  # any int tensor: never read
    nb = p.fine.shape[-1] if p.fine is not None else 1
    return (lengths, index, count, fine, h, t, d, p.segment, p.rate, p.per_segment, p.group, index.shape[-1],
            index.shape[0], nb, p.grain)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, passes: tuple[Pass, ...], causal: bool, scale: float, tile: int):
        b, h, t, d = q.shape
        bd = max(16, triton.next_power_of_2(d))
        ieee = q.dtype == torch.float32 or _interpreting()
        out = torch.zeros(b, h, t, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, t), float("-inf"), dtype=torch.float32, device=q.device)
        for number, p in enumerate(passes):
            grid = (triton.cdiv(p.rows, tile), b * h)
            _forward[grid](q, k, v, out, lse, *_launch_args(p, p.queries, h, t, d, lengths), scale * _LOG2E,
                           CAUSAL=causal, MERGE=number > 0, FINE=p.fine is not None, BM=tile, BN=tile, BD=bd,
                           IEEE=ieee)
        ctx.save_for_backward(q, k, v, out, lse, lengths)
        ctx.passes, ctx.causal, ctx.scale, ctx.tile = passes, causal, scale, tile
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, lengths = ctx.saved_tensors
        b, h, t, d = q.shape
        tile, scale = ctx.tile, ctx.scale
        bd = max(16, triton.next_power_of_2(d))
        ieee = q.dtype == torch.float32 or _interpreting()
        grad = grad.to(q.dtype).contiguous()
        delta = (grad.float() * out).sum(-1).contiguous()  # rowsum(dO ∘ O) of the merged output
        # Rows no pass reached (padding) have lse −inf; their probabilities are masked anyway.
        lse = torch.where(torch.isfinite(lse), lse, 0.0).contiguous()
        dq, dk, dv = (torch.zeros(b, h, t, d, dtype=torch.float32, device=q.device) for _ in range(3))
        for p in ctx.passes:
            flags = dict(CAUSAL=ctx.causal, FINE=p.fine is not None, BM=tile, BN=tile, BD=bd, IEEE=ieee)
            grid = (triton.cdiv(p.rows, tile), b * h)
            _backward_keys[grid](q, k, v, grad, lse, delta, dk, dv, *_launch_args(p, p.keys, h, t, d, lengths),
                                 scale * _LOG2E, scale, **flags)
            _backward_queries[grid](q, k, v, grad, lse, delta, dq, *_launch_args(p, p.queries, h, t, d, lengths),
                                    scale * _LOG2E, scale, **flags)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, passes: tuple[Pass, ...], *, causal: bool,
                           lengths: Tensor | None = None, scale: float | None = None,
                           tile: int | None = None) -> Tensor:
    """Attention of q, k, v (B, H, T, D) over the union of ``passes``, merged by log-sum-exp, each key
    weighted once per pass that links it (so dilated patterns merge as LongNet defines). ``lengths`` (B,)
    real tokens per row, which must come first (the callers move padding to the tail); rows past them
    output 0. Float32, bfloat16 or float16 inputs of one dtype; output in that dtype."""
    b, h, t, d = q.shape
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        raise ValueError(f"the Triton attention takes float32, bfloat16 or float16 q, k, v of one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"the Triton attention takes q, k, v of one shape (B, H, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("the Triton attention runs on CUDA, or on the CPU under TRITON_INTERPRET=1")
    if d > 256:
        raise ValueError(f"the Triton attention takes head dims up to 256, got {d}")
    scale = d**-0.5 if scale is None else scale
    tile = tile_size(q.device) if tile is None else tile
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.int32, device=q.device)
    return _BlockSparseAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                       lengths.to(torch.int32).contiguous(), passes, causal, float(scale), tile)

