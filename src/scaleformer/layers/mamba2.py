"""Mamba-2 (SSD, Dao & Gu 2024) as a mixer: its config and its layer, in this one file.

The layer (``mamba_ssm/modules/mamba2.py``'s parts): one input projection to (z, x, B, C, Δ); a short causal
depthwise convolution with a bias over (x, B, C), then SiLU; Δ = softplus(Δ + dt_bias) per head; the decay
a_t = exp(Δ_t A_h), A_h = −exp(A_log_h); heads of ``head_dim`` P reading B and C of their group (``groups``
G, each of ``state_dim`` N); the recurrence

    h_t = a_t h_{t−1} + (Δ_t x_t) B_tᵀ,    y_t = h_t C_t + D_h x_t      (h_t ∈ R^{P×N} per head)

then RMSNorm(y ⊙ silu(z)) per group of d_inner / G channels, and the output projection.

The recurrence is gated retention — a scalar decay per token and head, no normalizer — so it runs on the
retention op (:func:`scaleformer.ops.retention.retention`, all three forms, packed documents, carried
state) with q = C, k = B, v = Δ x, log decay Δ A and scale 1 (PAPERS.md Part 3 §3); no second scan is
written. Its decoding state is one :class:`Mamba2State`: the convolution's last ``conv_size − 1`` inputs
and the SSM state (B, H, N, P) (the retention op's K × V layout, hᵀ). Padding is exact as for the delta rule:
padded inputs are zeroed before the convolution and are no-op steps of the recurrence; a packed row runs
one document per row.

Shapes: B batch, T length, C model width, H = expand·C / P heads, G groups, N state, P head dim.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.config import ConfigBase, ConfigError, check_positive, config
from scaleformer.layers.context import Context, DocumentRows
from scaleformer.layers.delta_net import DeltaState, context_parallel_split, short_convolution
from scaleformer.mixer import RECURRENT_FORMS, MixerConfig, MixerSupport
from scaleformer.ops.retention import retention

__all__ = ["Mamba2", "Mamba2Layer", "Mamba2State"]


class Mamba2State(DeltaState):
    """A Mamba-2 layer's decoding state: the convolution's last inputs (B, conv_size − 1, channels) and the
    SSM state (B, H, N, P), float32 at least. Fixed size, whatever the context."""


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class Mamba2Layer(nn.Module):
    """out = W_out · RMSNorm(SSD(silu(conv(x, B, C)), Δ) ⊙ silu(z)); see the module docstring."""

    def __init__(self, embed_dim: int, spec: "Mamba2") -> None:
        super().__init__()
        inner = spec.expand * embed_dim
        self.inner, self.heads, self.groups = inner, inner // spec.head_dim, spec.groups
        self.head_dim, self.state_dim = spec.head_dim, spec.state_dim
        self.conv_size, self.chunk_size, self.backend = spec.conv_size, spec.chunk_size, spec.backend
        self.norm_eps = spec.norm_eps
        channels = inner + 2 * spec.groups * spec.state_dim  # x, B, C: what the convolution reads
        self.in_proj = nn.Linear(embed_dim, inner + channels + self.heads, bias=False)  # z | x B C | Δ
        self.conv_weight = nn.Parameter(torch.empty(channels, spec.conv_size))  # depthwise, causal
        self.conv_bias = nn.Parameter(torch.empty(channels))
        bound = 1 / math.sqrt(spec.conv_size)  # nn.Conv1d's default initialisation, as mamba_ssm's
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        # mamba_ssm's initialisation: A ~ U(1, 16); Δ ~ exp(U(log 1e-3, log 1e-1)) ≥ 1e-4, dt_bias = softplus⁻¹(Δ)
        self.A_log = nn.Parameter(torch.empty(self.heads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(self.heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)

    def new_state(self) -> Mamba2State:
        return Mamba2State()

    def forward(self, x: Tensor, ctx: Context, cache: Mamba2State | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C), continuing and updating ``cache`` when given."""
        z, mixed, delta = self._inputs(x)
        if ctx.document_ids is not None:  # one document per row: its convolution and state start empty
            rows = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
            split = context_parallel_split(mixed, self.conv_weight.shape[1], ctx, rows)
            y = self._mix(rows.gather(mixed), rows.gather(delta), rows.valid, None, ctx.form, *split)
            y = rows.scatter(y, x.shape[1])
        else:
            y = self._mix(mixed, delta, ctx.token_mask, cache, ctx.form,
                          *context_parallel_split(mixed, self.conv_weight.shape[1], ctx))
        return self._output(y, z, x.dtype)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, T, d_inner), the convolution's inputs (B, T, channels) and Δ (B, T, H)."""
        z, mixed, dt = self.in_proj(x).split([self.inner, self.inner + 2 * self.groups * self.state_dim, self.heads], -1)
        return z, mixed, F.softplus(_wide(dt) + _wide(self.dt_bias))

    def _output(self, y: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
        gated = _wide(y.flatten(2)) * F.silu(_wide(z))  # RMSNorm(y ⊙ silu(z)), per group (norm_before_gate=False)
        grouped = gated.unflatten(-1, (self.groups, -1))
        normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return self.out_proj((normed.flatten(2) * _wide(self.norm_weight)).to(dtype))

    def decode_step(self, x: Tensor, positions: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One token per row as tensor operations only (:mod:`scaleformer.compiled_decoding`): x (B, 1, C)
        continuing ``state`` = (conv, SSM state), a :class:`Mamba2State`'s fields -> (output (B, 1, C), the
        next state); the forward's own arithmetic with a cache and no padding."""
        held = Mamba2State(*state)
        z, mixed, delta = self._inputs(x)
        y = self._mix(mixed, delta, None, held, "recurrent")
        return self._output(y, z, x.dtype), (held.conv, held.state)

    def empty_decode_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(conv, SSM state) zeros: what the convolution and the recurrence start from when given none."""
        channels = self.conv_weight.shape[0]
        return (torch.zeros(batch, self.conv_size - 1, channels, dtype=dtype, device=device),
                torch.zeros(batch, self.heads, self.state_dim, self.head_dim,
                            dtype=torch.promote_types(dtype, torch.float32), device=device))

    def _mix(self, mixed: Tensor, delta: Tensor, mask: Tensor | None, cache: Mamba2State | None,
             form: str | None, sequence_group: Any = None, history: Tensor | None = None) -> Tensor:
        """(B, T, channels) convolution inputs and Δ (B, T, H) -> y (B, T, H, P); ``sequence_group`` and
        ``history`` as :func:`~scaleformer.layers.delta_net.context_parallel_split` gives them."""
        t = mixed.shape[1]
        convolved = F.silu(short_convolution(mixed, self.conv_weight, mask, cache, history) + self.conv_bias)
        inputs, keys, queries = convolved.split([self.inner, self.groups * self.state_dim,
                                                 self.groups * self.state_dim], -1)
        inputs = inputs.unflatten(-1, (self.heads, self.head_dim))  # x (B, T, H, P)
        per_group = self.heads // self.groups  # head h reads group ⌊h / (H/G)⌋ of B and C
        keys, queries = (z.unflatten(-1, (self.groups, self.state_dim)).repeat_interleave(per_group, dim=2)
                         for z in (keys, queries))  # B, C (B, T, H, N)
        decay = delta * -_wide(self.A_log).exp()  # log a_t = Δ_t A_h ≤ 0
        values = _wide(inputs) * delta[..., None]  # Δ_t x_t
        chosen = form or ("recurrent" if t == 1 else "chunkwise")
        work = values.dtype
        y, state = retention(*(_wide(z).to(work).transpose(1, 2) for z in (queries, keys)), values.transpose(1, 2),
                             log_decay=decay.transpose(1, 2), form=chosen, chunk_size=self.chunk_size, mask=mask,
                             initial_state=cache.state if cache is not None else None,
                             output_final_state=cache is not None,
                             backend=self.backend if chosen == "chunkwise" else "torch",
                             sequence_group=sequence_group)
        if cache is not None:
            cache.state = state
        y = y.transpose(1, 2) + _wide(inputs) * _wide(self.D)[:, None]  # the D skip
        return y.to(mixed.dtype)


@config
class Mamba2(MixerConfig):
    """Mamba-2's SSD layer (arXiv 2405.21060): causal; its own positions (the order of its decays). Heads of
    ``head_dim`` over expand · embed_dim channels, B and C in ``groups`` of ``state_dim``."""

    kind: ClassVar[str] = "mamba2"
    TITLE: ClassVar[str] = "Mamba-2"
    #: N: the state per head and channel (mamba_ssm: 128; mamba2_simple: 64)
    state_dim: int = 128
    #: P: channels per head (H = expand · embed_dim / P)
    head_dim: int = 64
    expand: int = 2
    #: G: groups of B and C shared by H / G heads each
    groups: int = 1
    conv_size: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5
    #: how the chunkwise form runs: "torch" (the retention op's PyTorch forms) or "triton" (its kernels)
    backend: Literal["torch", "triton"] = "torch"

    def _validate(self) -> None:
        check_positive(self, "state_dim", "head_dim", "expand", "groups", "conv_size", "chunk_size")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def support(self) -> MixerSupport:
        # causal; its gated norm in place of Sub-LN's; no per-modality copies; positions from its decays
        return MixerSupport(bidirectional=False, inner_norm=False, multiway=False, model_positions=False,
                            relative_bias=False, forms=RECURRENT_FORMS)

    def check_model(self, model: ConfigBase) -> None:
        inner = self.expand * model.embed_dim  # type: ignore[attr-defined]
        if inner % self.head_dim:
            raise ConfigError(f"head_dim ({self.head_dim}) must divide expand × embed_dim ({inner})")
        if (inner // self.head_dim) % self.groups:
            raise ConfigError(f"groups ({self.groups}) must divide the heads ({inner // self.head_dim})")

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        small = cls(state_dim=4, head_dim=8, chunk_size=3)
        return {"mamba2": (small, small), "groups": (cls(state_dim=4, head_dim=4, groups=2, chunk_size=3),) * 2,
                "hybrid-with-window": (small, MixerConfig.named("attention")(heads=2, window=4), small)}

    def build(self, model: ConfigBase, *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> Mamba2Layer:
        return Mamba2Layer(model.embed_dim, self)  # type: ignore[attr-defined]
