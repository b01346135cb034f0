"""Retention (RetNet, arXiv 2307.08621): one contract, three forms, and a reference.

Shapes: B batch, H heads, T length, K key dim, V value dim, C chunk length, N = ceil(T / C) chunks.

Contract of :func:`retention` (every form) and :func:`retention_reference`::

    q, k (B, H, T, K), v (B, H, T, V), log_decay (H,) = log γ_h (< 0)
    mask (B, T) bool or None: False marks padding. A padding step neither decays the state nor adds to
        it, and its output is 0 — so padding anywhere (left, right, inside) is invisible to real tokens.
    initial_state (B, H, K, V) or None (zeros)
    -> o (B, H, T, V) in v's dtype, final_state (B, H, K, V) if output_final_state else None; states are
       float32 for bf16/fp16 inputs (summed in fp32), else the input dtype

    S_t = γ^{m_t} S_{t-1} + m_t k_tᵀ v_t,   o_t = m_t q_t S_t        (m_t = mask, 1 when None)

No normalization happens here: the op is exact linear retention, so any normalization a layer builds on
its outputs is computed identically by every form (see MultiScaleRetention).

Decay exponents are computed as log γ × (an integer count of real steps), never as a difference of two
large cumulative sums, so fp32 keeps full relative precision for neighbouring tokens at any length.

Forms:
    parallel:  o = (q kᵀ ⊙ D) v + (q ⊙ γ^{c_n}) S_0 — O(T²) memory, the paper's training form.
    chunkwise: parallel inside chunks of C steps, a recurrence across chunks — O(T·C) memory.
    recurrent: one step at a time — O(1) state, the decoding form.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["retention", "retention_reference", "Form"]

Form = Literal["parallel", "chunkwise", "recurrent"]


def _step_counts(mask: Tensor | None, batch: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(steps (b, T) float in {0, 1}, counts (b, T) float: real steps up to and including t); b = B or 1."""
    if mask is None:
        steps = torch.ones(1, length, device=device)
    else:
        if mask.shape != (batch, length):
            raise ValueError(f"mask must have shape {(batch, length)} (batch, length), got {tuple(mask.shape)}")
        steps = mask.to(torch.float32)
    return steps, steps.cumsum(-1)


def _check(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k (B, H, T, K) and v (B, H, T, V); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if log_decay.shape != (q.shape[1],):
        raise ValueError(f"log_decay must have shape (H,) = ({q.shape[1]},), got {tuple(log_decay.shape)}")
    if initial_state is not None and initial_state.shape != (*q.shape[:2], q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must have shape (B, H, K, V) = {(*q.shape[:2], q.shape[-1], v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def retention(q: Tensor, k: Tensor, v: Tensor, *, log_decay: Tensor, form: Form = "chunkwise", chunk_size: int = 64,
              mask: Tensor | None = None, initial_state: Tensor | None = None,
              output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Retention in the chosen ``form``; all forms compute the same function (see the module docstring)."""
    _check(q, k, v, log_decay, initial_state)
    steps, counts = _step_counts(mask, q.shape[0], q.shape[2], q.device)
    if mask is not None:  # padding adds nothing to the state
        k = k * steps[:, None, :, None].to(k.dtype)
    log_decay = log_decay.to(torch.promote_types(q.dtype, torch.float32))
    if form == "parallel":
        o, state = _parallel(q, k, v, log_decay, counts, initial_state, output_final_state, padded=mask is not None)
    elif form == "chunkwise":
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        o, state = _chunkwise(q, k, v, log_decay, steps, chunk_size, initial_state, output_final_state,
                              shared_decay=mask is None)
    elif form == "recurrent":
        o, state = _recurrent(q, k, v, log_decay, steps, initial_state)
        state = state if output_final_state else None
    else:
        raise ValueError(f"form must be 'parallel', 'chunkwise' or 'recurrent', got {form!r}")
    if mask is not None:
        o = o * steps[:, None, :, None].to(o.dtype)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    return o.to(v.dtype), None if state is None else state.to(state_dtype)


def _decay(log_decay: Tensor, exponent: Tensor) -> Tensor:
    """γ_h^exponent for exponent (..., ) broadcast against heads at dim 1: log_decay (H,) -> (b, H, ...)."""
    shape = (1, -1) + (1,) * (exponent.dim() - 1)
    return torch.exp(log_decay.view(shape) * exponent.unsqueeze(1))


def _parallel(q, k, v, log_decay, counts, initial_state, output_final_state, padded=True):
    t = q.shape[2]
    # D[n, m] = γ^{c_n - c_m} for m <= n (c counts real steps), 0 above the diagonal.
    if padded:
        distance = counts[:, :, None] - counts[:, None, :]  # (b, T, T)
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        decay = _decay(log_decay, distance.masked_fill(~causal, 0.0)).masked_fill(~causal, 0.0).to(q.dtype)
    else:  # c_n = n + 1: D is Toeplitz, D[n, m] = g[n - m] with g_j = γ^j — T exponentials instead of T²
        powers = _decay(log_decay, torch.arange(t, device=q.device, dtype=log_decay.dtype)[None])  # (1, H, T)
        window = torch.cat([powers.flip(-1), powers.new_zeros(1, powers.shape[1], t - 1)], dim=-1)  # (1, H, 2T-1)
        decay = window.unfold(-1, t, 1).flip(-2).to(q.dtype)  # row n = window[T-1-n : 2T-1-n]
    o = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)
    state_dtype = torch.promote_types(q.dtype, torch.float32)
    if initial_state is not None:
        q_decayed = q * _decay(log_decay, counts)[..., None].to(q.dtype)
        o = o + torch.matmul(q_decayed.to(state_dtype), initial_state.to(state_dtype)).to(o.dtype)
    state = None
    if output_final_state:
        to_end = counts[:, -1:] - counts  # real steps after m
        state = torch.matmul((k * _decay(log_decay, to_end)[..., None].to(k.dtype)).transpose(-1, -2), v)
        state = state.to(state_dtype)
        if initial_state is not None:
            state = state + initial_state.to(state_dtype) * _decay(log_decay, counts[:, -1])[..., None, None].to(state_dtype)
    return o, state


def _chunkwise(q, k, v, log_decay, steps, chunk, initial_state, output_final_state, shared_decay=False):
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # padded steps: zero keys, no decay -> no effect on outputs or state
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        steps = torch.nn.functional.pad(steps, (0, pad))
    q, k, v = (x.view(b, h, n, chunk, x.shape[-1]) for x in (q, k, v))
    local = steps.view(steps.shape[0], n, chunk).cumsum(-1)  # (b, N, C) real steps within the chunk, inclusive
    total = local[..., -1:]  # (b, N, 1)

    # Inside each chunk: (q kᵀ ⊙ D) v with D[i, j] = γ^{local_i - local_j}, j <= i. Without padding every
    # chunk has the same D (local counts are 1..C; a tail chunk's padded keys are zero), so build it once.
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    inner = local[:1, :1] if shared_decay else local
    distance = (inner[..., :, None] - inner[..., None, :]).masked_fill(~causal, 0.0)
    decay = _decay(log_decay, distance).masked_fill(~causal, 0.0).to(q.dtype)  # (b, H, N, C, C) or (1, H, 1, C, C)
    o = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)

    # Each chunk's own contribution to the state at its end: Σ_j γ^{total - local_j} k_jᵀ v_j.
    k_to_end = k * _decay(log_decay, total - local)[..., None].to(k.dtype)
    state_dtype = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 inputs: states summed in fp32
    chunk_states = torch.matmul(k_to_end.transpose(-1, -2), v).to(state_dtype)  # (B, H, N, K, V)
    chunk_decay = _decay(log_decay, total[..., 0]).to(state_dtype)  # (b, H, N)
    state = initial_state.to(state_dtype) if initial_state is not None else q.new_zeros(b, h, dk, dv, dtype=state_dtype)
    before = []  # the state entering each chunk
    # unbind, not indexing in the loop: the backward of x[:, :, i] writes a zero tensor of x's full size
    # per step, which made the scan quadratic in the number of chunks.
    for decay_i, chunk_state in zip(chunk_decay[..., None, None].unbind(2), chunk_states.unbind(2)):
        before.append(state)
        state = state * decay_i + chunk_state
    # Across chunks: position i of a chunk sees the entering state decayed by γ^{local_i}.
    q_decayed = q * _decay(log_decay, local)[..., None].to(q.dtype)
    o = o + torch.matmul(q_decayed.to(state_dtype), torch.stack(before, dim=2)).to(o.dtype)
    o = o.view(b, h, n * chunk, dv)
    if pad:
        o = o[:, :, :t]
    return o, state if output_final_state else None


def _recurrent(q, k, v, log_decay, steps, initial_state):
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
    step_decay = _decay(log_decay.to(wide), steps).to(wide)[..., None, None]  # (b, H, T, 1, 1); 1 at padding
    if t == 1:  # a decoding step: the same arithmetic as one turn of the loop below, without the loop
        state = torch.addcmul(state * step_decay[:, :, 0], k.transpose(-1, -2), v)
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

    o_n = Σ_{m ≤ n, m real} γ^{(real steps in (m, n])} (q_n · k_m) v_m + γ^{(real steps in [0, n])} q_n S_0
    """
    b, h, t, _ = q.shape
    real = torch.ones(b, t, dtype=torch.bool) if mask is None else mask.cpu()
    gamma = log_decay.to(torch.float64).exp().tolist()
    o = torch.zeros_like(v)
    state_out = []
    for bi in range(b):
        for hi in range(h):
            s0 = initial_state[bi, hi] if initial_state is not None else q.new_zeros(q.shape[-1], v.shape[-1])
            for n in range(t):
                if not real[bi, n]:
                    continue
                acc = (gamma[hi] ** int(real[bi, :n + 1].sum())) * (q[bi, hi, n] @ s0)
                for m in range(n + 1):
                    if real[bi, m]:
                        acc = acc + gamma[hi] ** int(real[bi, m + 1:n + 1].sum()) * (q[bi, hi, n] @ k[bi, hi, m]) * v[bi, hi, m]
                o[bi, hi, n] = acc
            final = gamma[hi] ** int(real[bi].sum()) * s0
            for m in range(t):
                if real[bi, m]:
                    final = final + gamma[hi] ** int(real[bi, m + 1:].sum()) * torch.outer(k[bi, hi, m], v[bi, hi, m])
            state_out.append(final)
    return o, torch.stack(state_out).view(b, h, q.shape[-1], v.shape[-1])
