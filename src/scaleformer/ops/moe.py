"""Mixture-of-experts routing and dispatch by sorting and indexing, with the one-hot reference beside it.

Shapes: N tokens, C model width, E experts, K experts per token (1 or 2), S capacity (tokens per expert).

Routing (:func:`route`): each token picks its top-K experts. Assignments claim capacity in the GShard
order — every token's first choice, in token order, then every second choice — so which tokens are
dropped is deterministic: an expert keeps its first S assignments in that order, and tokens over
capacity get nothing from that expert (the residual connection carries them). The order is computed by a
stable sort of the assignments by expert, not by one-hot cumulative sums.

Dispatch (:func:`dispatch`, :func:`combine`): kept assignments are written into an (E, S, C) buffer at
(expert, slot) and read back by index — memory linear in N. The reference
(:func:`dispatch_one_hot_reference`) is the classic formulation with an (N, E, S) one-hot dispatch mask
and einsums — memory N·E·S, quadratic in N since S ∝ N/E.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Routing", "route", "capacity_for", "dispatch", "combine", "dispatch_one_hot_reference", "all_to_all"]


@dataclass
class Routing:
    """The kept assignments of one routing decision, sorted by expert (then by claim order)."""

    token: Tensor  # (A,) long: token index of each kept assignment
    expert: Tensor  # (A,) long
    slot: Tensor  # (A,) long: position in the expert's capacity buffer
    gate: Tensor  # (A,) float: combine weight (differentiable: the router learns through it)
    capacity: int  # S
    counts: Tensor  # (E,) long: kept assignments per expert
    requested: Tensor  # (E,) long: assignments per expert before capacity


def capacity_for(tokens: int, experts: int, top_k: int, factor: float | None) -> int | None:
    """ceil(factor · top_k · tokens / experts), at least 1; None when factor is None (no limit)."""
    if factor is None:
        return None
    return max(1, math.ceil(factor * top_k * tokens / experts))


def route(probs: Tensor, *, top_k: int, capacity: int | None, second_expert_policy: str = "all",
          normalize_gates: bool = True, generator: torch.Generator | None = None) -> Routing:
    """Top-K routing of probs (N, E) under a capacity of S tokens per expert (None: unlimited)."""
    n, e = probs.shape
    gates, experts = probs.topk(top_k, dim=-1)  # (N, K)
    valid = torch.ones_like(experts, dtype=torch.bool)
    if top_k == 2:
        if normalize_gates:
            gates = gates / gates.sum(-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).tiny)
        if second_expert_policy == "random":  # GShard: keep the second expert with probability min(1, 2·g₂)
            draw = torch.rand(n, device=probs.device, generator=generator)
            valid[:, 1] = 2 * gates[:, 1].detach() > draw
    # Claim order: all first choices in token order, then all second choices.
    flat_expert = experts.t().reshape(-1)
    flat_token = torch.arange(n, device=probs.device).repeat(top_k)
    flat_gate = gates.t().reshape(-1)
    flat_valid = valid.t().reshape(-1)
    key = torch.where(flat_valid, flat_expert, e)  # invalid assignments sort last
    order = torch.argsort(key, stable=True)
    sorted_expert = key[order]
    requested = torch.bincount(sorted_expert, minlength=e + 1)[:e]
    starts = torch.cumsum(requested, 0) - requested
    slot = torch.arange(order.numel(), device=probs.device) - starts[sorted_expert.clamp(max=e - 1)]
    kept = sorted_expert < e
    if capacity is None:
        capacity = int(requested.max()) if requested.numel() else 1
        capacity = max(capacity, 1)
    kept = kept & (slot < capacity)
    order, slot = order[kept], slot[kept]
    expert = flat_expert[order]
    return Routing(token=flat_token[order], expert=expert, slot=slot, gate=flat_gate[order], capacity=capacity,
                   counts=torch.bincount(expert, minlength=e), requested=requested)


def dispatch(x: Tensor, routing: Routing, experts: int, capacity: int | None = None) -> Tensor:
    """x (N, C) -> buffer (E, S, C): row (expert, slot) holds its token; unused rows are zero.
    ``capacity`` may enlarge S beyond the routing's (expert parallelism pads every rank to the same S)."""
    buffer = x.new_zeros(experts, capacity or routing.capacity, x.shape[-1])
    return buffer.index_put((routing.expert, routing.slot), x[routing.token])


def combine(expert_out: Tensor, routing: Routing, tokens: int) -> Tensor:
    """(E, S, C) -> (N, C): Σ over a token's kept experts of gate · expert output (0 if all dropped)."""
    rows = expert_out[routing.expert, routing.slot] * routing.gate[:, None].to(expert_out.dtype)
    return expert_out.new_zeros(tokens, expert_out.shape[-1]).index_add(0, routing.token, rows)


def dispatch_one_hot_reference(x: Tensor, routing: Routing, experts: int) -> tuple[Tensor, Tensor]:
    """The classic formulation: (dispatch mask (N, E, S), combine weights (N, E, S)) and
    buffer = einsum('nes,nc->esc'); output = einsum('nes,esc->nc', combine, expert_out)."""
    n = x.shape[0]
    mask = x.new_zeros(n, experts, routing.capacity)
    mask[routing.token, routing.expert, routing.slot] = 1.0
    weights = torch.zeros_like(mask).index_put((routing.token, routing.expert, routing.slot),
                                               routing.gate.to(x.dtype))
    return mask, weights


class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its gradient is the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def all_to_all(x: Tensor, group=None) -> Tensor:
    """Differentiable equal-split all-to-all: chunk j of dim 0 goes to rank j; rank j's chunks come back
    in rank order."""
    return _AllToAll.apply(x, group)
