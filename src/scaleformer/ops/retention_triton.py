"""Chunkwise retention as Triton kernels, forward and backward, behind :func:`scaleformer.ops.retention.retention`.

Status (issue 19, in progress): verified on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)
against the PyTorch forms and the reference; not yet run or timed on a GPU. Packed documents are not
covered yet (the PyTorch forms handle them).

The computation, for each chunk of C steps (t, m inside the chunk; S_in the state entering it)::

    b_t = Σ_{s ≤ t} e_s                      the in-chunk running sum of per-step log decays
    o_t = exp(b_t) q_t S_in + Σ_{m ≤ t} exp(b_t − b_m) (q_t · k_m) v_m
    S_out = exp(b_C) S_in + Σ_m exp(b_C − b_m) k_mᵀ v_m

with e_t = log γ (per head) or log γ_t (gated), times the step's mask (padding neither decays nor adds:
its key is zeroed and e = 0). Kernel 1 walks the chunks of one (batch, head, key block, value block) in
order and stores each chunk's S_in (float32); kernel 2 computes every chunk's outputs in parallel from it.
Backward: the states are recomputed (kernel 1), a reverse walk gives the gradient of each chunk's
outgoing state, dS_c = exp(b_C) dS_{c+1} + Σ_t exp(b_t) q_tᵀ do_t, and one program per chunk computes
dq, dk, dv from S_in and dS. Every exponent is a difference of the running sum P of log decays, so
∂L/∂P_n = q_n·dq_n − k_n·dk_n (plus ⟨dS_T, S_T⟩ at the end), and ∂L/∂e_s is its reverse cumulative sum.
Half-precision inputs keep their dtype into the dot products on a GPU; float32 inputs (and every input
under the interpreter) are multiplied at IEEE float32 precision, never TF32; states, decays and
accumulation are float32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

import triton
import triton.language as tl

__all__ = ["chunk_retention_forward"]


@triton.jit
def _chunk_states(k_ptr, v_ptr, e_ptr, h_ptr, s0_ptr, sn_ptr, T, K, V, NC,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr, IEEE: tl.constexpr):
    kb, vb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, C)
    cols_k = kb * BK + tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    state_mask = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    state_offsets = cols_k[:, None] * V + cols_v[None, :]
    if HAS_S0:
        state = tl.load(s0_ptr + bh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)
    for c in range(0, NC):
        tl.store(h_ptr + (bh * NC + c) * K * V + state_offsets, state, mask=state_mask)
        t = c * C + rows
        keys = tl.load(k_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], mask=cols_k[None, :] < K, other=0.0)
        values = tl.load(v_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], mask=cols_v[None, :] < V, other=0.0)
        steps = tl.load(e_ptr + bh * T + t)
        running = tl.cumsum(steps, 0)
        total = tl.sum(steps, 0)
        keys = keys.to(tl.float32) * tl.exp(total - running)[:, None]
        if IEEE:
            added = tl.dot(tl.trans(keys), values.to(tl.float32), input_precision="ieee")
        else:
            added = tl.dot(tl.trans(keys.to(values.dtype)), values)
        state = state * tl.exp(total) + added
    tl.store(sn_ptr + bh * K * V + state_offsets, state, mask=state_mask)


@triton.jit
def _chunk_outputs(q_ptr, k_ptr, v_ptr, e_ptr, h_ptr, o_ptr, T, K, V, NC,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, IEEE: tl.constexpr):
    vb, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, C)
    t = c * C + rows
    cols_v = vb * BV + tl.arange(0, BV)
    inter = tl.zeros((C, BV), dtype=tl.float32)
    scores = tl.zeros((C, C), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols_k = k0 + tl.arange(0, BK)
        queries = tl.load(q_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], mask=cols_k[None, :] < K, other=0.0)
        keys = tl.load(k_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], mask=cols_k[None, :] < K, other=0.0)
        state = tl.load(h_ptr + (bh * NC + c) * K * V + cols_k[:, None] * V + cols_v[None, :],
                        mask=(cols_k[:, None] < K) & (cols_v[None, :] < V), other=0.0)
        if IEEE:
            queries, keys = queries.to(tl.float32), keys.to(tl.float32)
            inter += tl.dot(queries, state, input_precision="ieee")
            scores += tl.dot(queries, tl.trans(keys), input_precision="ieee")
        else:
            inter += tl.dot(queries, state.to(queries.dtype))
            scores += tl.dot(queries, tl.trans(keys))
    running = tl.cumsum(tl.load(e_ptr + bh * T + t), 0)
    causal = rows[:, None] >= rows[None, :]
    decay = tl.where(causal, tl.exp(running[:, None] - running[None, :]), 0.0)
    values = tl.load(v_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], mask=cols_v[None, :] < V, other=0.0)
    weights = scores * decay
    if IEEE:
        intra = tl.dot(weights, values.to(tl.float32), input_precision="ieee")
    else:
        intra = tl.dot(weights.to(values.dtype), values)
    out = inter * tl.exp(running)[:, None] + intra
    tl.store(o_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], out, mask=cols_v[None, :] < V)


def _block(size: int) -> int:
    return max(16, min(64, triton.next_power_of_2(size)))


def chunk_retention_forward(q: Tensor, k: Tensor, v: Tensor, log_step_decay: Tensor, chunk_size: int,
                            initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """q, k (B, H, T, K), v (B, H, T, V), log_step_decay (B, H, T) float32: each step's log decay (0 at
    padding, whose keys the caller has zeroed). Returns o (B, H, T, V) float32 and the final state
    (B, H, K, V) float32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    chunk = max(16, triton.next_power_of_2(chunk_size))  # tl.dot needs power-of-two tiles of 16 or more
    padded = -(-t // chunk) * chunk
    pad = padded - t
    if pad:  # zero keys and zero log decays: the extra steps change neither outputs nor the state
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_step_decay = F.pad(log_step_decay, (0, pad))
    q, k, v = (x.contiguous() for x in (q, k, v))
    e = log_step_decay.to(torch.float32).expand(b, h, padded).contiguous()
    chunks = padded // chunk
    bk, bv = _block(dk), _block(dv)
    states = torch.empty(b * h, chunks, dk, dv, dtype=torch.float32, device=q.device)
    final = torch.empty(b, h, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
    # Dot products in float32 at IEEE precision (never TF32) for float32 inputs, and for every dtype under
    # the interpreter, which cannot multiply bfloat16 (a 16 × 16 product came out 2.6e10 wrong); half
    # inputs on a GPU go into the dots as they are, accumulated in float32.
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    _chunk_states[(triton.cdiv(dk, bk), triton.cdiv(dv, bv), b * h)](
        k, v, e, states, s0, final, padded, dk, dv, chunks, C=chunk, BK=bk, BV=bv,
        HAS_S0=initial_state is not None, IEEE=ieee)
    out = torch.empty(b, h, padded, dv, dtype=torch.float32, device=q.device)
    _chunk_outputs[(triton.cdiv(dv, bv), chunks, b * h)](
        q, k, v, e, states, out, padded, dk, dv, chunks, C=chunk, BK=bk, BV=bv, IEEE=ieee)
    return out[:, :, :t], final


@triton.jit
def _chunk_state_grads(q_ptr, do_ptr, e_ptr, dh_ptr, dsn_ptr, ds0_ptr, T, K, V, NC,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DSN: tl.constexpr):
    """Backward through the chunk recurrence, last chunk first: dh[c] = ∂L/∂(state leaving chunk c)."""
    kb, vb, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, C)
    cols_k = kb * BK + tl.arange(0, BK)
    cols_v = vb * BV + tl.arange(0, BV)
    state_mask = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    state_offsets = cols_k[:, None] * V + cols_v[None, :]
    if HAS_DSN:
        grad = tl.load(dsn_ptr + bh * K * V + state_offsets, mask=state_mask, other=0.0)
    else:
        grad = tl.zeros((BK, BV), dtype=tl.float32)
    for i in range(0, NC):
        c = NC - 1 - i
        tl.store(dh_ptr + (bh * NC + c) * K * V + state_offsets, grad, mask=state_mask)
        t = c * C + rows
        queries = tl.load(q_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], mask=cols_k[None, :] < K,
                          other=0.0).to(tl.float32)
        grad_out = tl.load(do_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], mask=cols_v[None, :] < V, other=0.0)
        running = tl.cumsum(tl.load(e_ptr + bh * T + t), 0)
        total = tl.sum(tl.load(e_ptr + bh * T + t), 0)
        queries = queries * tl.exp(running)[:, None]
        grad = grad * tl.exp(total) + tl.dot(tl.trans(queries), grad_out, input_precision="ieee")
    tl.store(ds0_ptr + bh * K * V + state_offsets, grad, mask=state_mask)


@triton.jit
def _chunk_input_grads(q_ptr, k_ptr, v_ptr, e_ptr, h_ptr, dh_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, T, K, V, NC,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dq, dk, dv of one chunk (whole key and value widths in one tile), from the state entering it (h) and
    the gradient of the state leaving it (dh)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, C)
    t = c * C + rows
    cols_k, cols_v = tl.arange(0, BK), tl.arange(0, BV)
    in_k, in_v = cols_k[None, :] < K, cols_v[None, :] < V
    queries = tl.load(q_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0).to(tl.float32)
    keys = tl.load(k_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0).to(tl.float32)
    values = tl.load(v_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], mask=in_v, other=0.0).to(tl.float32)
    grad_out = tl.load(do_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], mask=in_v, other=0.0)
    state_offsets = cols_k[:, None] * V + cols_v[None, :]
    state_mask = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    state = tl.load(h_ptr + (bh * NC + c) * K * V + state_offsets, mask=state_mask, other=0.0)
    grad_state = tl.load(dh_ptr + (bh * NC + c) * K * V + state_offsets, mask=state_mask, other=0.0)
    e = tl.load(e_ptr + bh * T + t)
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
    tl.store(dq_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], grad_q, mask=in_k)
    tl.store(dk_ptr + (bh * T + t[:, None]) * K + cols_k[None, :], grad_k, mask=in_k)
    tl.store(dv_ptr + (bh * T + t[:, None]) * V + cols_v[None, :], grad_v, mask=in_v)


def chunk_retention_backward(q: Tensor, k: Tensor, v: Tensor, log_step_decay: Tensor, chunk_size: int,
                             initial_state: Tensor | None, grad_out: Tensor, grad_final: Tensor | None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`chunk_retention_forward`'s outputs (o and the final state) with respect to q, k,
    v, the initial state, and P (B, H, T), the running sum of log decays (∂L/∂P_n = q_n·dq_n − k_n·dk_n,
    plus ⟨dS_T, S_T⟩ at the last step; the caller turns it into ∂L/∂log γ). All float32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    chunk = max(16, triton.next_power_of_2(chunk_size))
    padded = -(-t // chunk) * chunk
    pad = padded - t
    grad_out = grad_out.to(torch.float32)
    if pad:
        q, k, v, grad_out = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, grad_out))
        log_step_decay = F.pad(log_step_decay, (0, pad))
    q, k, v, grad_out = (x.contiguous() for x in (q, k, v, grad_out))
    e = log_step_decay.to(torch.float32).expand(b, h, padded).contiguous()
    chunks = padded // chunk
    bk, bv = _block(dk), _block(dv)
    states = torch.empty(b * h, chunks, dk, dv, dtype=torch.float32, device=q.device)
    final = torch.empty(b, h, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
    _chunk_states[(triton.cdiv(dk, bk), triton.cdiv(dv, bv), b * h)](
        k, v, e, states, s0, final, padded, dk, dv, chunks, C=chunk, BK=bk, BV=bv,
        HAS_S0=initial_state is not None, IEEE=True)
    grad_states = torch.empty_like(states)
    grad_initial = torch.empty(b, h, dk, dv, dtype=torch.float32, device=q.device)
    dsn = grad_final.to(torch.float32).contiguous() if grad_final is not None else grad_initial
    _chunk_state_grads[(triton.cdiv(dk, bk), triton.cdiv(dv, bv), b * h)](
        q, grad_out, e, grad_states, dsn, grad_initial, padded, dk, dv, chunks, C=chunk, BK=bk, BV=bv,
        HAS_DSN=grad_final is not None)
    grads = [torch.empty(b, h, padded, width, dtype=torch.float32, device=q.device) for width in (dk, dk, dv)]
    _chunk_input_grads[(chunks, b * h)](
        q, k, v, e, states, grad_states, grad_out, *grads, padded, dk, dv, chunks, C=chunk,
        BK=triton.next_power_of_2(max(dk, 16)), BV=triton.next_power_of_2(max(dv, 16)))
    dq, dk_, dv_ = (g[:, :, :t] for g in grads)
    grad_positions = (q[:, :, :t].float() * dq).sum(-1) - (k[:, :, :t].float() * dk_).sum(-1)
    if grad_final is not None:
        grad_positions[:, :, -1] += (grad_final.float() * final).sum((-1, -2))
    return dq, dk_, dv_, grad_initial, grad_positions
