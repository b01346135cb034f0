"""DeltaNet and Gated DeltaNet as mixers: their configs and their layer, in this one file (the mixer
contract needs nothing else: the model finds the configs, asks the layer for its state, and the
conformance suite runs their examples).

The layer (fla's and Qwen3-Next's published parts): q, k, v projections, each through a short causal
depthwise convolution with SiLU; q and k L2-normalised per head; β = sigmoid(W_β x); for Gated DeltaNet the
Mamba-2-style decay g = −exp(A_log) · softplus(W_a x + dt_bias) (in float32); the delta rule
(:mod:`scaleformer.ops.delta_rule`); a per-head RMSNorm of the output, gated by silu(W_g x) for Gated
DeltaNet; the output projection. ``value_heads`` may be a multiple of ``heads`` (Qwen3-Next's grouped value
heads: value head j reads key head ⌊j·heads/value_heads⌋).

Its decoding state is one :class:`DeltaState`: the convolutions' last ``conv_size − 1`` inputs and the
delta rule's state. Padding and packed documents are exact: padded inputs are zeroed before the
convolution (a left-padded row sees what an unpadded one sees: nothing before its first token), and a
packed row is run one document per row.

Shapes: B batch, T length, C model width, H key heads, H_v value heads, K key dim, V value dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.config import ConfigBase, ConfigError, check_positive, config
from scaleformer.layers.context import Context, DocumentRows
from scaleformer.mixer import MixerConfig, MixerSupport
from scaleformer.ops.delta_rule import delta_rule

__all__ = ["DeltaNet", "GatedDeltaNet", "DeltaNetLayer", "DeltaState", "short_convolution"]


@dataclass
class DeltaState:
    """A delta-rule layer's decoding state: the short convolutions' last inputs (B, conv_size − 1, channels)
    and the delta rule's state (B, H_v, K, V), float32 at least. Fixed size, whatever the context."""

    holds_keys: ClassVar[bool] = False
    conv: Tensor | None = None
    state: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        self.conv = None if self.conv is None else self.conv.index_select(0, index)
        self.state = None if self.state is None else self.state.index_select(0, index)

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.conv, self.state) if x is not None)


class DeltaNetLayer(nn.Module):
    """out = W_O · norm(delta_rule(L2(silu(conv q)), L2(silu(conv k)), silu(conv v), β, g)), see the module
    docstring. ``gated``: Gated DeltaNet (decays, and the output norm gated by silu(W_g x))."""

    def __init__(self, embed_dim: int, spec: "DeltaNet", *, gated: bool) -> None:
        super().__init__()
        self.heads, self.value_heads, self.gated = spec.heads, spec.value_heads or spec.heads, gated
        self.key_dim, self.value_dim = spec.key_dim, spec.value_dim
        self.conv_size, self.chunk_size, self.backend = spec.conv_size, spec.chunk_size, spec.backend
        key_width, value_width = self.heads * self.key_dim, self.value_heads * self.value_dim
        self.q_proj, self.k_proj = (nn.Linear(embed_dim, key_width, bias=False) for _ in range(2))
        self.v_proj = nn.Linear(embed_dim, value_width, bias=False)
        self.b_proj = nn.Linear(embed_dim, self.value_heads, bias=False)
        channels = 2 * key_width + value_width
        self.conv_weight = nn.Parameter(torch.empty(channels, spec.conv_size))  # depthwise, causal, no bias
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(spec.conv_size), 1 / math.sqrt(spec.conv_size))
        if gated:
            self.a_proj = nn.Linear(embed_dim, self.value_heads, bias=False)
            self.g_proj = nn.Linear(embed_dim, value_width, bias=False)
            # fla's initialisation: A ~ U(0, 16), dt ~ exp(U(log 1e-3, log 1e-1)) ≥ 1e-4, dt_bias = softplus⁻¹(dt)
            self.A_log = nn.Parameter(torch.empty(self.value_heads).uniform_(1e-4, 16).log())
            dt = torch.exp(torch.empty(self.value_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm_weight = nn.Parameter(torch.ones(self.value_dim))
        self.norm_eps = spec.norm_eps
        self.out_proj = nn.Linear(value_width, embed_dim, bias=False)

    def new_state(self) -> DeltaState:
        return DeltaState()

    def forward(self, x: Tensor, ctx: Context, cache: DeltaState | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C), continuing and updating ``cache`` when given."""
        mixed, beta, decay = self._inputs(x)
        mask = ctx.token_mask
        if ctx.document_ids is not None:  # one document per row: its convolution and state start empty
            rows = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
            split = context_parallel_split(mixed, self.conv_weight.shape[1], ctx, rows)
            out = self._mix(*(rows.gather(t) if t is not None else None for t in (mixed, beta, decay)),
                            rows.valid, None, ctx.form, *split)
            out = rows.scatter(out, x.shape[1])
        else:
            out = self._mix(mixed, beta, decay, mask, cache, ctx.form,
                            *context_parallel_split(mixed, self.conv_weight.shape[1], ctx))
        return self.out_proj(self._norm(out, x).flatten(2))

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """The convolution's inputs (B, T, channels), β (B, T, H_v) and the gated log decays (or None)."""
        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)
        beta = torch.sigmoid(_wide(self.b_proj(x)))
        decay = (-_wide(self.A_log).exp() * F.softplus(_wide(self.a_proj(x)) + _wide(self.dt_bias))
                 if self.gated else None)
        return mixed, beta, decay

    def decode_step(self, x: Tensor, positions: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One token per row as tensor operations only (:mod:`scaleformer.compiled_decoding`): x (B, 1, C)
        continuing ``state`` = (conv, state), a :class:`DeltaState`'s fields -> (output (B, 1, C), the next
        state). The forward's own arithmetic with a cache and no padding (positions are not read: the
        convolution and the decays order the tokens)."""
        held = DeltaState(*state)
        mixed, beta, decay = self._inputs(x)
        out = self._mix(mixed, beta, decay, None, held, "recurrent")
        return self.out_proj(self._norm(out, x).flatten(2)), (held.conv, held.state)

    def empty_decode_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(conv, state) of a layer that has read nothing, for inputs of ``dtype``: zeros, which is what the
        convolution and the delta rule start from when given none (bit for bit the same step)."""
        channels = self.conv_weight.shape[0]
        return (torch.zeros(batch, self.conv_size - 1, channels, dtype=dtype, device=device),
                torch.zeros(batch, self.value_heads, self.key_dim, self.value_dim,
                            dtype=torch.promote_types(dtype, torch.float32), device=device))

    def _mix(self, mixed: Tensor, beta: Tensor, decay: Tensor | None, mask: Tensor | None,
             cache: DeltaState | None, form: str | None, sequence_group: Any = None,
             history: Tensor | None = None) -> Tensor:
        """(B, T, channels) projected inputs -> (B, T, H_v, V) delta-rule outputs; ``sequence_group`` and
        ``history`` as :func:`context_parallel_split` gives them."""
        t = mixed.shape[1]
        convolved = F.silu(short_convolution(mixed, self.conv_weight, mask, cache, history))
        key_width = self.heads * self.key_dim
        q, k, v = convolved.split([key_width, key_width, self.value_heads * self.value_dim], -1)
        q, k = (_l2(z.unflatten(-1, (self.heads, self.key_dim))) for z in (q, k))  # (B, T, H, K)
        group = self.value_heads // self.heads
        q, k = (z.repeat_interleave(group, dim=2) for z in (q, k))  # (B, T, H_v, K)
        v = v.unflatten(-1, (self.value_heads, self.value_dim))
        chosen = form if form in ("chunkwise", "recurrent") else ("recurrent" if t == 1 else "chunkwise")
        out, state = delta_rule(*(z.transpose(1, 2) for z in (q, k, v)), beta.transpose(1, 2),
                                log_decay=None if decay is None else decay.transpose(1, 2), form=chosen,
                                chunk_size=self.chunk_size, mask=mask,
                                initial_state=cache.state if cache is not None else None,
                                output_final_state=cache is not None,
                                backend=self.backend if chosen == "chunkwise" else "torch",
                                sequence_group=sequence_group)
        if cache is not None:
            cache.state = state
        return out.transpose(1, 2)  # (B, T, H_v, V)

    def _norm(self, out: Tensor, x: Tensor) -> Tensor:
        """Per-head RMSNorm over V (float32 sums), gated by silu(W_g x) for Gated DeltaNet."""
        wide = _wide(out)
        normed = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.norm_eps) * _wide(self.norm_weight))
        normed = normed.to(out.dtype)
        if self.gated:
            normed = normed * F.silu(self.g_proj(x).unflatten(-1, (self.value_heads, self.value_dim)))
        return normed


def context_parallel_split(mixed: Tensor, width: int, ctx: Context,
                    rows: DocumentRows | None = None) -> tuple[Any, Tensor | None]:
    """What a convolution-then-recurrence layer (the delta rule's, Mamba-2's) passes on under context
    parallelism, for its inputs ``mixed`` (B, T, channels), whole rows or laid out as ``rows``: the op's
    ``sequence_group`` (the group, or the :class:`~scaleformer.parallel.context.DocumentSplit` of the rows)
    and the convolution's history (the previous rank's last width − 1 inputs). (None, None) in one process."""
    if ctx.sequence_group is None:
        return None, None
    from scaleformer.parallel.context import convolution_halo

    real = mixed if ctx.token_mask is None else mixed * ctx.token_mask[..., None].to(mixed.dtype)
    history = convolution_halo(real, width, ctx, rows) if width > 1 else None
    return ctx.recurrence_group(rows), history


def short_convolution(x: Tensor, weight: Tensor, mask: Tensor | None, cache: DeltaState | None,
                      history: Tensor | None = None) -> Tensor:
    """x (B, T, channels) through a causal depthwise convolution of ``weight`` (channels, width), continuing
    the inputs ``cache.conv`` holds (zeros before a sequence's start) and keeping the last width − 1 there.
    Padded inputs (``mask`` False) are zeroed first: a left-padded row sees what an unpadded one sees.
    ``history`` (B, width − 1, channels): the inputs before these instead (another rank's, under context
    parallelism)."""
    width = weight.shape[1]
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    if history is None:
        history = (cache.conv if cache is not None and cache.conv is not None
                   else x.new_zeros(x.shape[0], width - 1, x.shape[-1]))
    window = torch.cat([history.to(x.dtype), x], 1)  # (B, width − 1 + T, channels)
    if cache is not None:
        cache.conv = window[:, -(width - 1):].detach() if width > 1 else window[:, :0]
    t = x.shape[1]
    return sum(window[:, i:i + t] * weight[:, i] for i in range(width))


def _wide(x: Tensor) -> Tensor:
    """x in float32 at least (float64 stays float64): decays, β and norms of half-precision inputs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _l2(x: Tensor) -> Tensor:
    """x · rsqrt(Σx² + 1e-6) over the last dim, in float32 at least (fla's l2norm; bf16 needs the fp32 sum)."""
    wide = _wide(x)
    return (wide * torch.rsqrt(wide.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


@config
class DeltaNet(MixerConfig):
    """DeltaNet (arXiv 2406.06484): linear attention whose state is corrected by the delta rule,
    S_t = S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ. Causal; its own positions (the order of writes)."""

    kind: ClassVar[str] = "deltanet"
    TITLE: ClassVar[str] = "DeltaNet"
    heads: int = 4
    #: value heads H_v (a multiple of heads; None = heads): Qwen3-Next's grouped value heads
    value_heads: int | None = None
    key_dim: int = 64
    value_dim: int = 64
    #: the short causal depthwise convolution's width (fla: 4)
    conv_size: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5
    #: how the chunkwise form runs: "torch" (the PyTorch form, the reference) or "triton" (Triton kernels,
    #: forward and backward, ops/delta_rule_triton.py; CUDA, or the CPU under TRITON_INTERPRET=1); decoding
    #: steps run the recurrent form either way
    backend: Literal["torch", "triton"] = "torch"

    def _validate(self) -> None:
        check_positive(self, "heads", "key_dim", "value_dim", "conv_size", "chunk_size")
        if self.value_heads is not None and (self.value_heads < self.heads or self.value_heads % self.heads):
            raise ConfigError(f"value_heads ({self.value_heads}) must be a multiple of heads ({self.heads})")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def support(self) -> MixerSupport:
        return MixerSupport(bidirectional=False, inner_norm=False, multiway=False, model_positions=False,
                            relative_bias=False, forms=("chunkwise", "recurrent"))

    def build(self, model: ConfigBase, *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> DeltaNetLayer:
        return DeltaNetLayer(model.embed_dim, self, gated=False)

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        small = cls(heads=2, key_dim=4, value_dim=6, chunk_size=3)
        return {"deltanet": (small, small), "grouped-values": (small.replace(value_heads=4),) * 2}


@config
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (arXiv 2412.06464; Qwen3-Next's linear layers): the delta rule with a per-token decay,
    S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, and an output gate."""

    kind: ClassVar[str] = "gated_deltanet"
    TITLE: ClassVar[str] = "Gated DeltaNet"

    def build(self, model: ConfigBase, *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> DeltaNetLayer:
        return DeltaNetLayer(model.embed_dim, self, gated=True)

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        small = cls(heads=2, key_dim=4, value_dim=6, chunk_size=3)
        return {"gated_deltanet": (small, small), "grouped-values": (small.replace(value_heads=4),) * 2,
                "hybrid-3-to-1": (small, small, small, MixerConfig.named("attention")(heads=2, kv_heads=1)),
                "yoco-self-decoder": (small, small) + (MixerConfig.named("cross_decoder")(heads=2, kv_heads=1),) * 2}
