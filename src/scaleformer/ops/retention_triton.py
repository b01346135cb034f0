"""Chunkwise retention as Triton kernels, forward and backward, behind :func:`scaleformer.ops.retention.retention`.

Status (issue 19, in progress): verified on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)
against the PyTorch forms and the reference; not yet run or timed on a GPU.

What the kernels walk is a chunk table (:class:`Chunks`): a *sequence* is a batch row, or one document
of a packed row given by cu_seqlens-style offsets; its chunks are consecutive, the last one shorter, so
documents are read in place and a state never crosses a document boundary.

The computation, for each chunk of C steps (t, m inside the chunk; S_in the state entering it)::

    b_t = Σ_{s ≤ t} e_s                      the in-chunk running sum of per-step log decays
    o_t = exp(b_t) q_t S_in + Σ_{m ≤ t} exp(b_t − b_m) (q_t · k_m) v_m
    S_out = exp(b_C) S_in + Σ_m exp(b_C − b_m) k_mᵀ v_m

with e_t = log γ (per head) or log γ_t (gated), times the step's mask (padding neither decays nor adds:
its key is zeroed and e = 0). Kernel 1 walks the chunks of one (sequence, head, key block, value block) in
order and stores each chunk's S_in (float32); kernel 2 computes every chunk's outputs in parallel from it.
Backward: the states are recomputed (kernel 1), a reverse walk gives the gradient of each chunk's
outgoing state, dS_c = exp(b_C) dS_{c+1} + Σ_t exp(b_t) q_tᵀ do_t, and one program per chunk computes
dq, dk, dv from S_in and dS. Every exponent is a difference of the running sum P of log decays, so
∂L/∂P_n = q_n·dq_n − k_n·dk_n (plus ⟨dS_T, S_T⟩ at a sequence's end), and ∂L/∂e_s is its reverse
cumulative sum within the sequence.
Half-precision inputs keep their dtype into the dot products on a GPU; float32 inputs (and every input
under the interpreter) are multiplied at IEEE float32 precision, never TF32; states, decays and
accumulation are float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["Chunks", "chunk_retention_backward", "chunk_retention_forward", "chunk_table"]


@triton.jit
def _chunk_rows(batch_ptr, start_ptr, length_ptr, c, h, H, T, C: tl.constexpr):
    """Chunk c of head h: (first row of the chunk in the flattened (B·H·T) rows, in-chunk rows, rows real)."""
    rows = tl.arange(0, C)
    b = tl.load(batch_ptr + c)
    first = (b * H + h).to(tl.int64) * T + tl.load(start_ptr + c)
    return first, rows, rows < tl.load(length_ptr + c)


@triton.jit
def state_tile(ptr, sh, cols_k, cols_v, K, V, PRESENT: tl.constexpr):
    """(offsets, mask, tile): where the (K, V) matrix of sequence-head ``sh`` lies, as a (BK, BV) tile of
    columns ``cols_k`` × ``cols_v``, and that tile in float32 (zeros when not ``PRESENT``: no initial state,
    no gradient of the final one)."""
    mask = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    offsets = cols_k[:, None] * V + cols_v[None, :]
    if PRESENT:
        tile = tl.load(ptr + sh * K * V + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        tile = tl.zeros((cols_k.shape[0], cols_v.shape[0]), dtype=tl.float32)
    return offsets, mask, tile


@triton.jit
def _chunk_states(k_ptr, v_ptr, e_ptr, h_ptr, s0_ptr, sn_ptr, batch_ptr, start_ptr, length_ptr, seq_ptr,
                  H, T, K, V, NC, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
                  IEEE: tl.constexpr):
    """Walk the chunks of one (sequence, head, key block, value block) in order; store each chunk's S_in."""
    kb, vb, sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, h = sh // H, sh % H
    cols_k = kb * BK + tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    state_offsets, state_mask, state = state_tile(s0_ptr, sh, cols_k, cols_v, K, V, HAS_S0)
    for c in range(tl.load(seq_ptr + seq), tl.load(seq_ptr + seq + 1)):
        tl.store(h_ptr + (h * NC + c).to(tl.int64) * K * V + state_offsets, state, mask=state_mask)
        first, rows, real = _chunk_rows(batch_ptr, start_ptr, length_ptr, c, h, H, T, C)
        keys = tl.load(k_ptr + (first + rows[:, None]) * K + cols_k[None, :],
                       mask=real[:, None] & (cols_k[None, :] < K), other=0.0)
        values = tl.load(v_ptr + (first + rows[:, None]) * V + cols_v[None, :],
                         mask=real[:, None] & (cols_v[None, :] < V), other=0.0)
        steps = tl.load(e_ptr + first + rows, mask=real, other=0.0)
        running = tl.cumsum(steps, 0)
        total = tl.sum(steps, 0)
        keys = keys.to(tl.float32) * tl.exp(total - running)[:, None]
        if IEEE:
            added = tl.dot(tl.trans(keys), values.to(tl.float32), input_precision="ieee")
        else:
            added = tl.dot(tl.trans(keys.to(values.dtype)), values)
        state = state * tl.exp(total) + added
    tl.store(sn_ptr + sh * K * V + state_offsets, state, mask=state_mask)


@triton.jit
def _chunk_outputs(q_ptr, k_ptr, v_ptr, e_ptr, h_ptr, o_ptr, batch_ptr, start_ptr, length_ptr, H, T, K, V, NC,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    """Every chunk's outputs in parallel from the state entering it."""
    vb, c, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, rows, real = _chunk_rows(batch_ptr, start_ptr, length_ptr, c, h, H, T, C)
    cols_v = vb * BV + tl.arange(0, BV)
    inter = tl.zeros((C, BV), dtype=tl.float32)
    scores = tl.zeros((C, C), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols_k = k0 + tl.arange(0, BK)
        in_k = real[:, None] & (cols_k[None, :] < K)
        queries = tl.load(q_ptr + (first + rows[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0)
        keys = tl.load(k_ptr + (first + rows[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0)
        state = tl.load(h_ptr + (h * NC + c).to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :],
                        mask=(cols_k[:, None] < K) & (cols_v[None, :] < V), other=0.0)
        if IEEE:
            queries, keys = queries.to(tl.float32), keys.to(tl.float32)
            inter += tl.dot(queries, state, input_precision="ieee")
            scores += tl.dot(queries, tl.trans(keys), input_precision="ieee")
        else:
            inter += tl.dot(queries, state.to(queries.dtype))
            scores += tl.dot(queries, tl.trans(keys))
    running = tl.cumsum(tl.load(e_ptr + first + rows, mask=real, other=0.0), 0)
    causal = rows[:, None] >= rows[None, :]
    decay = tl.where(causal, tl.exp(running[:, None] - running[None, :]), 0.0)
    in_v = real[:, None] & (cols_v[None, :] < V)
    values = tl.load(v_ptr + (first + rows[:, None]) * V + cols_v[None, :], mask=in_v, other=0.0)
    weights = scores * decay
    if IEEE:
        intra = tl.dot(weights, values.to(tl.float32), input_precision="ieee")
    else:
        intra = tl.dot(weights.to(values.dtype), values)
    out = inter * tl.exp(running)[:, None] + intra
    tl.store(o_ptr + (first + rows[:, None]) * V + cols_v[None, :], out, mask=in_v)


def _block(size: int) -> int:
    return max(16, min(64, triton.next_power_of_2(size)))


def _chunk(chunk_size: int) -> int:
    return max(16, triton.next_power_of_2(chunk_size))  # tl.dot needs power-of-two tiles of 16 or more


@dataclass(frozen=True)
class Chunks:
    """The chunks the kernels walk. A *sequence* is a batch row, or one document of a packed row; its
    chunks are consecutive, of ``size`` steps, the last one shorter. Per chunk: its batch row, its first
    step and its length (int32, (NC,)); per sequence: its first chunk (``first`` (S+1,), so chunks
    first[s]..first[s+1]−1 are its own), its batch row, first step and end (int64, (S,))."""

    size: int
    batch: Tensor
    start: Tensor
    length: Tensor
    first: Tensor
    seq_batch: Tensor
    seq_start: Tensor
    seq_end: Tensor
    packed: bool

    def step_ends(self, length: int, device: torch.device) -> Tensor:
        """(T,): where the sequence holding each step ends (T for batch rows; packed: its document's end)."""
        if not self.packed:
            return torch.full((length,), length, device=device)
        return torch.repeat_interleave(self.seq_end, self.seq_end - self.seq_start).to(device)

    @property
    def count(self) -> int:
        return self.batch.shape[0]

    @property
    def sequences(self) -> int:
        return self.seq_batch.shape[0]

    def args(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.batch, self.start, self.length


def chunk_table(batch: int, length: int, chunk_size: int, offsets: Tensor | None, device: torch.device) -> Chunks:
    """Chunks of every row of ``length`` steps, or (``offsets``, a (N+1,) increasing tensor from 0 to
    ``length`` over a batch of one row) of each document offsets[n]..offsets[n+1]−1."""
    size = _chunk(chunk_size)
    if offsets is None:
        seq_batch = torch.arange(batch, dtype=torch.int64)
        seq_start = torch.zeros(batch, dtype=torch.int64)
        seq_end = torch.full((batch,), length, dtype=torch.int64)
    else:
        bounds = offsets.detach().to("cpu", torch.int64)
        seq_start, seq_end = bounds[:-1], bounds[1:]
        seq_batch = torch.zeros(seq_start.shape[0], dtype=torch.int64)
    counts = (seq_end - seq_start + size - 1).div(size, rounding_mode="floor")
    first = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    owner = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)  # each chunk's sequence
    within = torch.arange(int(first[-1])) - first[owner]
    start = seq_start[owner] + within * size
    chunk_length = torch.minimum(seq_end[owner] - start, torch.tensor(size))
    to = lambda x: x.to(device, torch.int32).contiguous()  # noqa: E731
    return Chunks(size, to(seq_batch[owner]), to(start), to(chunk_length), to(first), seq_batch, seq_start, seq_end,
                  packed=offsets is not None)


def chunk_retention_forward(q: Tensor, k: Tensor, v: Tensor, log_step_decay: Tensor, chunks: Chunks,
                            initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """q, k (B, H, T, K), v (B, H, T, V), log_step_decay (B, H, T) float32: each step's log decay (0 at
    padding, whose keys the caller has zeroed). Returns o (B, H, T, V) float32 and each sequence's final
    state (S, H, K, V) float32 (S = B, or the number of documents)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    e = log_step_decay.to(torch.float32).expand(b, h, t).contiguous()
    bk, bv = _block(dk), _block(dv)
    states = torch.empty(h, max(1, chunks.count), dk, dv, dtype=torch.float32, device=q.device)
    final = torch.empty(chunks.sequences, h, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
    # Dot products in float32 at IEEE precision (never TF32) for float32 inputs, and for every dtype under
    # the interpreter, which cannot multiply bfloat16 (a 16 × 16 product came out 2.6e10 wrong); half
    # inputs on a GPU go into the dots as they are, accumulated in float32.
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    _chunk_states[(triton.cdiv(dk, bk), triton.cdiv(dv, bv), chunks.sequences * h)](
        k, v, e, states, s0, final, *chunks.args(), chunks.first, h, t, dk, dv, chunks.count, C=chunks.size,
        BK=bk, BV=bv, HAS_S0=initial_state is not None, IEEE=ieee)
    out = torch.zeros(b, h, t, dv, dtype=torch.float32, device=q.device)  # zeros: steps outside every document
    if chunks.count:
        _chunk_outputs[(triton.cdiv(dv, bv), chunks.count, h)](
            q, k, v, e, states, out, *chunks.args(), h, t, dk, dv, chunks.count, C=chunks.size, BK=bk, BV=bv,
            IEEE=ieee)
    return out, final


@triton.jit
def _chunk_state_grads(q_ptr, do_ptr, e_ptr, dh_ptr, dsn_ptr, ds0_ptr, batch_ptr, start_ptr, length_ptr, seq_ptr,
                       H, T, K, V, NC, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DSN: tl.constexpr):
    """Backward through one sequence's chunk recurrence, last chunk first: dh[c] = ∂L/∂(state leaving chunk c)."""
    kb, vb, sh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, h = sh // H, sh % H
    cols_k = kb * BK + tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    state_offsets, state_mask, grad = state_tile(dsn_ptr, sh, cols_k, cols_v, K, V, HAS_DSN)
    first_chunk, end_chunk = tl.load(seq_ptr + seq), tl.load(seq_ptr + seq + 1)
    for i in range(0, end_chunk - first_chunk):
        c = end_chunk - 1 - i
        tl.store(dh_ptr + (h * NC + c).to(tl.int64) * K * V + state_offsets, grad, mask=state_mask)
        first, rows, real = _chunk_rows(batch_ptr, start_ptr, length_ptr, c, h, H, T, C)
        queries = tl.load(q_ptr + (first + rows[:, None]) * K + cols_k[None, :],
                          mask=real[:, None] & (cols_k[None, :] < K), other=0.0).to(tl.float32)
        grad_out = tl.load(do_ptr + (first + rows[:, None]) * V + cols_v[None, :],
                           mask=real[:, None] & (cols_v[None, :] < V), other=0.0)
        steps = tl.load(e_ptr + first + rows, mask=real, other=0.0)
        queries = queries * tl.exp(tl.cumsum(steps, 0))[:, None]
        grad = grad * tl.exp(tl.sum(steps, 0)) + tl.dot(tl.trans(queries), grad_out, input_precision="ieee")
    tl.store(ds0_ptr + sh * K * V + state_offsets, grad, mask=state_mask)


@triton.jit
def _chunk_input_grads(q_ptr, k_ptr, v_ptr, e_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr,
                       batch_ptr, start_ptr, length_ptr, H, T, K, V, NC,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv of one chunk (whole key and value widths in one tile), from the state entering it (h) and
    the gradient of the state leaving it (dh)."""
    c, h = tl.program_id(0), tl.program_id(1)
    first, rows, real = _chunk_rows(batch_ptr, start_ptr, length_ptr, c, h, H, T, C)
    cols_k, cols_v = tl.arange(0, BK), tl.arange(0, BV)
    in_k, in_v = real[:, None] & (cols_k[None, :] < K), real[:, None] & (cols_v[None, :] < V)
    at_k = (first + rows[:, None]) * K + cols_k[None, :]
    at_v = (first + rows[:, None]) * V + cols_v[None, :]
    queries = tl.load(q_ptr + at_k, mask=in_k, other=0.0).to(tl.float32)
    keys = tl.load(k_ptr + at_k, mask=in_k, other=0.0).to(tl.float32)
    values = tl.load(v_ptr + at_v, mask=in_v, other=0.0).to(tl.float32)
    grad_out = tl.load(do_ptr + at_v, mask=in_v, other=0.0)
    state_offsets = (h * NC + c).to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    state_mask = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    state = tl.load(h_ptr + state_offsets, mask=state_mask, other=0.0)
    grad_state = tl.load(dh_ptr + state_offsets, mask=state_mask, other=0.0)
    e = tl.load(e_ptr + first + rows, mask=real, other=0.0)
    running = tl.cumsum(e, 0)
    total = tl.sum(e, 0)
    causal = rows[:, None] >= rows[None, :]
    decay = tl.where(causal, tl.exp(running[:, None] - running[None, :]), 0.0)  # [t, m]
    scores = tl.dot(queries, tl.trans(keys), input_precision="ieee") * decay  # (q_t · k_m) D[t, m]
    mixed = tl.dot(grad_out, tl.trans(values), input_precision="ieee") * decay  # (do_t · v_m) D[t, m]
    to_end = tl.exp(total - running)[:, None]
    grad_q = (tl.dot(grad_out, tl.trans(state), input_precision="ieee") * tl.exp(running)[:, None]
              + tl.dot(mixed, keys, input_precision="ieee"))
    grad_k = (tl.dot(tl.trans(mixed), queries, input_precision="ieee")
              + tl.dot(values, tl.trans(grad_state), input_precision="ieee") * to_end)
    grad_v = (tl.dot(tl.trans(scores), grad_out, input_precision="ieee")
              + tl.dot(keys, grad_state, input_precision="ieee") * to_end)
    tl.store(dq_ptr + at_k, grad_q, mask=in_k)
    tl.store(dk_ptr + at_k, grad_k, mask=in_k)
    tl.store(dv_ptr + at_v, grad_v, mask=in_v)


def chunk_retention_backward(q: Tensor, k: Tensor, v: Tensor, log_step_decay: Tensor, chunks: Chunks,
                             initial_state: Tensor | None, grad_out: Tensor, grad_final: Tensor | None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`chunk_retention_forward`'s outputs (o and the final states) with respect to q, k,
    v, the initial states, and P (B, H, T), each sequence's running sum of log decays (∂L/∂P_n = q_n·dq_n −
    k_n·dk_n, plus ⟨dS, S⟩ at each sequence's last step; the caller turns it into ∂L/∂log γ). All float32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    grad_out = grad_out.to(torch.float32).contiguous()
    e = log_step_decay.to(torch.float32).expand(b, h, t).contiguous()
    bk, bv = _block(dk), _block(dv)
    n, size = chunks.count, chunks.size
    states = torch.empty(h, max(1, n), dk, dv, dtype=torch.float32, device=q.device)
    final = torch.empty(chunks.sequences, h, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
    grid = (triton.cdiv(dk, bk), triton.cdiv(dv, bv), chunks.sequences * h)
    _chunk_states[grid](k, v, e, states, s0, final, *chunks.args(), chunks.first, h, t, dk, dv, n, C=size,
                        BK=bk, BV=bv, HAS_S0=initial_state is not None, IEEE=True)
    grad_states = torch.empty_like(states)
    grad_initial = torch.empty_like(final)
    dsn = grad_final.to(torch.float32).contiguous() if grad_final is not None else grad_initial
    _chunk_state_grads[grid](q, grad_out, e, grad_states, dsn, grad_initial, *chunks.args(), chunks.first, h, t,
                             dk, dv, n, C=size, BK=bk, BV=bv, HAS_DSN=grad_final is not None)
    grads = [torch.zeros(b, h, t, width, dtype=torch.float32, device=q.device) for width in (dk, dk, dv)]
    if n:
        _chunk_input_grads[(n, h)](q, k, v, e, states, grad_states, grad_out, *grads, *chunks.args(), h, t, dk, dv,
                                   n, C=size, BK=triton.next_power_of_2(max(dk, 16)),
                                   BV=triton.next_power_of_2(max(dv, 16)))
    dq, dk_, dv_ = grads
    grad_positions = (q.float() * dq).sum(-1) - (k.float() * dk_).sum(-1)
    if grad_final is not None:
        ends = chunks.seq_end - 1
        present = ends >= chunks.seq_start  # empty documents have no last step
        rows, last = chunks.seq_batch[present].to(q.device), ends[present].to(q.device)
        grad_positions[rows, :, last] += (grad_final.float() * final).sum((-1, -2))[present.to(q.device)]
    return dq, dk_, dv_, grad_initial, grad_positions
