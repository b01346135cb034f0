"""Context parallelism: one sequence split across the ranks of a process group, every mixer exact.

Rank r of W holds the contiguous positions [r·n, (r+1)·n) of each row (the same n on every rank). What
crosses ranks, per mixer kind:

* **Linear recurrences** (retention, gated retention, Lightning, momentum's sum, Mamba-2, the delta rule):
  LASP-2's all-gather, generalised. The recurrence is linear in its state, S_out = P_r S_in + M_r, where
  M_r is the rank's own final state from an empty start and P_r the chunk's transition: a scalar per
  head for decays (e^{Σ log γ}), a K × K matrix for the delta rule (the op run from the identity with
  zero values). One all-gather of every rank's (P, M); each rank folds those before it into its entering
  state S_in = Σ_{s<r} (P_{r−1} ⋯ P_{s+1}) M_s, and adds what S_in contributes to its outputs: the op run
  from S_in with zero values (the homogeneous part — exactly the outputs' dependence on the entering
  state, since the op is linear in values and state together). Bytes per rank do not grow with the
  sequence: W states and transitions, forward, and the same backward.
* **Short convolutions** (the delta rule's, Mamba-2's): each rank receives the previous rank's last
  width − 1 inputs (its halo) and sends its own onward; gradients travel back the same way.
* **Softmax attention** (dense, windowed, grouped, gated, with sinks; DIFF V1 and V2; YOCO's shared keys):
  an all-gather of keys and values (and of their positions); rank r reads the keys of ranks ≤ r (the
  later ones are never visible to a causal query), with its query slots numbered from r·n so the usual
  masks (causal, window) apply as they are.
* **Dilated attention** keeps LongNet's own algorithm (:mod:`scaleformer.ops.dilated_parallel`).

Every exchange is an autograd function, so the backward is exact too (tested in float64 against one
process, outputs and every gradient). Bytes sent are counted in :data:`COMM`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommCounter", "COMM", "gather_across", "shift_from_previous", "split_recurrence",
           "context_parallel_keys", "check_even_split"]


@dataclass
class CommCounter:
    """Bytes this rank sent over context-parallel exchanges, forward and backward, since the last reset."""

    sent: int = 0

    def reset(self) -> None:
        self.sent = 0


COMM = CommCounter()


class _Gather(torch.autograd.Function):
    """x on every rank -> (W, *x.shape), rank s's x at index s. Backward: each rank's slice of the summed
    gradients (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        x = x.contiguous()
        dist.all_gather(parts, x, group=group)
        COMM.sent += x.numel() * x.element_size() * (world - 1)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        COMM.sent += grad.numel() * grad.element_size()
        return grad[dist.get_rank(ctx.group)], None


def gather_across(x: Tensor, group: Any) -> Tensor:
    """Every rank's ``x`` stacked (W, ...), differentiably. Its backward is a collective too, so every rank's
    loss must depend on the result (see :func:`_depend`), or the ranks' backward passes would disagree."""
    return _Gather.apply(x, group)


class _Depend(torch.autograd.Function):
    """``x`` itself, made to depend on ``other``: its backward gives ``other`` a zero gradient, so the
    collectives behind ``other`` run on this rank too even when its result does not use them."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, other: Tensor) -> Tensor:
        ctx.other = (other.shape, other.dtype, other.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.other
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _depend(x: Tensor, other: Tensor) -> Tensor:
    return _Depend.apply(x, other) if other.requires_grad else x


class _ShiftRight(torch.autograd.Function):
    """Rank r receives rank r − 1's x (zeros on rank 0) and sends its own to rank r + 1; backward sends the
    gradient back the other way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return _exchange(x.contiguous(), group, forward=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _exchange(grad.contiguous(), ctx.group, forward=False), None


def _exchange(x: Tensor, group: Any, *, forward: bool) -> Tensor:
    """forward: send to r + 1, receive from r − 1; else the reverse. Edge ranks receive zeros."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    to, source = (rank + 1, rank - 1) if forward else (rank - 1, rank + 1)
    received = torch.zeros_like(x)
    requests = []
    if 0 <= source < world:
        requests.append(dist.irecv(received, dist.get_global_rank(group, source), group=group))
    if 0 <= to < world:
        requests.append(dist.isend(x, dist.get_global_rank(group, to), group=group))
        COMM.sent += x.numel() * x.element_size()
    for request in requests:
        request.wait()
    return received


def shift_from_previous(x: Tensor, group: Any) -> Tensor:
    """The previous rank's ``x`` (zeros on the first rank), differentiably: a convolution's halo."""
    return _ShiftRight.apply(x, group)


def split_recurrence(op: Callable[..., tuple[Tensor, Tensor | None]], q: Tensor, k: Tensor, v: Tensor, *,
                     group: Any, log_decay_total: Tensor | None, **options: Any) -> Tensor:
    """``op(q, k, v, **options)`` — a linear recurrence's op (B, H, T, ·), taking ``initial_state`` and
    ``output_final_state`` — over a sequence whose rank-r shard these are; returns this shard's outputs.

    ``log_decay_total`` (B, H): the chunk's transition is the scalar e^{total} per head (retention and its
    kin); None: the transition is a K × K matrix, found by running the op from the identity with zero
    values (the delta rule)."""
    rank = dist.get_rank(group)
    out, own = op(q, k, v, initial_state=None, output_final_state=True, **options)
    assert own is not None
    zeros_v = torch.zeros_like(v)
    if log_decay_total is not None:
        transition = torch.exp(log_decay_total.to(own.dtype))[..., None, None]  # (B, H, 1, 1)
    else:
        width = k.shape[-1]
        identity = torch.eye(width, dtype=own.dtype, device=own.device).expand(*own.shape[:2], width, width)
        _, transition = op(q, k, torch.zeros(*v.shape[:-1], width, dtype=v.dtype, device=v.device),
                           initial_state=identity, output_final_state=True, **options)
    # One all-gather of (M, P) together: one collective each way, in the same order on every rank.
    packed = gather_across(torch.cat([own.flatten(2), transition.flatten(2)], -1), group)
    states = packed[..., :own[0, 0].numel()].unflatten(-1, own.shape[2:])  # (W, B, H, K, V)
    transitions = packed[..., own[0, 0].numel():].unflatten(-1, transition.shape[2:])  # (W, B, H, 1|K, 1|K)
    if rank == 0:
        return _depend(out, packed)
    entering = states[0]
    for s in range(1, rank):
        entering = _apply(transitions[s], entering) + states[s]
    carried, _ = op(q, k, zeros_v, initial_state=entering, output_final_state=False, **options)
    return out + carried


def _apply(transition: Tensor, state: Tensor) -> Tensor:
    """P S: a scalar per head (…, 1, 1) scales; a (…, K, K) matrix multiplies."""
    return transition * state if transition.shape[-1] == 1 else transition @ state


def check_even_split(length: int, group: Any, device: torch.device | str = "cpu") -> None:
    """Every rank must hold the same number of positions: checked on every rank (one all-gather, on
    ``device``: NCCL takes only CUDA tensors) before any other exchange, so an uneven split is one clear
    error everywhere instead of a hang."""
    world = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([length], device=device), group=group)
    seen = [int(x) for x in lengths]
    if len(set(seen)) != 1:
        raise ValueError(f"context parallelism splits each sequence evenly: the ranks hold {seen} positions; "
                         f"give every rank a shard of the same length (the sequence length divisible by {world})")


@dataclass(frozen=True)
class GatheredKeys:
    """What attention over every rank's keys needs beyond the keys: their positions and padding, and the
    number of ranks whose keys a query of this rank may read."""

    ranks: int
    positions: Tensor  # (B, ranks·n)
    mask: Tensor | None  # (B, ranks·n) bool, None = no padding


def context_parallel_keys(k: Tensor, v: Tensor, ctx: Any) -> tuple[Tensor, Tensor, Any]:
    """Keys and values (B, H_kv, n, D) of this rank -> those of every rank it reads (a causal rank r: ranks
    0…r; bidirectional: all), and ``ctx`` with their positions and mask and this rank's query slots
    numbered from r·n, so the usual visibility rules apply."""
    group = ctx.sequence_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if ctx.relative_bias is not None or ctx.document_ids is not None:
        raise ValueError("context-parallel attention takes no T5 relative bias and no packed documents")
    ranks = rank + 1 if ctx.causal else world
    n = k.shape[-2]

    def gathered() -> GatheredKeys:
        positions = gather_across(ctx.positions, group)[:ranks]  # (ranks, B, n)
        mask = None if ctx.token_mask is None else gather_across(ctx.token_mask, group)[:ranks]
        flat = lambda x: x.permute(1, 0, 2).flatten(1)  # noqa: E731  (ranks, B, n) -> (B, ranks·n)
        return GatheredKeys(ranks, flat(positions), None if mask is None else flat(mask))

    keys = ctx.shared("context_parallel_keys", gathered)
    both = gather_across(torch.cat([k, v], -1), group)[:ranks]  # (ranks, B, H, n, D_k + D_v): one collective
    both = both.permute(1, 2, 0, 3, 4).flatten(2, 3)
    k_all, v_all = both.split([k.shape[-1], v.shape[-1]], -1)
    # Query i of this rank is slot r·n + i among the gathered keys (the causal rule and "a query sees
    # itself" read slots); rank 0 of a causal model reads only its own keys, as an unsplit call would.
    view = dataclasses.replace(ctx, key_positions=keys.positions, key_mask=keys.mask, past=rank * n,
                               sequence_group=None, _shared={})
    return k_all, v_all, view
