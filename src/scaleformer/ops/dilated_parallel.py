"""Sequence parallelism for dilated attention (LongNet's distributed algorithm) over torch.distributed.

The sequence (length T) is split evenly across the W ranks of a process group; rank i holds positions
[i·n, (i+1)·n), n = T / W, of q, k, v (B, H, n, D). For each pattern (w, r), with w capped at T:

* w ≤ n: segments lie inside one shard; the pattern is computed locally, with no communication.
* w > n: a segment spans g = w / n consecutive ranks (the last segment fewer, when g does not divide W:
  it is the sequence's partial tail segment, as in the single-process op). Each rank sparsifies its own keys and values
  first (only the rows the pattern keeps, n/r per head), then all-gathers them within its segment's g
  ranks, its own included — a causal rank needs the keys of earlier ranks AND its own. Its queries attend
  to the gathered keys; backward reduce-scatters the key/value gradients back to their owners. The
  gathered tensor holds w/r rows per head whatever T and W are, so the memory and traffic of one pattern
  per rank are bounded by w/r rows, not by the sequence length.

Patterns are merged by their log-sum-exps as in the single-process op, and backward uses the merged
output and log-sum-exp (exact gradients through the mixing weights). The result equals
``dilated_attention`` on the whole sequence, sliced to the rank's shard.

Requirements: T divisible by W; each capped w either divides n or is a multiple of n (checked on every
rank before any communication, so a bad layout fails everywhere instead of hanging). No padding mask
(sequence-parallel training uses packed sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from scaleformer.ops.dilated import (
    aligned_bias,
    check_patterns,
    covered_rows,
    dilation_offsets,
    gather_rows,
    kernel_backward,
    kernel_forward,
    kernel_name,
    last_valid,
    merge_by_lse,
    scatter_rows,
    selection,
)

__all__ = ["sequence_parallel_dilated_attention", "CommStats"]

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_GROUPS: dict[tuple[int, int], list[dist.ProcessGroup]] = {}


@dataclass
class CommStats:
    """Bytes this rank exchanged, accumulated over calls: sent (its own sparse rows, to each peer: forward
    all-gather, backward re-gather — recomputed rather than kept, to save memory — and backward
    reduce-scatter) and the size of the gathered buffers (its own rows included)."""

    sent_bytes: int = 0
    gathered_bytes: int = 0
    per_pattern: list[dict[str, int]] = field(default_factory=list)


def _segment_groups(group: dist.ProcessGroup | None, span: int) -> list[dist.ProcessGroup | None]:
    """Sub-groups of ``span`` consecutive ranks of ``group`` (the last one shorter when span does not
    divide the world size); created once, by every rank, in the same order (new_group is a collective)."""
    world = dist.get_world_size(group)
    if span == world:
        return [group]
    key = (id(group), span)
    if key not in _GROUPS:
        ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(world)]
        _GROUPS[key] = [dist.new_group(ranks[start:start + span]) for start in range(0, world, span)]
    return _GROUPS[key]


class _Global:
    """One pattern whose segment holds ``span`` ranks (this rank is its ``member``-th): selections,
    positions and mask for this rank."""

    def __init__(self, w: int, r: int, n: int, heads: int, member: int, span: int, causal: bool,
                 group: dist.ProcessGroup | None, dtype: torch.dtype, device: torch.device, kernel: str,
                 scheme: str = "modulo") -> None:
        self.span, self.group, self.kernel = span, group, kernel
        self.length = length = -(-n // r)
        offsets = dilation_offsets(heads, r, scheme, device)[:, None]  # (H, 1)
        m = torch.arange(length, device=device)[None, :]

        def rows(member: int) -> tuple[Tensor, Tensor, Tensor]:  # local rows kept on the member-th rank
            local = (offsets - member * n) % r + m * r  # (H, L)
            kept = last_valid(local, local < n)  # rows past the shard: copies of the last kept row
            return kept, local < n, member * n + kept

        self.index, self.valid, query_pos = rows(member)
        # Causal: the keys of later ranks in the segment are all in this rank's future. They are gathered
        # (those ranks need this rank's keys) but not attended to: half the work on average, and no
        # q·k between far-apart positions (under xPos such products can overflow before any mask applies).
        self.key_members = member + 1 if causal else span
        keys = [rows(member) for member in range(self.key_members)]
        key_valid = torch.cat([k[1] for k in keys], dim=1)  # (H, span·L)
        key_pos = torch.cat([k[2] for k in keys], dim=1)
        allowed = key_valid[:, None, :].expand(-1, length, -1)
        if causal:
            allowed = allowed & (key_pos[:, None, :] <= query_pos[:, :, None])
        masked = max(-1e9, torch.finfo(dtype).min / 2)
        self.bias = aligned_bias(allowed.shape, dtype, device).masked_fill_(~allowed, masked)[None]

    def select(self, x: Tensor) -> Tensor:  # (B, H, n, D) -> (B, H, L, D)
        return x.gather(2, self.index[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]))

    def gather_keys_values(self, k: Tensor, v: Tensor, stats: CommStats | None) -> tuple[Tensor, Tensor]:
        mine = torch.stack([self.select(k), self.select(v)]).contiguous()  # (2, B, H, L, D)
        everyone = mine.new_empty((self.span * mine.shape[0], *mine.shape[1:]))  # concatenated along dim 0
        _all_gather(everyone, mine, group=self.group)
        everyone = everyone.unflatten(0, (self.span, mine.shape[0]))
        if stats is not None:
            stats.sent_bytes += mine.numel() * mine.element_size() * (self.span - 1)
            stats.gathered_bytes += everyone.numel() * everyone.element_size()
        # (span, 2, B, H, L, D) -> (2, B, H, members·L, D), rank-major: positions increase along the rows.
        both = everyone[:self.key_members].permute(1, 2, 3, 0, 4, 5).flatten(3, 4)
        return both[0], both[1]

    def reduce_scatter(self, grad_k: Tensor, grad_v: Tensor, stats: CommStats | None) -> tuple[Tensor, Tensor]:
        both = torch.stack([grad_k, grad_v])  # (2, B, H, members·L, D); later ranks' keys got no gradient
        both = torch.nn.functional.pad(both, (0, 0, 0, (self.span - self.key_members) * self.length))
        both = both.unflatten(3, (self.span, -1)).permute(3, 0, 1, 2, 4, 5).contiguous()  # (span, 2, B, H, L, D)
        mine = both.new_empty(both.shape[1:])
        _reduce_scatter(mine, both.flatten(0, 1), group=self.group)
        if stats is not None:
            stats.sent_bytes += mine.numel() * mine.element_size() * (self.span - 1)
        return mine[0], mine[1]

    def scatter(self, rows: Tensor, n: int) -> Tensor:  # (B, H, L, D) -> (B, H, n, D), zeros elsewhere
        rows = torch.where(self.valid[None, :, :, None], rows, 0)
        out = rows.new_zeros(rows.shape[0], rows.shape[1], n, rows.shape[-1])
        return out.scatter_add(2, self.index[None, :, :, None].expand_as(rows), rows)


class _Plan:
    def __init__(self, q: Tensor, patterns: list[tuple[int, int]], causal: bool, group: dist.ProcessGroup | None,
                 stats: CommStats | None, scheme: str = "modulo") -> None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, h, n, _ = q.shape
        total = n * world
        self.stats, self.causal, self.steps = stats, causal, []
        masked = max(-1e9, torch.finfo(q.dtype).min / 2)
        for w, _ in patterns:  # every layout error before the first collective: no rank may wait for another
            w = min(w, total)
            if w <= n and n % w:
                raise ValueError(f"segment length {w} must divide the per-rank length {n} (T={total}, {world} ranks)")
            if w > n and w % n:
                raise ValueError(f"segment length {w} must be a multiple of the per-rank length {n} "
                                 f"(T={total}, {world} ranks)")
        for w, r in patterns:
            w = min(w, total)
            if w <= n:
                index, valid, _, length = selection(n, w, r, h, q.device, scheme)
                bias = None  # causal: rows past a block's end are hidden by causality (see ops.dilated._Plan)
                if not causal and not bool(valid.all()):
                    bias = aligned_bias(valid.shape, q.dtype, q.device).masked_fill_(~valid, masked)
                    bias = bias.reshape(1, -1, 1, length)
                self.steps.append(("local", (index, valid, bias, kernel_name(q, "auto", bias is not None))))
            else:
                span = w // n
                segment, member = divmod(rank, span)
                members = min(span, world - segment * span)  # the tail segment may hold fewer ranks
                sub = _segment_groups(group, span)[segment]
                self.steps.append(("global", _Global(w, r, n, h, member, members, causal, sub, q.dtype, q.device,
                                                     kernel_name(q, "auto", has_bias=True), scheme)))


class _SequenceParallelDilated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, scale: float):
        n = q.shape[2]
        out = lse = None
        for kind, step in plan.steps:
            if kind == "local":
                index, valid, bias, kernel = step
                o_i, lse_i = kernel_forward(gather_rows(q, index), gather_rows(k, index), gather_rows(v, index), plan.causal,
                                             bias, scale, kernel)
                o_i, lse_i = scatter_rows(o_i, index, valid, n), scatter_rows(lse_i[..., None], index, valid, n)[..., 0]
                covered = covered_rows(index, valid, n)
            else:
                keys, values = step.gather_keys_values(k, v, plan.stats)
                o_i, lse_i = kernel_forward(step.select(q), keys, values, False, step.bias, scale, step.kernel)
                o_i, lse_i = step.scatter(o_i, n), step.scatter(lse_i[..., None], n)[..., 0]
                covered = covered_rows(step.index[:, None, :], step.valid[:, None, :], n)
            out, lse = merge_by_lse(out, lse, o_i, torch.where(covered, lse_i, float("-inf")))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        plan, n = ctx.plan, q.shape[2]
        grad = grad.contiguous()
        merged_lse = torch.where(torch.isfinite(lse), lse, 1e30)[..., None]
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for kind, step in plan.steps:
            if kind == "local":
                index, valid, bias, kernel = step
                keep = valid.reshape(1, -1, valid.shape[-1], 1)
                lse_i = torch.where(keep[..., 0], gather_rows(merged_lse, index)[..., 0], 1e30)
                dq, dk, dv = kernel_backward(gather_rows(grad, index) * keep.to(grad.dtype), gather_rows(q, index),
                                              gather_rows(k, index), gather_rows(v, index), gather_rows(out, index), lse_i,
                                              plan.causal, bias, ctx.scale, kernel)
                grad_q += scatter_rows(dq, index, valid, n)
                grad_k += scatter_rows(dk, index, valid, n)
                grad_v += scatter_rows(dv, index, valid, n)
            else:
                keys, values = step.gather_keys_values(k, v, plan.stats)
                keep = step.valid[None, :, :, None]
                lse_i = torch.where(keep[..., 0], step.select(merged_lse)[..., 0], 1e30)
                dq, dk_all, dv_all = kernel_backward(step.select(grad) * keep.to(grad.dtype), step.select(q), keys,
                                                      values, step.select(out), lse_i, False, step.bias, ctx.scale,
                                                      step.kernel)
                dk, dv = step.reduce_scatter(dk_all, dv_all, plan.stats)
                grad_q += step.scatter(dq, n)
                grad_k += step.scatter(dk, n)
                grad_v += step.scatter(dv, n)
        return grad_q, grad_k, grad_v, None, None


def sequence_parallel_dilated_attention(q: Tensor, k: Tensor, v: Tensor, *, segment_lengths: Sequence[int],
                                        dilation_rates: Sequence[int], causal: bool,
                                        group: dist.ProcessGroup | None = None, scale: float | None = None,
                                        stats: CommStats | None = None, head_offsets: str = "modulo") -> Tensor:
    """Dilated attention on this rank's shard (B, H, n, D) of a sequence split over ``group``'s ranks
    (``head_offsets`` as in :func:`scaleformer.ops.dilated.dilated_attention`)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_dilated_attention needs torch.distributed initialised "
                           "(e.g. under torchrun); on one process use dilated_attention")
    patterns = check_patterns(segment_lengths, dilation_rates)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dilation_offsets(q.shape[1], 1, head_offsets)  # a bad scheme: one line, before any collective
    plan = _Plan(q, patterns, causal, group, stats, head_offsets)
    return _SequenceParallelDilated.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)
