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
* **Causal softmax attention is balanced** (:func:`balanced_causal_attention`): with the contiguous split,
  rank r's queries read (r + 1)·n keys, so the last rank works W times as long as the first. Cut the
  sequence into 2W chunks of n / 2: rank r computes the queries of chunks r and 2W − 1 − r (torchtitan's
  zig-zag assignment), each over the keys up to its own chunk, so every rank scores (2W + 1)·n² / 4
  query-key pairs, where the contiguous split has rank r score (r + 1)·n². The ranks keep their contiguous positions (recurrent layers, convolutions and positions need
  nothing new); the queries and the outputs move instead, one all-gather each.
* **Dilated attention** keeps LongNet's own algorithm (:mod:`scaleformer.ops.dilated_parallel`).

**Packed documents** (``document_ids``) cross the split as they are: the model gathers every rank's
document ids once per call (integers, B × T), so positions restart where documents do and attention
compares the key's document with the query's. A recurrent layer runs its shard one document per row
(:class:`~scaleformer.layers.context.DocumentRows`) and describes how those rows meet its neighbours'
(:class:`DocumentSplit`): the shard's summary is its last document's final state, its transition is zero
when a document starts inside the shard (the state entering it never reaches past that start), and the
entering state reaches only the shard's first document, and only if that document began on an earlier
rank. A convolution's halo keeps only the previous rank's inputs from that same document.

Every exchange is an autograd function, so the backward is exact too (tested in float64 against one
process, outputs and every gradient). Bytes sent are counted in :data:`COMM`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CommCounter", "COMM", "gather_across", "shift_from_previous", "split_recurrence",
           "context_parallel_keys", "check_even_split", "DocumentSplit", "document_split", "convolution_halo",
           "balanced_causal_attention", "causal_balance"]


@dataclass
class CommCounter:
    """Bytes this rank sent over context-parallel exchanges, forward and backward, since the last reset; and
    the (query, key) pairs its context-parallel attention scored, per row and head (the work balancing
    evens out)."""

    sent: int = 0
    scored: int = 0

    def reset(self) -> None:
        self.sent = self.scored = 0


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


@dataclass(frozen=True)
class DocumentSplit:
    """A recurrent op's call on this rank's shard laid out one document per row (N rows), and how those rows
    meet the neighbouring ranks': pass it as the op's ``sequence_group``."""

    group: Any
    first: Tensor  # (B,) long: the row holding each shard row's first token
    last: Tensor  # (B,) long: the row holding its last token
    continues: Tensor  # (B,) bool: that first token's document began on an earlier rank


def document_split(ctx: Any, documents: Any) -> DocumentSplit:
    """The :class:`DocumentSplit` of ``ctx``'s shard (its ``sequence_group`` and ``split_documents``) laid
    out as ``documents`` (:class:`~scaleformer.layers.context.DocumentRows` of the shard)."""
    def compute() -> DocumentSplit:
        group, everywhere = ctx.sequence_group, ctx.split_documents
        b, t = ctx.positions.shape
        row_of = torch.empty(b * t, dtype=torch.long, device=documents.index.device)
        rows = torch.arange(documents.index.shape[0], device=row_of.device)[:, None].expand_as(documents.index)
        row_of[documents.index[documents.filled]] = rows[documents.filled]
        starts = torch.arange(b, device=row_of.device) * t
        rank = dist.get_rank(group)
        continues = (torch.zeros(b, dtype=torch.bool, device=row_of.device) if rank == 0
                     else everywhere[:, rank * t - 1] == everywhere[:, rank * t])
        return DocumentSplit(group, row_of[starts], row_of[starts + t - 1], continues)

    return ctx.shared(("document split", id(documents)), compute)


def split_recurrence(op: Callable[..., tuple[Tensor, Tensor | None]], q: Tensor, k: Tensor, v: Tensor, *,
                     group: Any, log_decay_total: Tensor | None, **options: Any) -> Tensor:
    """``op(q, k, v, **options)`` — a linear recurrence's op (N, H, T, ·), taking ``initial_state`` and
    ``output_final_state`` — over a sequence whose rank-r shard these are; returns this shard's outputs.

    ``group``: a process group (the N rows are the shard's rows), or a :class:`DocumentSplit` (the rows
    are the shard's documents). ``log_decay_total`` (N, H): a row's transition is the scalar e^{total} per
    head (retention and its kin); None: it is a K × K matrix, found by running the op from the identity with
    zero values (the delta rule)."""
    documents = group if isinstance(group, DocumentSplit) else None
    group = documents.group if documents is not None else group
    rank = dist.get_rank(group)
    out, own = op(q, k, v, initial_state=None, output_final_state=True, **options)
    assert own is not None
    zeros_v = torch.zeros_like(v)
    if log_decay_total is not None:
        transition = torch.exp(log_decay_total.to(own.dtype))[..., None, None]  # (N, H, 1, 1)
    else:
        width = k.shape[-1]
        identity = torch.eye(width, dtype=own.dtype, device=own.device).expand(*own.shape[:2], width, width)
        _, transition = op(q, k, torch.zeros(*v.shape[:-1], width, dtype=v.dtype, device=v.device),
                           initial_state=identity, output_final_state=True, **options)
    reaches = None  # (B,) whether the entering state reaches this shard's first document
    if documents is not None:  # the shard's summary is its last document's; a document starting inside cuts it
        own = own[documents.last]
        single = (documents.first == documents.last).to(own.dtype)[:, None, None, None]
        transition = transition[documents.last] * single
        reaches = documents.continues.to(own.dtype)
    # One all-gather of (M, P) together: one collective each way, in the same order on every rank.
    parts = [own.flatten(2), transition.flatten(2)]
    if reaches is not None:
        parts.append(reaches[:, None, None].expand(*own.shape[:2], 1))
    packed = gather_across(torch.cat(parts, -1), group)
    states = packed[..., :own[0, 0].numel()].unflatten(-1, own.shape[2:])  # (W, B, H, K, V)
    transitions = packed[..., own[0, 0].numel():own[0, 0].numel() + transition[0, 0].numel()].unflatten(
        -1, transition.shape[2:])  # (W, B, H, 1|K, 1|K)
    if rank == 0:
        return _depend(out, packed)
    entering = states[0]
    for s in range(1, rank):
        if reaches is not None:  # rank s's first document began before it, or the state restarts there
            entering = entering * packed[s, ..., -1:, None]
        entering = _apply(transitions[s], entering) + states[s]
    if documents is not None:  # only this shard's first document continues an earlier rank's
        entering = entering * reaches[:, None, None, None]
        placed = entering.new_zeros(out.shape[0], *entering.shape[1:])
        entering = placed.index_put((documents.first,), entering)
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
    if ctx.relative_bias is not None:
        raise ValueError("context-parallel attention takes no T5 relative bias")
    ranks = rank + 1 if ctx.causal else world
    n = k.shape[-2]

    def gathered() -> GatheredKeys:
        positions = gather_across(ctx.positions, group)[:ranks]  # (ranks, B, n)
        mask = None if ctx.token_mask is None else gather_across(ctx.token_mask, group)[:ranks]
        flat = lambda x: x.permute(1, 0, 2).flatten(1)  # noqa: E731  (ranks, B, n) -> (B, ranks·n)
        return GatheredKeys(ranks, flat(positions), None if mask is None else flat(mask))

    keys = ctx.shared("context_parallel_keys", gathered)
    COMM.scored += n * ranks * n
    both = gather_across(torch.cat([k, v], -1), group)[:ranks]  # (ranks, B, H, n, D_k + D_v): one collective
    both = both.permute(1, 2, 0, 3, 4).flatten(2, 3)
    k_all, v_all = both.split([k.shape[-1], v.shape[-1]], -1)
    # Query i of this rank is slot r·n + i among the gathered keys (the causal rule and "a query sees
    # itself" read slots); rank 0 of a causal model reads only its own keys, as an unsplit call would.
    documents = None if ctx.split_documents is None else ctx.split_documents[:, :ranks * n]
    view = dataclasses.replace(ctx, key_positions=keys.positions, key_mask=keys.mask, past=rank * n,
                               key_document_ids=documents, sequence_group=None, _shared={})
    return k_all, v_all, view


def convolution_halo(x: Tensor, width: int, ctx: Any, documents: Any = None) -> Tensor:
    """A causal convolution's history (B, width − 1, C) for this rank's inputs ``x`` (B, n, C, padding already
    zeroed): the previous rank's last width − 1 inputs (zeros on the first rank). With ``documents`` (the
    shard's DocumentRows), only those of the document this shard begins with are kept, as the history
    (N, width − 1, C) of that document's row; every other row starts from zeros."""
    if x.shape[1] < width - 1:
        raise ValueError(f"a context-parallel short convolution of width {width} needs at least {width - 1} "
                         f"positions per rank, got {x.shape[1]}")
    group = ctx.sequence_group
    halo = shift_from_previous(x[:, x.shape[1] - (width - 1):], group)
    if documents is None:
        return halo
    rank, n = dist.get_rank(group), x.shape[1]
    if rank > 0:  # the halo's tokens of another document than the one this shard continues read as zeros
        everywhere = ctx.split_documents
        same = everywhere[:, rank * n - (width - 1):rank * n] == everywhere[:, rank * n, None]
        same = same.flip(1).cumprod(1).flip(1)  # and no other document between it and this shard
        halo = halo * same[..., None].to(halo.dtype)
    split = document_split(ctx, documents)
    history = halo.new_zeros(documents.index.shape[0], *halo.shape[1:])
    return history.index_put((split.first,), halo)


_BALANCE: contextvars.ContextVar[bool] = contextvars.ContextVar("causal_balance", default=True)


@contextlib.contextmanager
def causal_balance(enabled: bool) -> Iterator[None]:
    """Within this block, context-parallel causal attention is balanced (the default) or not (each rank's own
    queries over the keys of ranks ≤ r): for comparing the two; the outputs are the same."""
    token = _BALANCE.set(enabled)
    try:
        yield
    finally:
        _BALANCE.reset(token)


def balanced_causal_attention(q: Tensor, k: Tensor, v: Tensor, ctx: Any,
                              attend: Callable[[Tensor, Tensor, Tensor, Any], Tensor]) -> Tensor | None:
    """Causal attention of this rank's queries (B, H, n, D) over every rank's keys and values (B, H_kv, n, D),
    the work balanced across the ranks; ``attend(q, k, v, view)`` is the layer's attention of some queries
    over keys whose positions, padding and documents ``view`` (a Context) describes. None when it does not
    apply (balancing switched off, one rank, an odd n): the caller then runs the contiguous path.

    Chunk c of 2W (positions [c·m, (c+1)·m), m = n / 2) is computed by rank c if c < W, else by rank
    2W − 1 − c, over the keys of chunks 0 … c: rank r reads (r + 1)·m + (2W − r)·m keys, the same on every
    rank. One all-gather brings every rank's queries, keys and values (heads flattened, so grouped-query
    attention's fewer key heads pack beside the queries); one more brings each chunk's outputs to the rank
    that holds its positions."""
    group = ctx.sequence_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = q.shape[-2]
    if not _BALANCE.get() or world == 1 or n % 2 or not ctx.causal:
        return None
    if ctx.relative_bias is not None:
        raise ValueError("context-parallel attention takes no T5 relative bias")
    m = n // 2
    keys = ctx.shared("context_parallel_keys_everywhere", lambda: _gathered_keys(ctx, world))
    heads, kv_heads, d_qk, d_v = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    flat = lambda x: x.transpose(1, 2).flatten(2)  # noqa: E731  (B, H, n, D) -> (B, n, H·D)
    everything = gather_across(torch.cat([flat(q), flat(k), flat(v)], -1), group)  # (W, B, n, F)
    everything = everything.transpose(0, 1).flatten(1, 2)  # (B, W·n, F): global order
    q_all, k_all, v_all = everything.split([heads * d_qk, kv_heads * d_qk, kv_heads * d_v], -1)
    unflat = lambda x, h: x.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731  (B, S, H·D) -> (B, H, S, D)
    q_all, k_all, v_all = unflat(q_all, heads), unflat(k_all, kv_heads), unflat(v_all, kv_heads)
    outputs = []
    for chunk in (rank, 2 * world - 1 - rank):
        start, end = chunk * m, (chunk + 1) * m
        cut = lambda x: None if x is None else x[:, start:end]  # noqa: E731
        upto = lambda x: None if x is None else x[:, :end]  # noqa: E731
        view = dataclasses.replace(ctx, positions=keys.positions[:, start:end], token_mask=cut(keys.mask),
                                   document_ids=cut(ctx.split_documents), key_positions=upto(keys.positions),
                                   key_mask=upto(keys.mask), key_document_ids=upto(ctx.split_documents),
                                   way_ids=None, past=start, sequence_group=None, split_documents=None, _shared={})
        outputs.append(attend(q_all[:, :, start:end], k_all[:, :, :end], v_all[:, :, :end], view))
        COMM.scored += m * end
    # Every rank's two chunks (W, B, H, 2m, D); this rank's positions are chunks 2r and 2r + 1.
    computed = gather_across(torch.cat(outputs, -2), group)
    mine = []
    for chunk in (2 * rank, 2 * rank + 1):
        holder, second = (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)
        mine.append(computed[holder][..., second * m:(second + 1) * m, :])
    return torch.cat(mine, -2)


def _gathered_keys(ctx: Any, world: int) -> GatheredKeys:
    """Every rank's positions and padding, in global order (B, W·n)."""
    group = ctx.sequence_group
    flat = lambda x: x.permute(1, 0, 2).flatten(1)  # noqa: E731  (W, B, n) -> (B, W·n)
    positions = flat(gather_across(ctx.positions, group))
    mask = None if ctx.token_mask is None else flat(gather_across(ctx.token_mask, group))
    return GatheredKeys(world, positions, mask)
