"""DeepNorm (DeepNet, arXiv 2203.00555) and Sub-LN (Magneto, arXiv 2210.06423) constants.

Both schemes multiply, after Xavier initialization, exactly the FFN weights and the value and output
projections of attention by a gain (DeepNet's β, Magneto's γ); query and key projections keep gain 1.
DeepNorm also up-weights the residual: x_{l+1} = LN(α·x_l + G_l(x_l)).

N = encoder layers, M = decoder layers.

| scheme   | side                  | α                  | gain                          |
|----------|-----------------------|--------------------|-------------------------------|
| deepnorm | encoder-only          | (2N)^(1/4)         | β = (8N)^(-1/4)               |
| deepnorm | decoder-only          | (2M)^(1/4)         | β = (8M)^(-1/4)               |
| deepnorm | enc-dec, encoder      | 0.81 (N⁴M)^(1/16)  | β = 0.87 (N⁴M)^(-1/16)        |
| deepnorm | enc-dec, decoder      | (3M)^(1/4)         | β = (12M)^(-1/4)              |
| subln    | encoder-only          | 1                  | γ = sqrt(log 2N)              |
| subln    | decoder-only          | 1                  | γ = sqrt(log 2M)              |
| subln    | enc-dec, encoder      | 1                  | γ = sqrt(log(3M) log(2N) / 3) |
| subln    | enc-dec, decoder      | 1                  | γ = sqrt(log 3M)              |

Cross-attention: DeepNorm treats it like any other sublayer (its value and output projections get β);
Magneto gives it only the input norm and no rescaling (gain 1). The encoder side of an encoder-decoder
follows the paper (0.81, 0.87), not TorchScale's `/ 1.15` variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["ResidualScaling", "residual_scaling"]


@dataclass(frozen=True)
class ResidualScaling:
    alpha: float  # residual multiplier
    gain: float  # init multiplier for FFN weights and self-attention value/output projections
    cross_gain: float  # the same for cross-attention value/output projections


def residual_scaling(norm: str, side: Literal["encoder", "decoder"], arch: str,
                     encoder_layers: int, decoder_layers: int) -> ResidualScaling:
    """α and gains for one side (``"encoder"`` or ``"decoder"``) of a model with the given arch."""
    n, m = encoder_layers, decoder_layers
    if norm == "deepnorm":
        if arch == "encoder_decoder":
            if side == "encoder":
                alpha, beta = 0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)
            else:
                alpha, beta = (3 * m) ** 0.25, (12 * m) ** -0.25
        else:
            layers = n if side == "encoder" else m
            alpha, beta = (2 * layers) ** 0.25, (8 * layers) ** -0.25
        return ResidualScaling(alpha=alpha, gain=beta, cross_gain=beta)
    if norm == "subln":
        if arch == "encoder_decoder":
            gamma = math.sqrt(math.log(3 * m) * math.log(2 * n) / 3) if side == "encoder" else math.sqrt(math.log(3 * m))
        else:
            gamma = math.sqrt(math.log(2 * (n if side == "encoder" else m)))
        return ResidualScaling(alpha=1.0, gain=gamma, cross_gain=1.0)
    return ResidualScaling(alpha=1.0, gain=1.0, cross_gain=1.0)
