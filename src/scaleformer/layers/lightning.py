"""TransNormerLLM's token mixer (arXiv 2307.14995): linear attention with a constant decay per head, as
Lightning Attention computes it — on the retention op, whose chunkwise form is Lightning's blockwise
algorithm (intra-block (q kᵀ ⊙ M) v, inter-block q · KV with the decayed state).

    q = SiLU(x W_q), k = SiLU(x W_k), v = x W_v, u = x W_u
    o_t = Σ_{s≤t} λ_h^{t−s} (q_t · k_s) v_s            (per head; no normaliser, no key scaling)
    out = W_o (u ⊙ SRMSNorm(o))                         (SRMSNorm: x / rms(x), no learned scale)

This is TransNormerLLM's released code (OpenNLPLab): q and k through SiLU, v and the gate u linear, the
norm over the whole width. The decay of head h in layer l of L follows one of the field's three formulas
(:func:`lightning_log_decays`); the default is that code's, which its released checkpoints use.

Shapes: B batch, T length, C width, H heads, D = C / H head width.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.cache import RetentionState
from scaleformer.config import ConfigBase, ConfigError, check_choice, config
from scaleformer.layers.context import Context, DocumentRows
from scaleformer.layers.norms import RMSNorm
from scaleformer.mixer import RECURRENT_FORMS, MixerConfig, MixerSupport
from scaleformer.ops.retention import retention

__all__ = ["Lightning", "LightningAttention", "lightning_log_decays", "DECAY_FORMULAS"]

DECAY_FORMULAS = ("code", "paper", "fla")


def lightning_log_decays(heads: int, layer: int, layers: int, formula: str = "code") -> Tensor:
    """log λ_h (H,) float64 for layer ``layer`` (0-based) of ``layers``.

    - "code" (OpenNLPLab's TransNormerLLM): ALiBi slopes s_h = 2^(−8h/H), h = 1..H (for H a power of two;
      otherwise ALiBi's interleaved extension), times 1 − l/(L − 1) + 1e-5; log λ_h = −s_h · that.
    - "paper" (arXiv 2307.14995 §3.1): log λ_h = −(8h/H)·(1 − l/L), h = 1..H.
    - "fla" (flash-linear-attention's TransNormer setting): log λ_h = −(8/H)·(1 − l/L)·h, h = 0..H−1, so
      head 0 does not decay.
    """
    check_choice(formula, DECAY_FORMULAS, "lightning decay formula")
    index = torch.arange(heads, dtype=torch.float64)
    if formula == "code":
        depth = 1 - layer / (layers - 1) + 1e-5 if layers > 1 else 1 + 1e-5
        return -_alibi_slopes(heads) * depth
    if formula == "paper":
        return -(8 * (index + 1) / heads) * (1 - layer / layers)
    return -(8 / heads) * (1 - layer / layers) * index


def _alibi_slopes(heads: int) -> Tensor:
    """ALiBi's head slopes: 2^(−8h/n) for n = H a power of two; else the closest power of two below, then
    every other slope of twice as many heads."""
    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]
    if math.log2(heads).is_integer():
        slopes = power_of_two(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


class LightningAttention(nn.Module):
    """TransNormerLLM's gated linear attention with per-head decays (see the module docstring).

    Args:
        embed_dim, heads: width C and heads H.
        layer, layers, decay: this layer's index (0-based) among ``layers``, and the decay formula
            (:func:`lightning_log_decays`).
        chunk_size: block length of the chunkwise (Lightning) form.
        norm_eps: epsilon of the SRMSNorm.
        bias: biases on the projections (TransNormerLLM: none).
        gain: DeepNorm β: multiplies the value and output projections' initialisation.
    """

    def __init__(self, embed_dim: int, spec: "Lightning", *, layer: int = 0, layers: int = 1,
                 gain: float = 1.0) -> None:
        """``spec``: the layer's :class:`~scaleformer.models.architecture.Lightning` config (checked there);
        ``layer`` of ``layers``: where it sits in the stack (its decays depend on it); ``gain``: DeepNorm's β."""
        super().__init__()
        heads, decay, bias, norm_eps = spec.heads, spec.decay, spec.bias, spec.norm_eps
        self.heads, self.chunk_size = heads, spec.chunk_size
        # The decays are recomputed per call (H numbers) rather than stored, so casting the module cannot
        # round them and checkpoints hold weights only.
        self.decay_schedule = (heads, layer, layers, decay)
        self.q_proj, self.k_proj, self.v_proj, self.u_proj = (nn.Linear(embed_dim, embed_dim, bias=bias)
                                                              for _ in range(4))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.norm = RMSNorm(embed_dim, eps=norm_eps, affine=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.u_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2) if proj is not self.out_proj else 1.0)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        with torch.no_grad():
            self.v_proj.weight.mul_(gain)
            self.out_proj.weight.mul_(gain)

    def _split(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, D)
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def new_state(self) -> RetentionState:
        """This layer's decoding state: one fixed-size state per head, whatever the context."""
        return RetentionState()

    def forward(self, x: Tensor, ctx: Context, cache: RetentionState | None = None) -> Tensor:
        """As a Block's mixer: x (B, T, C) -> (B, T, C) in ``ctx.form`` (default: chunkwise for several tokens,
        recurrent for one), continuing and updating ``cache``'s state; packed documents start empty."""
        form = ctx.form or ("recurrent" if x.shape[1] == 1 else "chunkwise")
        if ctx.document_ids is not None:
            documents = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
            out, _ = self.mix(documents.gather(x), mask=documents.valid, form=form,
                              sequence_group=ctx.recurrence_group(documents))
            return documents.scatter(out, x.shape[1])
        out, state = self.mix(x, mask=ctx.token_mask, form=form, state=cache.state if cache is not None else None,
                              output_final_state=cache is not None, sequence_group=ctx.sequence_group)
        if cache is not None:
            cache.update(state)
        return out

    def empty_decode_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor]:
        """The state of a layer that has read nothing (:mod:`scaleformer.compiled_decoding`): zeros (B, H, D, D),
        which the first step decays and adds to exactly as it does no state."""
        width = self.q_proj.out_features // self.heads
        return (torch.zeros(batch, self.heads, width, width, dtype=torch.promote_types(dtype, torch.float32),
                            device=device),)

    def decode_step(self, x: Tensor, positions: Tensor, state: tuple[Tensor]) -> tuple[Tensor, tuple[Tensor]]:
        """One token per row as tensor operations only (:mod:`scaleformer.compiled_decoding`): x (B, 1, C)
        continuing ``state`` (a :class:`RetentionState`'s field) -> (output, the next state); :meth:`mix`
        itself, recurrent (positions are not read: the decays order the tokens)."""
        out, new_state = self.mix(x, form="recurrent", state=state[0], output_final_state=True)
        return out, (new_state,)

    def mix(self, x: Tensor, *, mask: Tensor | None = None, form: str = "chunkwise", state: Tensor | None = None,
            output_final_state: bool = False, sequence_group: Any = None) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C), mask (B, T) bool, state (B, H, D, D) -> (out (B, T, C), the state after the last step)."""
        q, k = self._split(F.silu(self.q_proj(x))), self._split(F.silu(self.k_proj(x)))
        v = self._split(self.v_proj(x))
        log_decay = lightning_log_decays(*self.decay_schedule).to(x.device, torch.promote_types(x.dtype, torch.float32))
        o, state = retention(q, k, v, log_decay=log_decay,
                             form=form, chunk_size=self.chunk_size, mask=mask, initial_state=state,
                             output_final_state=output_final_state, sequence_group=sequence_group)
        o = self.norm(o.transpose(1, 2).flatten(2))
        return self.out_proj(self.u_proj(x) * o), state


# The layer's config: one member of the mixer union (it registers itself by its kind).

@config
class Lightning(MixerConfig):
    """TransNormerLLM's linear attention with a constant decay per head (Lightning Attention; causal): SiLU
    queries and keys, a linear output gate, SRMSNorm. The decay of head h in layer l of the stack follows
    ``decay``: "code" (OpenNLPLab's released code and checkpoints), "paper" or "fla" (see
    :func:`~scaleformer.layers.lightning.lightning_log_decays`)."""

    kind: ClassVar[str] = "lightning"
    TITLE: ClassVar[str] = "lightning attention"
    heads: int = 8
    decay: Literal["code", "paper", "fla"] = "code"
    chunk_size: int = 64
    norm_eps: float = 1e-6
    bias: bool = False

    def _validate(self) -> None:
        _require(self.heads >= 1, f"heads must be >= 1, got {self.heads}")
        _require(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        _require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def support(self) -> MixerSupport:
        # causal; its own SRMSNorm in place of Sub-LN's; no per-modality copies; positions from its decay
        return MixerSupport(bidirectional=False, inner_norm=False, multiway=False, model_positions=False,
                            relative_bias=False, forms=RECURRENT_FORMS)

    def check_model(self, model: ConfigBase) -> None:
        _require(model.embed_dim % self.heads == 0,
                 f"lightning heads ({self.heads}) must divide embed_dim ({model.embed_dim})")

    @classmethod
    def examples(cls) -> dict[str, tuple[MixerConfig, ...]]:
        return {"lightning": (cls(heads=2, chunk_size=3),) * 2}

    def build(self, model: ConfigBase, *, gain: float, inner_norm: bool = False, ways: int = 1,
              depth: int = 1) -> LightningAttention:
        return LightningAttention(model.embed_dim, self, layer=depth - 1, layers=len(model.layers), gain=gain)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
