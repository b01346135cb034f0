"""Position information: learned absolute, sinusoidal, RoPE, xPos and T5-style relative bias.

Every module takes explicit integer ``positions`` (B, T) rather than assuming 0..T-1, so the same code
serves a full forward, a left-padded batch (positions count real tokens only) and cached decoding
(positions continue from the cache).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scaleformer.config import check_choice

__all__ = ["LearnedPositions", "sinusoidal_positions", "Rotary", "RelativePositionBias", "relative_position_bucket"]


class LearnedPositions(nn.Module):
    """A learned table of ``max_positions`` position vectors."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max_positions, dim)
        nn.init.normal_(self.table.weight, std=dim**-0.5)

    def forward(self, positions: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        return self.table(positions)


def sinusoidal_positions(positions: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed sinusoids (B, T) -> (B, T, dim): [sin(p·ω_i) | cos(p·ω_i)], ω_i = 10000^(-i/(dim/2 - 1))."""
    half = dim // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float64) * -step)
    angles = positions.to(torch.float64)[..., None] * freqs
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        out = torch.nn.functional.pad(out, (0, 1))
    return out.to(dtype)


def real_dtype(phases: Tensor) -> torch.dtype:
    """The real dtype of complex ``phases`` (``phases.real.dtype`` without the op ``.real`` runs)."""
    return torch.float64 if phases.dtype == torch.complex128 else torch.float32


class Rotary(nn.Module):
    """RoPE, or xPos when ``scale_base`` is given, on interleaved channel pairs (2i, 2i+1).

    Pair i at position n is rotated by n·θ_i, θ_i = base^(-2i/D) (the complex-number view of the paper:
    x ↦ x · e^{i n θ}); ``spacing="linspace"`` gives RetNet's θ_i = base^(-i/(D/2 - 1)). xPos (LeX, arXiv 2212.10554) also scales queries by ζ_i^(n/B) and keys by
    ζ_i^(-m/B), ζ_i = (i/(D/2) + 0.4)/1.4, so q·k carries ζ^((n-m)/B): a decay with distance.

    Positions are absolute, not centred on the sequence as TorchScale does: centring depends on the
    current length, which breaks cached decoding (cached keys were scaled with another centre). The
    price: key scales grow like ζ_0^(-m/B) = 3.5^(m/B); in float32 this is finite for m < ~35k with
    B = 512, and the model raises a clear error beyond (see :meth:`max_xpos_position`).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scale_base: float | None = None,
                 spacing: str = "rope", rotated: int | None = None) -> None:
        """``rotated``: partial RoPE (Qwen3-Next, GPT-NeoX's rotary_pct) — only the first ``rotated`` channels
        (an even count) turn, with θ_i = base^(-2i/rotated); the rest pass unchanged. None: all of them."""
        super().__init__()
        assert head_dim % 2 == 0 and (rotated is None or (rotated % 2 == 0 and 0 < rotated <= head_dim)), \
            "validated by the config"
        check_choice(spacing, ("rope", "linspace"), "rotary spacing")
        self.head_dim, self.base, self.scale_base, self.spacing = head_dim, base, scale_base, spacing
        self.rotated = head_dim if rotated is None else rotated
        self._thetas: dict[tuple, Tensor] = {}  # see _theta

    # Frequencies and ζ are float64 (D/2 numbers) kept outside the module's buffers: a buffer would be
    # rounded by `model.half()` / `.to(dtype)` and make positions depend on the cast. θ is kept per device
    # and setting (a decoding step would otherwise rebuild it for every token).
    def _theta(self, device: torch.device) -> Tensor:
        key = (device, self.base, self.head_dim, self.spacing, self.rotated)
        theta = self._thetas.get(key)
        if theta is None:
            half = self.head_dim // 2
            if self.spacing == "linspace":  # RetNet: θ_i = base^(-i/(D/2 - 1)), i.e. linspace(0, 1, D/2) exponents
                theta = self.base ** -torch.linspace(0, 1, half, dtype=torch.float64, device=device)
            else:  # partial RoPE: pairs past the rotated channels get θ = 0, a phase of exactly 1
                turning = self.base ** (-torch.arange(self.rotated // 2, dtype=torch.float64, device=device) * 2
                                        / self.rotated)
                theta = torch.cat([turning, turning.new_zeros(half - self.rotated // 2)])
            self._thetas[key] = theta
        return theta

    def _log_zeta(self, device: torch.device) -> Tensor:
        half = self.head_dim // 2
        return ((torch.arange(half, dtype=torch.float64, device=device) / half + 0.4) / 1.4).log()

    def max_xpos_position(self, dtype: torch.dtype) -> int:
        """Largest position whose xPos key scale is finite in ``dtype`` (with a 2^8 margin for the product)."""
        assert self.scale_base is not None
        limit = math.log(torch.finfo(dtype).max) - 8 * math.log(2)
        return int(limit / -math.log(0.4 / 1.4) * self.scale_base)  # ζ_0 = 0.4/1.4 is the smallest

    def phases(self, positions: Tensor, dtype: torch.dtype, *, is_query: bool = True) -> Tensor:
        """Complex factors (B, 1, T, D/2) for ``positions`` (B, T): e^{i n θ_j}, times the xPos scale, in the
        complex dtype matching x's compute dtype.

        Without xPos they are the same for queries and keys (``is_query`` is then ignored), so one call
        serves both, and every layer of a model that shares positions.
        """
        pos = positions.to(torch.float64)[:, None, :, None]  # (B, 1, T, 1)
        angles = pos * self._theta(positions.device)  # (B, 1, T, D/2)
        magnitude = torch.ones_like(angles) if self.scale_base is None else torch.exp(
            (1.0 if is_query else -1.0) * pos / self.scale_base * self._log_zeta(positions.device))
        compute = torch.promote_types(dtype, torch.float32)
        return torch.polar(magnitude, angles).to(torch.complex128 if compute == torch.float64 else torch.complex64)

    def real_phases(self, positions: Tensor, dtype: torch.dtype, *, is_query: bool = True) -> tuple[Tensor, Tensor]:
        """:meth:`phases` as their real and imaginary parts (B, 1, T, D/2) each, in x's compute dtype: for
        :meth:`rotate_real`, which a compiler turns into code (it generates none for complex views)."""
        pos = positions.to(torch.float64)[:, None, :, None]  # as in phases: float64, rounded once at the end
        angles = pos * self._theta(positions.device)
        compute = torch.promote_types(dtype, torch.float32)
        if self.scale_base is None:
            return angles.cos().to(compute), angles.sin().to(compute)
        magnitude = torch.exp((1.0 if is_query else -1.0) * pos / self.scale_base * self._log_zeta(positions.device))
        return (magnitude * angles.cos()).to(compute), (magnitude * angles.sin()).to(compute)

    @staticmethod
    def rotate_real(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """:meth:`rotate` in real arithmetic: each pair (a, b) -> (a·cos − b·sin, a·sin + b·cos), with
        ``cos``/``sin`` from :meth:`real_phases`; the complex product's value, to rounding."""
        a, b = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)

    @staticmethod
    def rotate(x: Tensor, phases: Tensor) -> Tensor:
        """x (B, H, T, D) with each pair (2i, 2i+1) rotated by ``phases[..., i]``; same dtype as x.

        As a complex product (x_2i + i·x_2i+1)·phase: one kernel forward and one backward, where slicing
        the pairs apart costs several full-size temporaries (and zero-filled gradients) per call.
        """
        pairs = x.to(real_dtype(phases))
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()  # a complex view needs whole (real, imaginary) pairs
        rotated = torch.view_as_complex(pairs.unflatten(-1, (-1, 2))) * phases
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)

    def forward(self, x: Tensor, positions: Tensor, *, is_query: bool) -> Tensor:
        """x (B, H, T, D), positions (B, T) -> x rotated (and xPos-scaled), same shape and dtype."""
        return self.rotate(x, self.phases(positions, x.dtype, is_query=is_query))


def relative_position_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucketing of ``relative = key_position - query_position`` into ``num_buckets`` ids.

    Bidirectional: half the buckets for keys after the query. Each half: exact buckets for small
    distances, then logarithmic buckets up to ``max_distance``, beyond which all share the last.
    Causal: only keys at or before the query are distinguished (later ones share bucket 0).
    """
    bucket = torch.zeros_like(relative)
    distance = -relative  # how far back the key is
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (distance < 0).long() * num_buckets
        distance = distance.abs()
    else:
        distance = distance.clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """T5-style learned scalar bias per (bucket, head), shared by all layers of a stack."""

    def __init__(self, heads: int, *, bidirectional: bool, num_buckets: int, max_distance: int) -> None:
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.table = nn.Embedding(num_buckets, heads)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(B, Tq), (B, Tk) -> bias (B, H, Tq, Tk)."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.table(buckets).permute(0, 3, 1, 2)
