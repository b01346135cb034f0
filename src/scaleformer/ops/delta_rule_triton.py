"""The chunkwise delta rule as a Triton kernel, behind :func:`scaleformer.ops.delta_rule.delta_rule`
(``backend="triton"``).

Status (issue 34, in progress): the forward pass is a Triton kernel, verified on the CPU under Triton's
interpreter (``TRITON_INTERPRET=1``) against the float64 PyTorch forms; not yet run or timed on a GPU.
The backward pass is not a kernel yet: it recomputes the PyTorch chunkwise form and differentiates it
(exact gradients, PyTorch's speed and memory).

One program walks the chunks of one (sequence, head) in order — a sequence is a batch row or one document
of a packed row (:func:`~scaleformer.ops.retention_triton.chunk_table`, shared with retention's kernels),
so documents are read in place and a state never crosses a boundary. Per chunk of C steps (the WY/UT form
of ``ops/delta_rule.py``; G the chunk's running sum of log decays, Γ_ij = exp(G_i − G_j) for i ≥ j)::

    A = strictly-lower(diag(β) K Kᵀ ⊙ Γ),   M = (I + A)⁻¹   (forward substitution, one row per step)
    U = M (β ⊙ V),   W = M (β e^G ⊙ K),   Ũ = U − W S
    O = (Q ⊙ e^G) S + (lower(Q Kᵀ) ⊙ Γ) Ũ,   S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ Ũ

Steps past a chunk's end read as k = v = 0, β = 0, g = 0: no write, no decay. The whole key and value
width of a head is one tile (BK × BV in registers), and every product is float32 at IEEE precision: the
solve is the numerically delicate part (PAPERS.md Part 3), so it does not run in TF32 or half precision.
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from scaleformer.ops.retention_triton import Chunks

__all__ = ["chunk_delta_rule_forward"]


@triton.jit
def _delta_rule_chunks(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, o_ptr, s0_ptr, sn_ptr, batch_ptr, start_ptr, length_ptr,
                       seq_ptr, H, T, K, V, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_S0: tl.constexpr):
    """Walk the chunks of one (sequence, head) in order: outputs, and the state leaving the last chunk."""
    sh = tl.program_id(0)
    seq, h = sh // H, sh % H
    cols_k, cols_v, rows = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, C)
    state_mask = (cols_k[:, None] < K) & (cols_v[None, :] < V)
    state_offsets = cols_k[:, None] * V + cols_v[None, :]
    if HAS_S0:
        state = tl.load(s0_ptr + sh * K * V + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BK, BV), dtype=tl.float32)
    lower = rows[:, None] >= rows[None, :]
    strictly = rows[:, None] > rows[None, :]
    for c in range(tl.load(seq_ptr + seq), tl.load(seq_ptr + seq + 1)):
        b = tl.load(batch_ptr + c)
        first = (b * H + h).to(tl.int64) * T + tl.load(start_ptr + c)
        real = rows < tl.load(length_ptr + c)
        in_k = real[:, None] & (cols_k[None, :] < K)
        in_v = real[:, None] & (cols_v[None, :] < V)
        queries = tl.load(q_ptr + (first + rows[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0)
        keys = tl.load(k_ptr + (first + rows[:, None]) * K + cols_k[None, :], mask=in_k, other=0.0)
        values = tl.load(v_ptr + (first + rows[:, None]) * V + cols_v[None, :], mask=in_v, other=0.0)
        beta = tl.load(beta_ptr + first + rows, mask=real, other=0.0)
        running = tl.cumsum(tl.load(g_ptr + first + rows, mask=real, other=0.0), 0)  # G
        total = tl.sum(tl.where(rows == C - 1, running, 0.0), 0)  # G_C (steps past the end add 0)
        decay = tl.exp(tl.where(lower, running[:, None] - running[None, :], float("-inf")))  # Γ, 0 above
        gram = tl.dot(keys, tl.trans(keys), input_precision="ieee")
        a = tl.where(strictly, beta[:, None] * gram * decay, 0.0)
        # M = (I + A)⁻¹, row by row: M_i = e_i − Σ_{j<i} A_ij M_j (rows i and after are still 0)
        inverse = tl.zeros((C, C), dtype=tl.float32)
        for i in range(C):
            a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.0), 0)  # row i of A, over j
            m_i = tl.where(rows == i, 1.0, 0.0) - tl.sum(a_i[:, None] * inverse, 0)
            inverse = tl.where(rows[:, None] == i, m_i[None, :], inverse)
        u = tl.dot(inverse, beta[:, None] * values, input_precision="ieee")
        w = tl.dot(inverse, (beta * tl.exp(running))[:, None] * keys, input_precision="ieee")
        corrected = u - tl.dot(w, state, input_precision="ieee")  # Ũ
        scores = tl.where(lower, tl.dot(queries, tl.trans(keys), input_precision="ieee") * decay, 0.0)
        out = (tl.dot(queries * tl.exp(running)[:, None], state, input_precision="ieee")
               + tl.dot(scores, corrected, input_precision="ieee"))
        tl.store(o_ptr + (first + rows[:, None]) * V + cols_v[None, :], out, mask=in_v)
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
