"""Retention (RetNet, arXiv 2307.08621): one contract, three forms, and a reference.

Shapes: B batch, H heads, T length, K key dim, V value dim, C chunk length, N = ceil(T / C) chunks.

Contract of :func:`retention` (every form) and :func:`retention_reference`::

    q, k (B, H, T, K), v (B, H, T, V)
    log_decay: (H,) = log γ_h (< 0), one decay per head (RetNet); or (B, H, T) = log γ_{h,t} (<= 0), a decay
        per head and token (gated retention, RetNet-3/YOCO: computed from the input by the layer)
    mask (B, T) bool or None: False marks padding. A padding step neither decays the state nor adds to
        it, and its output is 0 — so padding anywhere (left, right, inside) is invisible to real tokens.
    initial_state (B, H, K, V) or None (zeros)
    -> o (B, H, T, V) in v's dtype, final_state (B, H, K, V) if output_final_state else None; states are
       float32 for bf16/fp16 inputs (summed in fp32), else the input dtype
    offsets (N+1,) int or None: packed documents, cu_seqlens-style, over a batch of one row: document n is
        steps offsets[n] .. offsets[n+1]−1 (0 = offsets[0] ≤ … ≤ offsets[N] = T), each with a state of its
        own, so initial and final states are (N, H, K, V)

    S_t = γ_t^{m_t} S_{t-1} + m_t k_tᵀ v_t,   o_t = m_t q_t S_t        (m_t = mask, 1 when None)

No normalization happens here: the op is exact linear retention, so any normalization a layer builds on
its outputs is computed identically by every form (see MultiScaleRetention).

Every form needs the decay between two steps, γ over the real steps in (m, n]. Internally that is
``rate_h × (P_n − P_m)`` with a position P (b, 1 or H, T) and its per-step increments E: for a per-head
decay, rate = log γ and P counts real steps, so exponents are log γ × an integer count, never a difference
of two large cumulative sums, and fp32 keeps full relative precision for neighbouring tokens at any
length; for a per-token decay, rate = 1 and P is the running sum of log γ_t, accumulated in float64 (the
parallel form subtracts two such sums) and, in the chunkwise form, restarted in every chunk.

Forms:
    parallel:  o = (q kᵀ ⊙ D) v + (q ⊙ γ^{c_n}) S_0 — O(T²) memory, the paper's training form.
    chunkwise: parallel inside chunks of C steps, a recurrence across chunks — O(T·C) memory.
    recurrent: one step at a time — O(1) state, the decoding form.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["retention", "retention_reference", "decoding_step", "Form", "Backend", "check_offsets", "offset_rows"]

Form = Literal["parallel", "chunkwise", "recurrent"]
Backend = Literal["torch", "triton"]


def _step_counts(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Steps (b, T) float in {0, 1}: 1 for a real token; b = B or 1."""
    if mask is None:
        return torch.ones(1, length, device=device)
    if mask.shape != (batch, length):
        raise ValueError(f"mask must have shape {(batch, length)} (batch, length), got {tuple(mask.shape)}")
    return mask.to(torch.float32)


def _positions(log_decay: Tensor, steps: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(rate (H,), increments E (b, 1 or H, T), positions P = cumsum E) with decay(m → n) = exp(rate·(P_n − P_m))."""
    if log_decay.dim() == 1:  # per head: rate log γ, positions count real steps
        return log_decay.to(dtype), steps[:, None], steps.cumsum(-1)[:, None]
    increments = log_decay.to(torch.float64) * steps[:, None].to(torch.float64)  # padding: no decay
    return (torch.ones(log_decay.shape[1], dtype=dtype, device=log_decay.device), increments.to(dtype),
            increments.cumsum(-1))


def _check(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, H, T, K) and v (B, H, T, V); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if log_decay.shape not in ((q.shape[1],), q.shape[:3]):
        raise ValueError(f"log_decay must have shape (H,) = ({q.shape[1]},) or (B, H, T) = {tuple(q.shape[:3])}, "
                         f"got {tuple(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (*q.shape[:2], q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must have shape (B, H, K, V) = {(*q.shape[:2], q.shape[-1], v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def retention(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor, form: Form = "chunkwise", chunk_size: int = 64,
              mask: Tensor | None = None, initial_state: Tensor | None = None,
              output_final_state: bool = False, backend: Backend = "torch",
              offsets: Tensor | None = None, sequence_group: Any = None) -> tuple[Tensor, Tensor | None]:
    """Retention in the chosen ``form``; all forms compute the same function (see the module docstring).

    ``sequence_group``: these are this rank's positions of a sequence split across the group (context
    parallelism, :mod:`scaleformer.parallel.context`); the outputs are those of the whole sequence's.

    ``backend="triton"`` runs the chunkwise form, forward and backward, as Triton kernels
    (:mod:`scaleformer.ops.retention_triton`; float32, bfloat16 or float16 inputs; on the CPU only under
    ``TRITON_INTERPRET=1``), packed documents (``offsets``) read in place; "torch" (the default) the
    PyTorch forms, which are the reference (packed documents gathered into padded rows)."""
    _check(q, k, v, log_decay, initial_state if offsets is None else None)
    if sequence_group is not None:
        return _context_parallel(q, k, v, log_decay, form, chunk_size, mask, initial_state, output_final_state,
                                 backend, offsets, sequence_group), None
    if offsets is not None:
        check_offsets(offsets, q, v, initial_state)
    if backend == "triton":
        return _triton_retention(q, k, v, log_decay, form, chunk_size, mask, initial_state, output_final_state,
                                 offsets)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    if offsets is not None:
        return _documents_as_rows(q, k, v, log_decay, offsets, mask, initial_state, output_final_state,
                                  form=form, chunk_size=chunk_size)
    if form == "recurrent" and q.shape[2] == 1 and not _wants_grad(q, k, v, log_decay, initial_state):
        o, state = decoding_step(q, k, v, log_decay, mask, initial_state)
        return o, state if output_final_state else None
    steps = _step_counts(mask, q.shape[0], q.shape[2], q.device)
    if mask is not None:  # padding adds nothing to the state
        k = k * steps[:, None, :, None].to(k.dtype)
    rate, increments, positions = _positions(log_decay, steps, torch.promote_types(q.dtype, torch.float32))
    # One decay pattern for every row and chunk: no padding and one decay per head.
    uniform = mask is None and log_decay.dim() == 1
    if form == "parallel":
        o, state = _parallel(q, k, v, rate, positions, initial_state, output_final_state, toeplitz=uniform)
    elif form == "chunkwise":
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        o, state = _chunkwise(q, k, v, rate, increments, chunk_size, initial_state, output_final_state,
                              shared_decay=uniform)
    elif form == "recurrent":
        o, state = _recurrent(q, k, v, rate, increments, initial_state)
        state = state if output_final_state else None
    else:
        raise ValueError(f"form must be 'parallel', 'chunkwise' or 'recurrent', got {form!r}")
    if mask is not None:
        o = o * steps[:, None, :, None].to(o.dtype)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    return o.to(v.dtype), None if state is None else state.to(state_dtype)


def _context_parallel(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, form: Form, chunk_size: int,
                      mask: Tensor | None, initial_state: Tensor | None, output_final_state: bool, backend: Backend,
                      offsets: Tensor | None, group: Any) -> Tensor:
    """Retention of a sequence split across ``group``: each chunk's transition is e^{Σ log γ} per head."""
    from scaleformer.parallel.context import split_recurrence

    if initial_state is not None or output_final_state or offsets is not None:
        raise ValueError("context-parallel retention starts every sequence empty: no initial or final state "
                         "(no cache) and no packed offsets")
    steps = torch.ones(q.shape[0], q.shape[2], dtype=torch.float64, device=q.device) if mask is None else mask.double()
    wide = log_decay.double()
    total = (wide[None, :] * steps.sum(1)[:, None] if wide.dim() == 1
             else (wide * steps[:, None, :]).sum(-1))  # (B, H): padding steps do not decay
    return split_recurrence(retention, q, k, v, group=group, log_decay_total=total, log_decay=log_decay, form=form,
                            chunk_size=chunk_size, mask=mask, backend=backend)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def decoding_step(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, mask: Tensor | None,
                   initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """One recurrent step without gradients (a decoding step): S ← γ S + kᵀv, o = q S, in the state's dtype.
    The same arithmetic as the general recurrent path (bit for bit), in fewer operations: decoding runs it
    once per layer and token, where the general path's bookkeeping costs as much as the step."""
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    decay = log_decay.to(state_dtype).exp()
    decay = decay.view(1, -1, 1, 1) if decay.dim() == 1 else decay[..., None]  # (1 or B, H, 1, 1)
    q, k, v = q.to(state_dtype), k.to(state_dtype), v.to(state_dtype)
    real = None
    if mask is not None:
        if mask.shape != (q.shape[0], 1):
            raise ValueError(f"mask must have shape {(q.shape[0], 1)} (batch, length), got {tuple(mask.shape)}")
        real = mask.to(state_dtype)[:, None, :, None]  # (B, 1, 1, 1)
        decay = torch.where(real > 0, decay, 1.0)  # padding neither decays the state nor adds to it
        k = k * real
    if initial_state is None:
        state = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    else:
        state = initial_state.to(state_dtype) * decay  # a new tensor, so adding into it is safe
    state.addcmul_(k.transpose(-1, -2), v)
    # o = q S as one batched product over (B·H): what matmul does inside, without its broadcasting steps
    b, h = q.shape[:2]
    o = torch.bmm(q.flatten(0, 1), state.flatten(0, 1)).unflatten(0, (b, h))
    if real is not None:
        o = o * real
    return o.to(v.dtype), state


def check_offsets(offsets: Tensor, q: Tensor, v: Tensor, initial_state: Tensor | None) -> None:
    t = q.shape[2]
    if q.shape[0] != 1:
        raise ValueError(f"offsets (packed documents) take a batch of one row, got {q.shape[0]} rows")
    if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be a 1-D integer tensor (N+1,) of document bounds, got {tuple(offsets.shape)} "
                         f"{offsets.dtype}")
    bounds = offsets.detach().cpu()
    if int(bounds[0]) != 0 or int(bounds[-1]) != t or bool((bounds[1:] < bounds[:-1]).any()):
        raise ValueError(f"offsets must rise from 0 to the length {t}, got {bounds.tolist()}")
    documents = offsets.numel() - 1
    if initial_state is not None and initial_state.shape != (documents, q.shape[1], q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must have shape (N, H, K, V) = "
                         f"{(documents, q.shape[1], q.shape[-1], v.shape[-1])} with offsets, got "
                         f"{tuple(initial_state.shape)}")


def offset_rows(offsets: Tensor, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Packed documents (offsets (N+1,), checked by :func:`check_offsets`) as N right-padded rows: for each
    row, the step each slot reads (N, L), clamped inside the sequence, and which slots are the document's."""
    bounds = offsets.to(device, torch.long)
    lengths = bounds[1:] - bounds[:-1]
    steps = torch.arange(max(1, int(lengths.max())), device=device)
    valid = steps[None, :] < lengths[:, None]  # (N, L)
    return (bounds[:-1, None] + steps[None, :]).clamp(max=length - 1), valid


def _documents_as_rows(q, k, v, log_decay, offsets, mask, initial_state, output_final_state, **options):
    """Packed documents through the PyTorch forms: each document gathered into a padded row of its own."""
    index, valid = offset_rows(offsets, q.shape[2], q.device)

    def rows(x: Tensor) -> Tensor:  # (1, H, T, ...) -> (N, H, L, ...)
        return x[0][:, index].transpose(0, 1)

    row_mask = valid if mask is None else valid & mask[0][index]
    row_decay = log_decay if log_decay.dim() == 1 else rows(log_decay)
    o, state = retention(rows(q), rows(k), rows(v), log_decay=row_decay, mask=row_mask, initial_state=initial_state,
                         output_final_state=output_final_state, **options)
    out = o.new_zeros(v.shape[1], v.shape[2], v.shape[3])  # (H, T, V)
    out[:, index[valid]] = o.transpose(0, 1)[:, valid]
    return out[None], state


def _triton_retention(q, k, v, log_decay, form, chunk_size, mask, initial_state, output_final_state, offsets):
    if form != "chunkwise":
        raise ValueError(f"backend='triton' computes the chunkwise form, not {form!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 q, k, v of one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    from scaleformer.ops.retention_triton import chunk_table

    chunks = chunk_table(q.shape[0], q.shape[2], chunk_size, offsets, q.device)
    o, state = _TritonRetention.apply(q, k, v, log_decay, mask, initial_state, chunks)
    return o, state if output_final_state else None


class _TritonRetention(torch.autograd.Function):
    """Forward and backward as Triton kernels (:mod:`scaleformer.ops.retention_triton`)."""

    @staticmethod
    def _prepare(q, k, log_decay, mask):
        steps = _step_counts(mask, q.shape[0], q.shape[2], q.device)  # (b, T): 0 at padding
        per_step = log_decay[None, :, None] if log_decay.dim() == 1 else log_decay
        keys = k * steps[:, None, :, None].to(k.dtype) if mask is not None else k  # padding adds nothing
        return steps, per_step.to(torch.float32) * steps[:, None, :], keys  # and does not decay

    @staticmethod
    def forward(ctx, q, k, v, log_decay, mask, initial_state, chunks):
        from scaleformer.ops.retention_triton import chunk_retention_forward

        steps, e, keys = _TritonRetention._prepare(q, k, log_decay, mask)
        o, state = chunk_retention_forward(q, keys, v, e, chunks, initial_state)
        if mask is not None:
            o = o * steps[:, None, :, None]
        ctx.save_for_backward(q, k, v, log_decay, mask, initial_state)
        ctx.chunks = chunks
        return o.to(v.dtype), state

    @staticmethod
    def backward(ctx, grad_o, grad_state):
        from scaleformer.ops.retention_triton import chunk_retention_backward

        q, k, v, log_decay, mask, initial_state = ctx.saved_tensors
        steps, e, keys = _TritonRetention._prepare(q, k, log_decay, mask)
        grad_o = grad_o * steps[:, None, :, None] if mask is not None else grad_o
        chunks = ctx.chunks
        dq, dk, dv, d_initial, d_positions = chunk_retention_backward(q, keys, v, e, chunks, initial_state, grad_o,
                                                                      grad_state)
        if mask is not None:
            dk = dk * steps[:, None, :, None]
        d_log_decay = None
        if ctx.needs_input_grad[3]:  # P_n = Σ_{s≤n} e_s within each sequence, and e_s = log γ_s · step_s
            to_end = torch.nn.functional.pad(d_positions.flip(-1).cumsum(-1).flip(-1), (0, 1))  # Σ_{m≥n}, 0 at T
            ends = chunks.step_ends(q.shape[2], q.device)
            d_steps = (to_end[..., :-1] - to_end[..., ends]) * steps[:, None, :]  # Σ_{n≤m<end of its sequence}
            d_log_decay = (d_steps.sum((0, 2)) if log_decay.dim() == 1 else d_steps).to(log_decay.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_log_decay, None,
                None if initial_state is None else d_initial.to(initial_state.dtype), None)


def _decay(rate: Tensor, exponent: Tensor) -> Tensor:
    """exp(rate_h · exponent): rate (H,), exponent (b, 1 or H, ...) -> (b, H, ...)."""
    shape = (1, -1) + (1,) * (exponent.dim() - 2)
    return torch.exp(rate.view(shape) * exponent.to(rate.dtype))


def _parallel(q, k, v, rate, positions, initial_state, output_final_state, toeplitz=False):
    t = q.shape[2]
    # D[n, m] = exp(rate·(P_n − P_m)) for m <= n, 0 above the diagonal. The difference is taken in the
    # positions' own dtype (float64 for per-token decays) before it is rounded.
    if not toeplitz:
        distance = positions[..., :, None] - positions[..., None, :]  # (b, 1 or H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        decay = _decay(rate, distance.masked_fill(~causal, 0.0)).masked_fill(~causal, 0.0).to(q.dtype)
    else:  # P_n = n + 1: D is Toeplitz, D[n, m] = g[n - m] with g_j = γ^j — T exponentials instead of T²
        powers = _decay(rate, torch.arange(t, device=q.device, dtype=rate.dtype)[None, None])  # (1, H, T)
        window = torch.cat([powers.flip(-1), powers.new_zeros(1, powers.shape[1], t - 1)], dim=-1)  # (1, H, 2T-1)
        decay = window.unfold(-1, t, 1).flip(-2).to(q.dtype)  # row n = window[T-1-n : 2T-1-n]
    o = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    if initial_state is not None:
        q_decayed = q * _decay(rate, positions)[..., None].to(q.dtype)
        o = o + torch.matmul(q_decayed.to(state_dtype), initial_state.to(state_dtype)).to(o.dtype)
    state = None
    if output_final_state:
        to_end = positions[..., -1:] - positions  # the decay after m
        state = torch.matmul((k * _decay(rate, to_end)[..., None].to(k.dtype)).transpose(-1, -2), v)
        state = state.to(state_dtype)
        if initial_state is not None:
            state = state + initial_state.to(state_dtype) * _decay(rate, positions[..., -1])[..., None, None].to(state_dtype)
    return o, state


def _chunkwise(q, k, v, rate, increments, chunk, initial_state, output_final_state, shared_decay=False):
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    # A call shorter than a chunk is one chunk of its own length: padding it to a full chunk would multiply
    # C×C matrices for a few tokens (a speculative verification, a short prefill continuing a state).
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # padded steps: zero keys, no decay -> no effect on outputs or state
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        increments = torch.nn.functional.pad(increments, (0, pad))
    q, k, v = (x.view(b, h, n, chunk, x.shape[-1]) for x in (q, k, v))
    # (b, 1 or H, N, C): positions within the chunk, inclusive — restarted per chunk, so small
    local = increments.view(*increments.shape[:2], n, chunk).cumsum(-1)
    total = local[..., -1:]  # (b, 1 or H, N, 1)

    # Inside each chunk: (q kᵀ ⊙ D) v with D[i, j] = exp(rate·(local_i - local_j)), j <= i. With one decay
    # per head and no padding every chunk has the same D (local positions are 1..C; a tail chunk's padded
    # keys are zero), so build it once.
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    inner = local[:1, :, :1] if shared_decay else local
    distance = (inner[..., :, None] - inner[..., None, :]).masked_fill(~causal, 0.0)
    decay = _decay(rate, distance).masked_fill(~causal, 0.0).to(q.dtype)  # (b, H, N, C, C) or (1, H, 1, C, C)
    o = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)

    # Each chunk's own contribution to the state at its end: Σ_j γ^{total - local_j} k_jᵀ v_j.
    k_to_end = k * _decay(rate, total - local)[..., None].to(k.dtype)
    state_dtype = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 inputs: states summed in fp32
    chunk_states = torch.matmul(k_to_end.transpose(-1, -2), v).to(state_dtype)  # (B, H, N, K, V)
    # (b, H, N): the log of each chunk's decay (float64: see _scan_states)
    chunk_log_decay = (rate.view(1, -1, 1).double() * total[..., 0].double()).expand(-1, h, -1)
    initial = initial_state.to(state_dtype) if initial_state is not None else None
    if n == 1:  # one chunk: it enters with the initial state (if any); no scan, no stack of states to build
        state = chunk_states[:, :, 0]
        if initial is not None:
            state = state + torch.exp(chunk_log_decay[..., 0]).to(state_dtype)[..., None, None] * initial
        before = None if initial is None else initial[:, :, None]
    else:
        flat, state = _scan_states(chunk_states.flatten(-2), chunk_log_decay,
                                   None if initial is None else initial.flatten(-2))
        before = flat.view(*flat.shape[:-1], dk, dv)  # (B, H, N, K, V): the state entering each chunk
        state = state.view(*state.shape[:-1], dk, dv)
    if before is not None:  # across chunks: position i of a chunk sees the entering state decayed by exp(rate·local_i)
        q_decayed = q * _decay(rate, local)[..., None].to(q.dtype)
        o = o + torch.matmul(q_decayed.to(state_dtype), before).to(o.dtype)
    o = o.view(b, h, n * chunk, dv)
    if pad:
        o = o[:, :, :t]
    return o, state if output_final_state else None


SCAN_GROUP = 16  # chunks per group of the state scan; see _scan_states


def _scan_states(contributions: Tensor, log_decay: Tensor, initial: Tensor | None) -> tuple[Tensor, Tensor]:
    """The linear recurrence S ← exp(log_decay_n)·S + contributions_n over chunks, without a loop over them.

    contributions (B, H, N, F) are each chunk's own state at its end (F = K·V flattened), log_decay (b, H, N)
    float64 ≤ 0 each chunk's decay, initial (B, H, F) or None. Returns the state entering every chunk
    (B, H, N, F) and the state after the last (B, H, F).

    Within a group of up to SCAN_GROUP chunks this is one product with the group's decay matrix
    W[i, j] = exp(c_i − s_j) for j < i (s: inclusive, c: exclusive cumulative log decays, in float64 so that
    long sequences keep every weight exact); the groups' own end states and decays form the same recurrence
    one level up, solved the same way. A Python loop over the N chunks was the cost of chunkwise retention
    at small chunks (hundreds of tiny ops, each with its autograd node); this costs N·G·F multiply-adds in a
    few batched products, log_G(N) levels deep.
    """
    n = contributions.shape[2]
    dtype = contributions.dtype
    if n <= SCAN_GROUP:
        inclusive = log_decay.cumsum(-1)
        # rows 0..N-1: the state entering chunk i; row N: the state after the last chunk
        entering = torch.cat([torch.zeros_like(inclusive[..., :1]), inclusive], dim=-1)  # (b, H, N+1)
        strictly_after = torch.ones(n + 1, n, dtype=torch.bool, device=log_decay.device).tril(-1)
        exponent = (entering[..., :, None] - inclusive[..., None, :]).masked_fill(~strictly_after, float("-inf"))
        states = torch.matmul(torch.exp(exponent).to(dtype), contributions)  # (B, H, N+1, F)
        if initial is not None:
            states = states + torch.exp(entering)[..., None].to(dtype) * initial[..., None, :]
        return states[..., :n, :], states[..., n, :]
    groups = -(-n // SCAN_GROUP)
    pad = groups * SCAN_GROUP - n
    if pad:  # padded chunks add nothing and do not decay
        contributions = torch.nn.functional.pad(contributions, (0, 0, 0, pad))
        log_decay = torch.nn.functional.pad(log_decay, (0, pad))
    grouped = contributions.unflatten(2, (groups, SCAN_GROUP)).flatten(1, 2)  # (B, H·M, G, F)
    grouped_decay = log_decay.unflatten(2, (groups, SCAN_GROUP))  # (b, H, M, G)
    within, group_end = _scan_states(grouped, grouped_decay.flatten(1, 2), None)
    within = within.unflatten(1, (-1, groups))  # (B, H, M, G, F): from the group's own earlier chunks
    group_end = group_end.unflatten(1, (-1, groups))  # (B, H, M, F)
    entering_group, final = _scan_states(group_end, grouped_decay.sum(-1), initial)  # (B, H, M, F)
    since_group_start = grouped_decay.cumsum(-1) - grouped_decay  # (b, H, M, G), exclusive
    before = within + torch.exp(since_group_start)[..., None].to(dtype) * entering_group[..., None, :]
    return before.flatten(2, 3)[:, :, :n], final


def _recurrent(q, k, v, rate, increments, initial_state):
    b, h, t, dk = q.shape
    # When gradients are wanted, the state is accumulated one dtype wider than the inputs (fp32 -> fp64):
    # backward, dq_t = dO_t S_tᵀ contracts against a state summed over all earlier steps, an association
    # less accurate than the parallel form's Σ_m (dO_t·v_m) k_m when dO_t is nearly orthogonal to the
    # values (which the scale-invariant head norm makes common); in fp32 this alone put gradients 5e-5
    # apart from the other forms. Inference (decoding) keeps the state dtype: no conversions per token.
    inputs = (q, k, v) if initial_state is None else (q, k, v, initial_state)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    wide = torch.promote_types(q.dtype, torch.float64) if needs_grad else state_dtype
    q, k, v = q.to(wide), k.to(wide), v.to(wide)
    state = initial_state.to(wide) if initial_state is not None else q.new_zeros(b, h, dk, v.shape[-1])
    step_decay = _decay(rate.to(wide), increments).to(wide)[..., None, None]  # (b, H, T, 1, 1); 1 at padding
    if t == 1:  # a decoding step: the same arithmetic as one turn of the loop below, without the loop
        state = state * step_decay[:, :, 0]  # a new tensor, so adding into it is safe (and one allocation fewer)
        state.addcmul_(k.transpose(-1, -2), v)
        return torch.matmul(q, state), state
    outputs = []
    steps_t = zip(step_decay.unbind(2), q[..., None, :].unbind(2), k[..., None].unbind(2), v[..., None, :].unbind(2))
    for decay_t, q_t, k_t, v_t in steps_t:  # unbind: indexing in the loop would make backward O(T²)
        # S ← γ S + k_tᵀ v_t: addcmul broadcasts (B, H, K, 1) × (B, H, 1, V) into the outer product.
        state = torch.addcmul(state * decay_t, k_t, v_t)
        outputs.append(torch.matmul(q_t, state))
    return torch.cat(outputs, dim=2), state


def retention_reference(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor, mask: Tensor | None = None,
                        initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The definition, element by element in paper notation (slow; for tests, in any float dtype).

    o_n = Σ_{m ≤ n, m real} Π_{s in (m, n], s real} γ_s (q_n · k_m) v_m + Π_{s in [0, n], s real} γ_s q_n S_0

    with γ_s = γ_h for a per-head decay (a power of γ_h: γ_h^{real steps}) or the token's own γ_{h,s}.
    """
    b, h, t, _ = q.shape
    real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.cpu()
    gammas = log_decay.detach().to(torch.float64).exp().cpu()
    o = torch.zeros_like(v)
    state_out = []
    for bi in range(b):
        for hi in range(h):
            if gammas.dim() == 1:
                def decay(first: int, last: int) -> float:  # over the real steps in [first, last)
                    return float(gammas[hi]) ** int(real[bi, first:last].sum())
            else:
                def decay(first: int, last: int) -> float:
                    return math.prod(float(gammas[bi, hi, s]) for s in range(first, last) if real[bi, s])
            s0 = initial_state[bi, hi] if initial_state is not None else q.new_zeros(q.shape[-1], v.shape[-1])
            for n in range(t):
                if not real[bi, n]:
                    continue
                acc = decay(0, n + 1) * (q[bi, hi, n] @ s0)
                for m in range(n + 1):
                    if real[bi, m]:
                        acc = acc + decay(m + 1, n + 1) * (q[bi, hi, n] @ k[bi, hi, m]) * v[bi, hi, m]
                o[bi, hi, n] = acc
            final = decay(0, t) * s0
            for m in range(t):
                if real[bi, m]:
                    final = final + decay(m + 1, t) * torch.outer(k[bi, hi, m], v[bi, hi, m])
            state_out.append(final)
    return o, torch.stack(state_out).view(b, h, q.shape[-1], v.shape[-1])
