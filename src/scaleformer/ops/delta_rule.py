"""The delta rule (DeltaNet, arXiv 2406.06484) and its gated form (Gated DeltaNet, arXiv 2412.06464): one
contract, two forms.

Shapes: B batch, H heads, T length, K key dim, V value dim, C chunk length, N = ceil(T / C) chunks.

Contract of :func:`delta_rule` (both forms)::

    q, k (B, H, T, K), v (B, H, T, V), beta (B, H, T) in [0, 1] (the write strength β_t)
    log_decay (B, H, T) = g_t ≤ 0 or None: Gated DeltaNet's per-token decay α_t = exp(g_t); None = DeltaNet
    scale: s multiplying the queries (default K^-1/2)
    mask (B, T) bool or None: False marks padding. A padding step neither decays the state nor writes to
        it, and its output is 0, so padding anywhere is invisible to real tokens.
    initial_state (B, H, K, V) or None (zeros): the state h in "fla layout" (o_t = h_tᵀ q_t)
    offsets (N+1,) int or None: packed documents, cu_seqlens-style, over a batch of one row: document n is
        steps offsets[n] .. offsets[n+1]−1, each with a state of its own, so initial and final states are
        (N, H, K, V)
    -> o (B, H, T, V) in v's dtype, final_state (B, H, K, V) if output_final_state else None; the state
       and every sum are kept in float32 for bf16/fp16 inputs (float64 stays float64)

    h_t = α_t (I − β_t k_t k_tᵀ) h_{t−1} + β_t k_t v_tᵀ,    o_t = h_tᵀ (s q_t)

that is, step by step: h ← α_t h; ṽ_t = β_t (v_t − hᵀ k_t); h ← h + k_t ṽ_tᵀ; o_t = hᵀ (s q_t).

Forms:
    recurrent: one step at a time — O(1) state, the decoding form.
    chunkwise: the WY/UT form (PAPERS.md Part 3 §1–2). Within a chunk the C writes are one triangular
        solve: with G the chunk's running sum of g, Γ_ij = exp(G_i − G_j) (i ≥ j, masked before exp),
        A = strictly-lower(diag(β) K Kᵀ ⊙ Γ) and T = (I + A)⁻¹ diag(β), the pseudo-values are
        U = T V and W = T (e^G ⊙ K), independent of the incoming state; then per chunk
        Ũ = U − W h,  O = (sQ ⊙ e^G) h + (lower(sQ Kᵀ) ⊙ Γ) Ũ,  h ← e^{G_C} h + (K ⊙ e^{G_C − G})ᵀ Ũ.
        No Python loop over tokens: one solve per chunk for all chunks at once, a loop over chunks.
        A tail shorter than C is padded with β = 0 and g = 0, which is exactly a no-op.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from scaleformer.ops.retention import check_offsets, offset_rows

__all__ = ["delta_rule", "DeltaForm", "Backend"]

DeltaForm = Literal["chunkwise", "recurrent"]
Backend = Literal["torch", "triton"]


def delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, log_decay: Tensor | None = None,
               form: DeltaForm = "chunkwise", chunk_size: int = 64, scale: float | None = None,
               mask: Tensor | None = None, initial_state: Tensor | None = None,
               output_final_state: bool = False, offsets: Tensor | None = None,
               backend: Backend = "torch", sequence_group: Any = None) -> tuple[Tensor, Tensor | None]:
    """The delta rule in ``form``; see the module docstring for the contract. ``backend="triton"`` runs the
    chunkwise form, forward and backward, as Triton kernels (:mod:`scaleformer.ops.delta_rule_triton`;
    float32, bfloat16 or float16 inputs; on the CPU only under ``TRITON_INTERPRET=1``).
    ``sequence_group``: these are this rank's positions of a sequence split across the group (context
    parallelism, :mod:`scaleformer.parallel.context`: the chunk's K × K transition crosses ranks)."""
    if sequence_group is not None:
        from scaleformer.parallel.context import split_recurrence

        if initial_state is not None or output_final_state or offsets is not None:
            raise ValueError("the context-parallel delta rule starts every sequence empty: no initial or final "
                             "state (no cache) and no packed offsets")
        return split_recurrence(delta_rule, q, k, v, group=sequence_group, log_decay_total=None, beta=beta,
                                log_decay=log_decay, form=form, chunk_size=chunk_size, scale=scale, mask=mask,
                                backend=backend), None
    if backend == "triton":
        return _triton_delta_rule(q, k, v, beta, log_decay, form, chunk_size, scale, mask, initial_state,
                                  output_final_state, offsets)
    if backend != "torch":
        raise ValueError(f"delta_rule: backend must be 'torch' or 'triton', got {backend!r}")
    if offsets is not None:
        return _documents_as_rows(q, k, v, beta, log_decay, offsets, mask, initial_state, output_final_state,
                                  form=form, chunk_size=chunk_size, scale=scale)
    _check(q, k, v, beta, log_decay, mask, chunk_size)
    b, h, t, dk = q.shape
    out_dtype, work = v.dtype, torch.promote_types(q.dtype, torch.float32)  # sums and the state in float32 at least
    s = dk ** -0.5 if scale is None else scale
    q, k, v, beta = (x.to(work) for x in (q, k, v, beta))
    g = torch.zeros_like(beta) if log_decay is None else log_decay.to(work)
    if mask is not None:  # a padding step: β = 0 (no write) and g = 0 (no decay)
        real = mask[:, None, :].to(work)
        beta, g = beta * real, g * real
    state = (torch.zeros(b, h, dk, v.shape[-1], dtype=work, device=q.device) if initial_state is None
             else initial_state.to(work))
    if form == "recurrent":
        out, state = _recurrent(q * s, k, v, beta, g, state)
    elif form == "chunkwise":
        out, state = _chunkwise(q * s, k, v, beta, g, state, chunk_size)
    else:
        raise ValueError(f"delta_rule: unknown form {form!r}; expected 'chunkwise' or 'recurrent'")
    if mask is not None:
        out = out * mask[:, None, :, None].to(work)
    return out.to(out_dtype), (state if output_final_state else None)


def _check(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None, mask: Tensor | None,
           chunk_size: int) -> None:
    b, h, t, _ = q.shape
    if k.shape != q.shape or v.shape[:3] != (b, h, t) or beta.shape != (b, h, t):
        raise ValueError(f"delta_rule: q, k (B, H, T, K), v (B, H, T, V) and beta (B, H, T) must agree, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}")
    if log_decay is not None and log_decay.shape != (b, h, t):
        raise ValueError(f"delta_rule: log_decay must be (B, H, T) = {(b, h, t)}, got {tuple(log_decay.shape)}")
    if mask is not None and mask.shape != (b, t):
        raise ValueError(f"delta_rule: mask must be (B, T) = {(b, t)}, got {tuple(mask.shape)}")
    if chunk_size < 1:
        raise ValueError(f"delta_rule: chunk_size must be >= 1, got {chunk_size}")


def _triton_delta_rule(q, k, v, beta, log_decay, form, chunk_size, scale, mask, initial_state, output_final_state,
                       offsets):
    if form != "chunkwise":
        raise ValueError(f"delta_rule: backend='triton' computes the chunkwise form, not {form!r}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"delta_rule: backend='triton' takes float32, bfloat16 or float16 q, k, v of one dtype, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q, k, v, beta, log_decay, mask, chunk_size)
    if offsets is not None:
        check_offsets(offsets, q, v, initial_state)
    from scaleformer.ops.retention_triton import chunk_table  # triton is an optional install

    s = q.shape[-1] ** -0.5 if scale is None else scale
    beta = beta.float()
    g = torch.zeros_like(beta) if log_decay is None else log_decay.float()
    if mask is not None:  # a padding step: β = 0 (no write) and g = 0 (no decay)
        beta, g = beta * mask[:, None, :], g * mask[:, None, :]
    chunks = chunk_table(q.shape[0], q.shape[2], chunk_size, offsets, q.device)
    out, state = _TritonDeltaRule.apply(q.float() * s, k.float(), v.float(), beta, g,
                                        None if initial_state is None else initial_state.float(), chunks)
    if mask is not None:
        out = out * mask[:, None, :, None]
    return out.to(v.dtype), (state if output_final_state else None)


class _TritonDeltaRule(torch.autograd.Function):
    """Forward and backward as Triton kernels (:mod:`scaleformer.ops.delta_rule_triton`), on inputs already
    scaled and masked (so autograd carries the gradients on to the caller's q, β, decays and mask)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, chunks):
        from scaleformer.ops.delta_rule_triton import chunk_delta_rule_forward

        ctx.save_for_backward(q, k, v, beta, g, initial_state)
        ctx.chunks = chunks
        return chunk_delta_rule_forward(q, k, v, beta, g, chunks, initial_state)

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        from scaleformer.ops.delta_rule_triton import chunk_delta_rule_backward

        q, k, v, beta, g, initial_state = ctx.saved_tensors
        return (*chunk_delta_rule_backward(q, k, v, beta, g, ctx.chunks, initial_state, grad_out, grad_state),
                None)


def _documents_as_rows(q, k, v, beta, log_decay, offsets, mask, initial_state, output_final_state, **options):
    """Packed documents: each gathered into a right-padded row of its own (padding is a no-op step)."""
    check_offsets(offsets, q, v, initial_state)
    index, valid = offset_rows(offsets, q.shape[2], q.device)

    def rows(x: Tensor) -> Tensor:  # (1, H, T, ...) -> (N, H, L, ...)
        return x[0][:, index].transpose(0, 1)

    row_mask = valid if mask is None else valid & mask[0][index]
    out, state = delta_rule(rows(q), rows(k), rows(v), rows(beta), mask=row_mask, initial_state=initial_state,
                            log_decay=None if log_decay is None else rows(log_decay),
                            output_final_state=output_final_state, **options)
    packed = out.new_zeros(v.shape[1], v.shape[2], v.shape[3])  # (H, T, V)
    packed[:, index[valid]] = out.transpose(0, 1)[:, valid]
    return packed[None], state


def _recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    outputs = []  # per-step views by unbind (indexing in the loop would make the backward quadratic in T)
    for q_t, k_t, v_t, beta_t, g_t in zip(*(x.unbind(2) for x in (q, k, v, beta, g))):
        state = state * g_t[:, :, None, None].exp()
        written = beta_t[:, :, None] * (v_t - torch.einsum("bhkv,bhk->bhv", state, k_t))
        state = state + k_t[:, :, :, None] * written[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
    return torch.stack(outputs, 2), state


def _chunkwise(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, state: Tensor,
               chunk: int) -> tuple[Tensor, Tensor]:
    b, h, t, _ = q.shape
    pad = (-t) % chunk
    if pad:  # β = 0 and g = 0 on the padded tail: no write, no decay, outputs dropped
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, g = (torch.nn.functional.pad(x, (0, pad)) for x in (beta, g))
    n = (t + pad) // chunk
    q, k, v = (x.unflatten(2, (n, chunk)) for x in (q, k, v))  # (B, H, N, C, ·)
    beta, g = beta.unflatten(2, (n, chunk)), g.unflatten(2, (n, chunk))  # (B, H, N, C)
    cumulative = g.cumsum(-1)  # G: the decay from the chunk's start through each step
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gaps = cumulative[..., :, None] - cumulative[..., None, :]  # G_i − G_j
    decay = torch.exp(gaps.masked_fill(~lower, float("-inf")))  # Γ, zero above the diagonal before any exp
    strictly = lower.logical_not().T  # i > j
    a = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strictly, 0.0)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    transform = torch.linalg.solve_triangular(eye + a, torch.diag_embed(beta), upper=False, unitriangular=True)
    growth = cumulative.exp()[..., None]  # e^G (B, H, N, C, 1)
    w, u = transform @ (k * growth), transform @ v
    scores = (q @ k.transpose(-1, -2)) * decay  # lower(sQ Kᵀ) ⊙ Γ (Γ is zero above the diagonal)
    to_end = (cumulative[..., -1:] - cumulative).exp()[..., None]  # e^{G_C − G}
    # Per-chunk views by unbind, not by indexing in the loop: the backward of x[:, :, i] writes a gradient
    # the size of all of x for every chunk (quadratic in T), unbind's stacks the chunks' gradients once.
    chunks = zip(*(x.unbind(2) for x in (u, w, q * growth, scores, (k * to_end).transpose(-1, -2),
                                         cumulative[..., -1].exp()[..., None, None])))
    outputs = []
    for u_n, w_n, q_n, scores_n, keys_n, decay_n in chunks:
        corrected = u_n - w_n @ state
        outputs.append(q_n @ state + scores_n @ corrected)
        state = state * decay_n + keys_n @ corrected
    return torch.stack(outputs, 2).flatten(2, 3)[:, :, :t], state
