"""Multi-scale retention (RetNet), built on the ``retention`` op.

Shapes: B batch, T length, C model width, H heads, K key head dim (C/H), V value head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.cache import RetentionState
from scaleformer.config import ConfigBase, ConfigError, config
from scaleformer.layers.context import Context, DocumentRows
from scaleformer.layers.norms import RMSNorm
from scaleformer.layers.positions import Rotary, real_dtype
from scaleformer.layers.shared_input import project
from scaleformer.mixer import RECURRENT_FORMS, MixerConfig, MixerSupport
from scaleformer.ops.retention import Form, decoding_step, retention

__all__ = ["Retention", "MultiScaleRetention", "RetentionTerms", "retention_log_decays"]


@dataclass(frozen=True)
class RetentionTerms:
    """Per-call quantities that depend only on positions: rotation phases (B, 1, T, K/2), log γ (H,) (None
    for gated decays, which depend on the tokens), and for ``normalizer="torchscale"``
    sqrt(Σ_{i≤n} γ^(n-i)) (B, H, T, 1)."""

    phases: Tensor
    log_decay: Tensor | None
    decay_mass: Tensor | None


def retention_log_decays(heads: int, schedule: str = "retnet") -> Tensor:
    """log γ_h, float64 (H,). "retnet": γ_h = 1 - 2^(-5-h); "paper": 1 - exp(linspace(log 1/32, log 1/512, H));
    the ablations of RetNet's Table 5: "shared" (every head γ = 1 - 2^-5: no multi-scale decay) and "none"
    (γ = 1: no decay)."""
    if schedule == "retnet":
        gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))
    elif schedule == "paper":
        gamma = 1 - torch.exp(torch.linspace(math.log(1 / 32), math.log(1 / 512), heads, dtype=torch.float64))
    elif schedule == "shared":
        gamma = torch.full((heads,), 1 - 2.0**-5, dtype=torch.float64)
    elif schedule == "none":
        gamma = torch.ones(heads, dtype=torch.float64)
    else:
        raise ValueError(f"unknown decay schedule {schedule!r}; expected 'retnet', 'paper', 'shared' or 'none'")
    return gamma.log()


class MultiScaleRetention(nn.Module):
    """MSR(X) = (swish(X W_G) ⊙ HeadNorm(Retention(X))) W_O, one decay γ_h per head.

    **Gated retention** (``decay="gated"``; RetNet-3, the self-decoder of YOCO, arXiv 2405.05254): the
    decay depends on the token, γ_{h,t} = exp(logsigmoid(x_t W_γ)_h / τ) with a bias-free projection W_γ
    (C → H) and temperature τ (16 in YOCO's code), so a head can hold its state (logit ≫ 0: γ → 1) or
    forget it (logit ≪ 0) as the input asks. With ``normalizer="none"`` (YOCO's choice) the head norm
    alone scales the rows. Everything else — rotation, key scaling, head RMSNorm without affine, swish
    gate — is this layer's.

    Q = rot(X W_Q), K = rot(X W_K) / sqrt(K), V = X W_V; all projections bias-free, initialised as
    TorchScale does (Xavier-uniform, gain 2^-2.5 for W_Q, W_K, W_V, W_G and 2^-1 for W_O; DeepNorm's
    β further multiplies W_V and W_O).

    **Normalization, and why every form agrees exactly.** The retention op itself is exact linear
    retention. On top of it this layer divides each output row by sqrt((Σ_m R[n, m])² + 1), where
    R = (Q Kᵀ ⊙ D) is the decayed score matrix: a smooth form of the paper's v4 normalizer
    max(|Σ_m R[n, m]|, 1). That row sum is itself a retention output: retention over V' = [V | 1]
    returns [Σ R·V | Σ R] in one call, and the extra column is carried in the recurrent state. So
    parallel, chunkwise and recurrent compute the normalizer through the very same op and agree to
    rounding error, with initial states, padding and any length. It keeps activations O(|V|)
    and, since the per-head RMSNorm that follows is scale-invariant, changes the function only through
    that norm's eps.

    **Half precision.** The normalizer is computed in float32 for every input dtype: in fp16, (Σ R)²
    overflows once |Σ R| > 256, and the row would become exactly 0. For fp16 inputs the retention op
    itself also runs in float32, because its un-normalized outputs Σ R·V (growing like |Σ R|·|V| with
    shared key directions and slow decays) overflow fp16's range before the division brings them back.
    bf16 has float32's range, so it keeps its own arithmetic (states are summed in float32 either way).
    Why smooth: with max(|s|, 1), rows whose |s| lies within rounding of 1 take the clamp's branch in
    one form and not in another, and their gradients then differ by far more than rounding (we measured
    4e-5 relative in fp32 with ×10 weights); sqrt(s² + 1) has no branch.
    Why not TorchScale's choices: its D̃ (rows divided by sqrt(Σ D)) depends on how far the row is from
    the sequence start, and its Σ_m |R[n, m]| cannot be computed by the recurrent form — together with
    the head norm's eps, that is why its chunkwise and parallel outputs differ by ~1e-2 even in float64.

    ``normalizer="torchscale"`` reproduces TorchScale's *parallel* form for converted checkpoints. There,
    row n is scaled by 1 / (sqrt(c_n) · max(|s_n| / sqrt(c_n), 1)) = 1 / max(|s_n|, sqrt(c_n)), with
    c_n = Σ_{i≤n} γ^(n-i) = (1 - γ^(n+1)) / (1 - γ) (n = the row's position) and s_n the same row sum
    as above. Both factors are known to every form, so our three forms agree with TorchScale's parallel
    numbers (its own chunkwise and recurrent forms do not).
    """

    def __init__(self, embed_dim: int, spec: "Retention", *, gain: float = 1.0) -> None:
        """``spec``: the layer's :class:`~scaleformer.models.architecture.Retention` config (heads, value
        width, decays, normalizer, forms' options; checked there); ``gain``: DeepNorm's β for the value and
        output projections."""
        super().__init__()
        heads, value_dim, decay, normalizer = spec.heads, spec.value_dim, spec.decay, spec.normalizer
        self.chunk_size = spec.chunk_size  # of the chunkwise form, when the layer is a Block's mixer
        self.backend = spec.backend  # of the chunkwise form (the recurrent and parallel forms are PyTorch's)
        self.heads = heads
        self.key_dim, self.value_dim = embed_dim // heads, value_dim // heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, value_dim, bias=False)
        # gate / head_norm False: RetNet's "− swish gate" / "− GroupNorm" ablations (its Table 5)
        self.g_proj = nn.Linear(embed_dim, value_dim, bias=False) if spec.gate else None
        self.out_proj = nn.Linear(value_dim, embed_dim, bias=False)
        self.head_norm = RMSNorm(self.value_dim, eps=spec.norm_eps, affine=False) if spec.head_norm else nn.Identity()
        self.rotary = Rotary(self.key_dim, base=spec.rope_base, spacing="linspace")
        # gated: the per-token decay logits (one per head)
        self.decay_proj = nn.Linear(embed_dim, heads, bias=False) if decay == "gated" else None
        self.decay_temperature = spec.decay_temperature
        self.decay_schedule = decay
        self._log_decays: dict[torch.device, Tensor] = {}  # see position_terms
        self.normalizer = normalizer
        self.gain = gain
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (p for p in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.decay_proj) if p is not None):
            nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.out_proj.weight, gain=2**-1)
        with torch.no_grad():
            self.v_proj.weight.mul_(self.gain)
            self.out_proj.weight.mul_(self.gain)

    @staticmethod
    def _decay_mass(log_decay: Tensor, positions: Tensor, dtype: torch.dtype) -> Tensor:
        """sqrt(Σ_{i≤n} γ^(n-i)) = sqrt(expm1((n+1)·log γ) / expm1(log γ)) as (B, H, T, 1) in ``dtype``."""
        count = positions.to(torch.float64)[:, None, :, None] + 1  # (B, 1, T, 1)
        log_gamma = log_decay.to(torch.float64)[None, :, None, None]  # (1, H, 1, 1)
        return (torch.expm1(count * log_gamma) / torch.expm1(log_gamma)).sqrt().to(dtype)

    def token_log_decays(self, x: Tensor) -> Tensor:
        """Gated decays log γ_{h,t} = logsigmoid(x_t W_γ)_h / τ as (B, H, T), in at least float32."""
        assert self.decay_proj is not None
        return self._log_decays_of(self.decay_proj(x))

    def _log_decays_of(self, logits: Tensor) -> Tensor:
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return (F.logsigmoid(logits) / self.decay_temperature).transpose(1, 2)

    def shared_input_linears(self) -> list[list[nn.Linear]]:
        """The projections of the layer's input, in the order :meth:`retain` reads them (for
        :func:`scaleformer.runtime.decoding_layout`, which multiplies them as one block)."""
        return [[p for p in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.decay_proj) if p is not None]]

    def _split(self, x: Tensor) -> Tensor:  # (B, T, H·D) -> (B, H, T, D)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def position_terms(self, positions: Tensor, dtype: torch.dtype) -> RetentionTerms:
        """What a call needs from positions alone; equal for every layer of a RetNet, so computed once."""
        # Decays are kept in float64 outside the module's tensors (H numbers, per device), so casting the
        # module cannot round them.
        log_decay = None if self.decay_proj is not None else self._log_decays.get(positions.device)
        if log_decay is None and self.decay_proj is None:
            log_decay = self._log_decays[positions.device] = retention_log_decays(
                self.heads, self.decay_schedule).to(positions.device)
        phases = self.rotary.phases(positions, dtype)
        mass = self._decay_mass(log_decay, positions, real_dtype(phases)) if self.normalizer == "torchscale" else None
        return RetentionTerms(phases=phases, log_decay=log_decay, decay_mass=mass)

    def new_state(self) -> RetentionState:
        """This layer's decoding state: the fixed-size retention state, whatever the context."""
        return RetentionState()

    def forward(self, x: Tensor, ctx: Context, cache: RetentionState | None = None) -> Tensor:
        """As a Block's mixer: x (B, T, C) at ``ctx``'s positions, in ``ctx.form`` (default: chunkwise for
        several tokens, recurrent for one), continuing and updating ``cache``'s state when given.
        Packed rows (``ctx.document_ids``) start every document from an empty state."""
        terms = self._terms(ctx, x.dtype)
        form = ctx.form or ("recurrent" if x.shape[1] == 1 else "chunkwise")
        if ctx.document_ids is not None:
            return self._per_document(x, ctx, form)
        out, state = self.retain(x, positions=ctx.positions, mask=ctx.token_mask, form=form, chunk_size=self.chunk_size,
                                 state=cache.state if cache is not None else None,
                                 output_final_state=cache is not None, terms=terms, sequence_group=ctx.sequence_group)
        if cache is not None:
            cache.update(state)
        return out

    def _terms(self, ctx: Context, dtype: torch.dtype) -> RetentionTerms:
        return ctx.shared(("retention", self.heads, self.decay_schedule, self.normalizer, self.rotary.base, dtype),
                          lambda: self.position_terms(ctx.positions, dtype))

    def _per_document(self, x: Tensor, ctx: Context, form: str) -> Tensor:
        """Each document of a packed row as its own right-padded row, so no state crosses a boundary; the
        Triton kernels instead read the documents in place, the batch flattened into one row of offsets."""
        assert ctx.document_ids is not None
        documents = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
        if self.backend == "triton" and form == "chunkwise" and ctx.sequence_group is None:
            b, t = x.shape[:2]
            offsets = torch.cat([documents.index[:, 0], documents.index.new_tensor([b * t])])
            mask = None if ctx.token_mask is None else ctx.token_mask.reshape(1, b * t)
            out, _ = self.retain(x.reshape(1, b * t, -1), positions=ctx.positions.reshape(1, b * t), mask=mask,
                                 form=form, chunk_size=self.chunk_size, offsets=offsets)
            return out.reshape(b, t, -1)
        positions = documents.gather(ctx.positions[..., None])[..., 0]
        out, _ = self.retain(documents.gather(x), positions=positions, mask=documents.valid, form=form,
                             chunk_size=self.chunk_size, sequence_group=ctx.recurrence_group(documents))
        return documents.scatter(out, x.shape[1])

    def retain(self, x: Tensor, *, positions: Tensor, mask: Tensor | None = None, form: Form = "chunkwise",
               chunk_size: int = 64, state: Tensor | None = None, output_final_state: bool = False,
               terms: RetentionTerms | None = None, offsets: Tensor | None = None,
               sequence_group: Any = None) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C), positions (B, T), mask (B, T) bool (False = padding), state (B, H, K, V + 1);
        ``offsets``: packed documents of a single row (see :func:`scaleformer.ops.retention.retention`).

        ``terms``: :meth:`position_terms` of these positions, when the caller shares them between layers.
        Returns the output (B, T, C) and, if asked, the state after the last step.
        """
        terms = terms if terms is not None else self.position_terms(positions, x.dtype)
        projected = iter(project(x, self.shared_input_linears()[0]))
        q, k, v = self._queries_keys_values(next(projected), next(projected), next(projected), x.dtype,
                                            lambda pairs: Rotary.rotate(pairs, terms.phases))
        gate = next(projected) if self.g_proj is not None else None
        log_decay = terms.log_decay if self.decay_proj is None else self._log_decays_of(next(projected))
        out, state = retention(q, k, v, log_decay=log_decay, form=form, chunk_size=chunk_size,
                               mask=mask, initial_state=state, output_final_state=output_final_state,
                               backend=self.backend if form == "chunkwise" else "torch", offsets=offsets,
                               sequence_group=sequence_group)
        return self._read_out(out, gate, x.dtype, terms.decay_mass), state

    def empty_decode_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor]:
        """The state of a layer that has read nothing, for inputs of ``dtype``: zeros (B, H, K, V [+ 1]), so the
        first step's γ·0 + kᵀv is kᵀv, as with no state."""
        extra = 0 if self.normalizer == "none" else 1
        return (torch.zeros(batch, self.heads, self.key_dim, self.value_dim + extra,
                            dtype=torch.promote_types(dtype, torch.float32), device=device),)

    def decode_step(self, x: Tensor, positions: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        """One token per row as plain tensor operations, for a compiled decoding step
        (:mod:`scaleformer.compiled_decoding`): x (B, 1, C) at ``positions`` (B, 1), continuing ``state``
        (a :class:`RetentionState`'s fields: the state (B, H, K, V [+ 1])) -> (the layer's output (B, 1, C),
        the next state).

        The arithmetic of :meth:`forward` with a cache and one unpadded token, without gradients, except the
        rotation, done in real numbers (a compiler generates no code for complex views): the same values to
        rounding. No Python objects, no checks: the caller has checked the shapes once."""
        cos, sin = self.rotary.real_phases(positions, x.dtype)
        projected = iter(project(x, self.shared_input_linears()[0]))
        q, k, v = self._queries_keys_values(next(projected), next(projected), next(projected), x.dtype,
                                            lambda pairs: Rotary.rotate_real(pairs, cos, sin))
        gate = next(projected) if self.g_proj is not None else None
        if self.decay_proj is None:
            log_decay = self._log_decays.get(positions.device)
            if log_decay is None:
                log_decay = self._log_decays[positions.device] = retention_log_decays(
                    self.heads, self.decay_schedule).to(positions.device)
        else:
            log_decay = self._log_decays_of(next(projected))
        mass = self._decay_mass(log_decay, positions, cos.dtype) if self.normalizer == "torchscale" else None
        out, new_state = decoding_step(q, k, v, log_decay, None, state[0])
        return self._read_out(out, gate, x.dtype, mass), (new_state,)

    def _queries_keys_values(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype,
                             rotate: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The projections (B, T, H·D) of an input of ``dtype`` -> rotated queries and scaled, rotated keys
        (B, H, T, K); values (B, H, T, V), with the normalizer's column of ones appended (V + 1) when the
        layer has one; float32 for a float16 input."""
        q = rotate(self._split(q))
        k = rotate(self._split(k)) * self.key_dim**-0.5
        v = self._split(v)
        if self.normalizer != "none":  # the last column accumulates Σ_m R[n, m]
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        if dtype == torch.float16:  # un-normalized sums grow like |s|·|v|, past fp16's 65504 (see class doc)
            q, k, v = q.float(), k.float(), v.float()
        return q, k, v

    def _read_out(self, out: Tensor, gate: Tensor | None, dtype: torch.dtype, decay_mass: Tensor | None) -> Tensor:
        """The retention op's output (B, H, T, V [+ 1]) -> the layer's (B, T, C) in ``dtype``: rows normalized,
        head norm, swish gate (``gate``: the gate projection of the input), output projection."""
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # the normalizer squares row sums
        if self.normalizer == "none":
            out = self.head_norm(out)
        else:
            numerator, row_sum = out.split([out.shape[-1] - 1, 1], dim=-1)  # split: its backward is one cat
            if decay_mass is None:
                out = self.head_norm(numerator / torch.sqrt(row_sum * row_sum + 1))
            else:
                out = self.head_norm(numerator / torch.maximum(row_sum.abs(), decay_mass.to(out.dtype)))
        out = out.to(dtype).transpose(1, 2).flatten(2)  # (B, T, H·V)
        return self.out_proj(out if gate is None else F.silu(gate) * out)


# The layer's config: one member of the mixer union (it registers itself by its kind).

@config
class Retention(MixerConfig):
    """RetNet's multi-scale retention (causal; parallel, chunkwise and recurrent forms agree)."""

    kind: ClassVar[str] = "retention"
    heads: int = 2
    #: total value width (divisible by heads)
    value_dim: int = 864
    #: per-head decays: "retnet" γ_h = 1 - 2^(-5-h), "paper" (the experiments' schedule), or the ablations
    #: "shared" (one γ for every head) and "none" (γ = 1); or "gated": a decay per head and token computed
    #: from the input, logsigmoid(x W_γ) / decay_temperature (gated retention, RetNet-3 / YOCO)
    decay: Literal["retnet", "paper", "shared", "none", "gated"] = "retnet"
    #: row normalizer: "smooth" (all forms agree), "torchscale" (its parallel form, for converted weights) or
    #: "none" (the head norm alone, as YOCO's gated retention)
    normalizer: Literal["smooth", "torchscale", "none"] = "smooth"
    #: τ of gated decays (YOCO: 16); a larger τ keeps every decay closer to 1
    decay_temperature: float = 16.0
    chunk_size: int = 64
    #: how the chunkwise form runs: "torch" (the PyTorch forms, the reference) or "triton" (the Triton
    #: kernels of scaleformer.ops.retention_triton; CUDA, or the CPU under TRITON_INTERPRET=1)
    backend: Literal["torch", "triton"] = "torch"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    #: the swish output gate (False: RetNet's "− swish gate" ablation)
    gate: bool = True
    #: the per-head norm of the output (False: RetNet's "− GroupNorm" ablation)
    head_norm: bool = True

    def _validate(self) -> None:
        _require(self.heads >= 1 and self.value_dim % self.heads == 0,
                 f"heads ({self.heads}) must divide value_dim ({self.value_dim})")
        _require(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        _require(not (self.normalizer == "torchscale" and self.decay in ("none", "gated")),
                 "normalizer='torchscale' divides by a per-head decay's mass, which has no limit without decay "
                 "(decay='none') and does not exist for gated decays")
        _require(self.decay_temperature > 0, f"decay_temperature must be > 0, got {self.decay_temperature}")
        _require(self.decay == "gated" or self.decay_temperature == 16.0,
                 f"decay_temperature divides gated decays; decay={self.decay!r} has none (it would be ignored)")

    @property
    def support(self) -> MixerSupport:
        return MixerSupport(bidirectional=False, inner_norm=False, multiway=False, model_positions=False,
                            relative_bias=False, forms=RECURRENT_FORMS)

    @property
    def title(self) -> str:
        return "gated retention" if self.decay == "gated" else "retention"

    def check_model(self, model: ConfigBase) -> None:
        _require(self.heads >= 1 and model.embed_dim % self.heads == 0 and (model.embed_dim // self.heads) % 2 == 0,
                 f"retention heads ({self.heads}) must divide embed_dim ({model.embed_dim}) into even widths")

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"retnet": (cls(heads=2, value_dim=24, chunk_size=3),) * 2,
                "gated": (cls(heads=2, value_dim=24, chunk_size=3, decay="gated", normalizer="none"),) * 2}

    def build(self, model: ConfigBase, *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> MultiScaleRetention:
        return MultiScaleRetention(model.embed_dim, self, gain=gain)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)

