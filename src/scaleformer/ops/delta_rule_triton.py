"""The chunkwise delta rule as Triton kernels, forward and backward, behind
:func:`scaleformer.ops.delta_rule.delta_rule` (``backend="triton"``).

Status (issue 34, in progress): verified on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)
against the float64 PyTorch forms, outputs, states and every gradient; not yet run or timed on a GPU.

One program walks the chunks of one (sequence, head) in order — a sequence is a batch row or one document
of a packed row (:func:`~scaleformer.ops.retention_triton.chunk_table`, shared with retention's kernels),
so documents are read in place and a state never crosses a boundary. Per chunk of C steps (the WY/UT form
of ``ops/delta_rule.py``; G the chunk's running sum of log decays, Γ_ij = exp(G_i − G_j) for i ≥ j)::

    A = strictly-lower(diag(β) K Kᵀ ⊙ Γ),   M = (I + A)⁻¹   (forward substitution, one row per step)
    U = M (β ⊙ V),   W = M (β e^G ⊙ K),   Ũ = U − W S
    O = (Q ⊙ e^G) S + (lower(Q Kᵀ) ⊙ Γ) Ũ,   S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ Ũ

Backward: one program per (sequence, head) walks the chunks forward again, storing the state entering each
(float32), then walks them last to first carrying dS = ∂L/∂(state leaving the chunk), recomputing the
chunk's M, U, W and Ũ, and differentiating each line above in reverse: through the solve by
dA = −Mᵀ dM Mᵀ on the strictly lower part, through Γ by ∂L/∂G_i = Σ_j ∂L/∂Γ_ij Γ_ij − Σ_j ∂L/∂Γ_ji Γ_ji,
and to the steps' log decays by a reverse running sum within the chunk (G_C's share enters at its last row).

Steps past a chunk's end read as k = v = 0, β = 0, g = 0: no write, no decay. The whole key and value
width of a head is one tile (BK × BV in registers), and every product is float32 at IEEE precision: the
solve is the numerically delicate part (PAPERS.md Part 3), so it does not run in TF32 or half precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from scaleformer.ops.retention_triton import Chunks, state_tile

__all__ = ["chunk_delta_rule_forward", "chunk_delta_rule_backward"]


@triton.jit
def _delta_rule_chunk_terms(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, first, rows, real, cols_k, cols_v, K, V,
                            C: tl.constexpr):
    """One chunk's inputs and the terms that do not depend on the state: q, k, v, β, G (running sums of g),
    G_C, Γ (0 above the diagonal), M = (I + A)⁻¹, U = M (β ⊙ V) and W = M (β e^G ⊙ K)."""
    in_k = real[:, None] & (cols_k[None, :] < K)
    in_v = real[:, None] & (cols_v[None, :] < V)
    queries = tl.load(q_ptr + (first + rows[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0)
    keys = tl.load(k_ptr + (first + rows[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0)
    values = tl.load(v_ptr + (first + rows[:, None]) * V + cols_v[None, :], mask=in_v, other=0.0)
    beta = tl.load(beta_ptr + first + rows, mask=real, other=0.0)
    running = tl.cumsum(tl.load(g_ptr + first + rows, mask=real, other=0.0), 0)
    total = tl.sum(tl.where(rows == C - 1, running, 0.0), 0)
    lower = rows[:, None] >= rows[None, :]
    decay = tl.exp(tl.where(lower, running[:, None] - running[None, :], float("-inf")))
    gram = tl.dot(keys, tl.trans(keys), input_precision="ieee")
    a = tl.where(rows[:, None] > rows[None, :], beta[:, None] * gram * decay, 0.0)
    inverse = tl.zeros((C, C), dtype=tl.float32)
    for i in range(C):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), 0)
        m_i = tl.where(rows == i, 1.0, 0.0) - tl.sum(a_i[:, None] * inverse, 0)
        inverse = tl.where(rows[:, None] == i, m_i[None, :], inverse)
    u = tl.dot(inverse, beta[:, None] * values, input_precision="ieee")
    w = tl.dot(inverse, (beta * tl.exp(running))[:, None] * keys, input_precision="ieee")
    return queries, keys, values, beta, running, total, decay, gram, inverse, u, w


@triton.jit
def _delta_rule_chunks(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, o_ptr, s0_ptr, sn_ptr, batch_ptr, start_ptr, length_ptr,
                       seq_ptr, H, T, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_S0: tl.constexpr):
    """Walk the chunks of one (sequence, head) in order: outputs, and the state leaving the last chunk."""
    sh = tl.program_id(0)
    seq, h = sh // H, sh % H
    cols_k, cols_v, rows = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, C)
    state_offsets, state_mask, state = state_tile(s0_ptr, sh, cols_k, cols_v, K, V, HAS_S0)
    lower = rows[:, None] >= rows[None, :]
    for c in range(tl.load(seq_ptr + seq), tl.load(seq_ptr + seq + 1)):
        first = (tl.load(batch_ptr + c) * H + h).to(tl.int64) * T + tl.load(start_ptr + c)
        real = rows < tl.load(length_ptr + c)
        (queries, keys, values, beta, running, total, decay, gram, inverse, u,
         w) = _delta_rule_chunk_terms(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, first, rows, real, cols_k, cols_v, K, V, C)
        corrected = u - tl.dot(w, state, input_precision="ieee")  # Ũ
        scores = tl.where(lower, tl.dot(queries, tl.trans(keys), input_precision="ieee") * decay, 0.0)
        out = (tl.dot(queries * tl.exp(running)[:, None], state, input_precision="ieee")
               + tl.dot(scores, corrected, input_precision="ieee"))
        tl.store(o_ptr + (first + rows[:, None]) * V + cols_v[None, :], out, mask=real[:, None] & (cols_v[None, :] < V))
        to_end = keys * tl.exp(total - running)[:, None]
        state = state * tl.exp(total) + tl.dot(tl.trans(to_end), corrected, input_precision="ieee")
    tl.store(sn_ptr + sh * K * V + state_offsets, state, mask=state_mask)


def chunk_delta_rule_forward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, chunks: Chunks,
                             initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """q (already scaled), k (B, H, T, K), v (B, H, T, V), beta and g (B, H, T) with padding already a no-op
    step (β = 0, g = 0); every input is read as float32. Returns o (B, H, T, V) float32 (zeros at steps
    outside every document) and each sequence's final state (S, H, K, V) float32 (S = B, or the documents)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    q, k, v, beta, g = (x.to(torch.float32).contiguous() for x in (q, k, v, beta, g))
    final = torch.empty(chunks.sequences, h, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else final
    out = torch.zeros(b, h, t, dv, dtype=torch.float32, device=q.device)
    block = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731 - tl.dot's tiles: powers of two, >= 16
    _delta_rule_chunks[(chunks.sequences * h,)](
        q, k, v, beta, g, out, s0, final, *chunks.args(), chunks.first, h, t, dk, dv, C=chunks.size, BK=block(dk),
        BV=block(dv), HAS_S0=initial_state is not None)
    return out, final


@triton.jit
def _delta_rule_chunks_backward(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, s0_ptr, do_ptr, dsn_ptr, states_ptr,
                                dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, ds0_ptr, batch_ptr, start_ptr, length_ptr,
                                seq_ptr, H, T, K, V, NC, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                                HAS_S0: tl.constexpr, HAS_DSN: tl.constexpr):
    """One (sequence, head): the states entering each chunk again (forward walk, stored), then the chunks
    last to first, carrying dS = ∂L/∂(state leaving the chunk) back through each."""
    sh = tl.program_id(0)
    seq, h = sh // H, sh % H
    cols_k, cols_v, rows = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, C)
    state_offsets, state_mask, state = state_tile(s0_ptr, sh, cols_k, cols_v, K, V, HAS_S0)
    first_chunk, end_chunk = tl.load(seq_ptr + seq), tl.load(seq_ptr + seq + 1)
    for c in range(first_chunk, end_chunk):
        tl.store(states_ptr + (h * NC + c).to(tl.int64) * K * V + state_offsets, state, mask=state_mask)
        first = (tl.load(batch_ptr + c) * H + h).to(tl.int64) * T + tl.load(start_ptr + c)
        real = rows < tl.load(length_ptr + c)
        (queries, keys, values, beta, running, total, decay, gram, inverse, u,
         w) = _delta_rule_chunk_terms(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, first, rows, real, cols_k, cols_v, K, V, C)
        corrected = u - tl.dot(w, state, input_precision="ieee")
        to_end = keys * tl.exp(total - running)[:, None]
        state = state * tl.exp(total) + tl.dot(tl.trans(to_end), corrected, input_precision="ieee")
    _, _, grad_state = state_tile(dsn_ptr, sh, cols_k, cols_v, K, V, HAS_DSN)
    lower = rows[:, None] >= rows[None, :]
    strictly = rows[:, None] > rows[None, :]
    for i in range(0, end_chunk - first_chunk):
        c = end_chunk - 1 - i
        state = tl.load(states_ptr + (h * NC + c).to(tl.int64) * K * V + state_offsets, mask=state_mask, other=0.0)
        first = (tl.load(batch_ptr + c) * H + h).to(tl.int64) * T + tl.load(start_ptr + c)
        real = rows < tl.load(length_ptr + c)
        in_k = real[:, None] & (cols_k[None, :] < K)
        in_v = real[:, None] & (cols_v[None, :] < V)
        (queries, keys, values, beta, running, total, decay, gram, inverse, u,
         w) = _delta_rule_chunk_terms(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, first, rows, real, cols_k, cols_v, K, V, C)
        growth, shrink = tl.exp(running), tl.exp(total - running)  # e^G, e^{G_C − G}
        corrected = u - tl.dot(w, state, input_precision="ieee")  # Ũ
        scores = tl.where(lower, tl.dot(queries, tl.trans(keys), input_precision="ieee"), 0.0)  # L ⊙ Q Kᵀ
        grad_out = tl.load(do_ptr + (first + rows[:, None]) * V + cols_v[None, :], mask=in_v, other=0.0)
        # O = (Q ⊙ e^G) S + (scores ⊙ Γ) Ũ and S' = e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ Ũ
        grad_corrected = (tl.dot(tl.trans(scores * decay), grad_out, input_precision="ieee")
                          + tl.dot(keys * shrink[:, None], grad_state, input_precision="ieee"))
        out_state = tl.dot(grad_out, tl.trans(state), input_precision="ieee")  # dO Sᵀ (C × K)
        grad_q = out_state * growth[:, None]
        grad_g = tl.sum(queries * out_state, 1) * growth  # ∂L/∂G, term by term below
        grad_scores = tl.where(lower, tl.dot(grad_out, tl.trans(corrected), input_precision="ieee"), 0.0)
        grad_decay = grad_scores * scores  # ∂L/∂Γ through the scores
        grad_q += tl.dot(grad_scores * decay, keys, input_precision="ieee")
        grad_k = tl.dot(tl.trans(grad_scores * decay), queries, input_precision="ieee")
        grad_to_end = tl.dot(corrected, tl.trans(grad_state), input_precision="ieee")  # ∂L/∂(K ⊙ e^{G_C−G})
        grad_k += grad_to_end * shrink[:, None]
        end_terms = tl.sum(grad_to_end * keys, 1) * shrink
        grad_total = tl.sum(end_terms, 0) + tl.sum(tl.sum(grad_state * state, 1), 0) * tl.exp(total)
        grad_g -= end_terms
        next_grad_state = (tl.dot(tl.trans(queries * growth[:, None]), grad_out, input_precision="ieee")
                           + grad_state * tl.exp(total))
        # Ũ = U − W S: U = M (β ⊙ V), W = M (β e^G ⊙ K)
        next_grad_state -= tl.dot(tl.trans(w), grad_corrected, input_precision="ieee")
        grad_w = -tl.dot(grad_corrected, tl.trans(state), input_precision="ieee")  # C × K
        weighted_keys = (beta * growth)[:, None] * keys
        grad_inverse = (tl.dot(grad_corrected, tl.trans(beta[:, None] * values), input_precision="ieee")
                        + tl.dot(grad_w, tl.trans(weighted_keys), input_precision="ieee"))
        back_u = tl.dot(tl.trans(inverse), grad_corrected, input_precision="ieee")  # ∂L/∂(β ⊙ V)
        back_w = tl.dot(tl.trans(inverse), grad_w, input_precision="ieee")  # ∂L/∂(β e^G ⊙ K)
        grad_v = back_u * beta[:, None]
        grad_beta = tl.sum(back_u * values, 1) + tl.sum(back_w * keys, 1) * growth
        grad_k += back_w * (beta * growth)[:, None]
        grad_g += tl.sum(back_w * keys, 1) * beta * growth
        # M = (I + A)⁻¹: dA = −Mᵀ dM Mᵀ, on the strictly lower part where A = β_i (K Kᵀ)_ij Γ_ij lives
        grad_a = -tl.dot(tl.dot(tl.trans(inverse), grad_inverse, input_precision="ieee"), tl.trans(inverse),
                         input_precision="ieee")
        grad_a = tl.where(strictly, grad_a, 0.0)
        grad_beta += tl.sum(grad_a * gram * decay, 1)
        grad_gram = grad_a * beta[:, None] * decay
        grad_k += tl.dot(grad_gram + tl.trans(grad_gram), keys, input_precision="ieee")
        grad_decay += grad_a * beta[:, None] * gram
        # Γ_ij = exp(G_i − G_j) below the diagonal
        flow = tl.where(lower, grad_decay * decay, 0.0)
        grad_g += tl.sum(flow, 1) - tl.sum(flow, 0)
        grad_g += tl.where(rows == C - 1, grad_total, 0.0)  # G_C is the last running sum
        # G = cumsum(g): ∂L/∂g_i = Σ_{j ≥ i} ∂L/∂G_j
        grad_step = tl.sum(grad_g, 0) - tl.cumsum(grad_g, 0) + grad_g
        tl.store(dq_ptr + (first + rows[:, None]) * K + cols_k[None, :], grad_q, mask=in_k)
        tl.store(dk_ptr + (first + rows[:, None]) * K + cols_k[None, :], grad_k, mask=in_k)
        tl.store(dv_ptr + (first + rows[:, None]) * V + cols_v[None, :], grad_v, mask=in_v)
        tl.store(dbeta_ptr + first + rows, grad_beta, mask=real)
        tl.store(dg_ptr + first + rows, grad_step, mask=real)
        grad_state = next_grad_state
    if HAS_S0:
        tl.store(ds0_ptr + sh * K * V + state_offsets, grad_state, mask=state_mask)


def chunk_delta_rule_backward(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, chunks: Chunks,
                              initial_state: Tensor | None, grad_out: Tensor,
                              grad_state: Tensor | None) -> tuple[Tensor, ...]:
    """Gradients of :func:`chunk_delta_rule_forward`'s outputs (and final states) with respect to q, k, v,
    β, g and the initial state (None without one), all float32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    q, k, v, beta, g, grad_out = (x.to(torch.float32).contiguous() for x in (q, k, v, beta, g, grad_out))
    states = torch.empty(h, max(1, chunks.count), dk, dv, dtype=torch.float32, device=q.device)
    grads = [torch.zeros_like(x) for x in (q, k, v, beta, g)]  # zeros: steps outside every document
    d_initial = torch.empty(chunks.sequences, h, dk, dv, dtype=torch.float32, device=q.device)
    s0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else d_initial
    dsn = grad_state.to(torch.float32).contiguous() if grad_state is not None else d_initial
    block = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
    _delta_rule_chunks_backward[(chunks.sequences * h,)](
        q, k, v, beta, g, s0, grad_out, dsn, states, *grads, d_initial, *chunks.args(), chunks.first, h, t, dk, dv,
        chunks.count, C=chunks.size, BK=block(dk), BV=block(dv), HAS_S0=initial_state is not None,
        HAS_DSN=grad_state is not None)
    return (*grads, d_initial if initial_state is not None else None)
