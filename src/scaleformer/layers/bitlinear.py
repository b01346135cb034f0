"""BitNet b1.58 (arXiv 2402.17764): linear layers with ternary weights and 8-bit activations.

Training keeps full-precision latent weights and quantises in the forward pass; the straight-through
estimator passes gradients through both quantisers as if they were the identity.

    weights, per tensor:    s_w = mean|W|,        W_q = clamp(round(W / s_w), −1, 1) · s_w
    activations, per token: s_x = max|x| / 127,   x_q = clamp(round(x / s_x), −128, 127) · s_x
    BitLinear(x) = x_q(RMSNorm(x)) W_qᵀ + b      (RMSNorm without a learned scale, before quantising)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.layers.norms import RMSNorm

__all__ = ["BitLinear", "ternary_weights", "int8_activations", "quantised_input", "quantised_weight", "to_bitlinear"]

EPS = 1e-5  # floor of both scales: an all-zero weight matrix or token stays zero instead of dividing by 0


def ternary_weights(weight: Tensor, per_matrix: bool = False) -> tuple[Tensor, Tensor]:
    """(codes in {−1, 0, 1} as the weight's dtype, scale s_w = mean|W|): W_q = codes · s_w. ``per_matrix``:
    a stack of matrices (E, in, out), as MoE experts hold them, gets one scale per matrix, (E, 1, 1)."""
    magnitude = weight.abs().mean(dim=(-2, -1), keepdim=True) if per_matrix else weight.abs().mean()
    scale = magnitude.clamp(min=EPS)
    return (weight / scale).round().clamp(-1, 1), scale


def int8_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes in [−128, 127] as x's dtype, per-token scale s_x = max|x| / 127 (..., 1)): x_q = codes · s_x."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / 127
    return (x / scale).round().clamp(-128, 127), scale


def _straight_through(x: Tensor, quantised: Tensor) -> Tensor:
    """``quantised`` in the forward pass, the identity's gradient in the backward pass."""
    return x + (quantised - x).detach()


def quantised_input(x: Tensor, norm: nn.Module) -> Tensor:
    """What a BitLinear multiplies: ``norm(x)`` quantised to 8 bits per token, with a straight-through gradient."""
    x = norm(x)
    codes, scale = int8_activations(x)
    return _straight_through(x, codes * scale)


def quantised_weight(weight: Tensor, per_matrix: bool = False) -> Tensor:
    """The ternary weight W_q, with a straight-through gradient to the latent weight."""
    codes, scale = ternary_weights(weight, per_matrix)
    return _straight_through(weight, codes * scale)


class BitLinear(nn.Linear):
    """A drop-in ``nn.Linear`` that trains BitNet b1.58's way (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.input_norm = RMSNorm(in_features, eps=norm_eps, affine=False)

    def quantised_weight(self) -> Tensor:
        codes, scale = ternary_weights(self.weight)
        return codes * scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(quantised_input(x, self.input_norm), quantised_weight(self.weight), self.bias)


def to_bitlinear(module: nn.Module, *, skip: frozenset[str] = frozenset()) -> nn.Module:
    """``module`` with every ``nn.Linear`` below it (not those named in ``skip``) replaced by a BitLinear
    holding the same weight and bias."""
    for name, child in module.named_children():
        if name in skip:
            continue
        if type(child) is nn.Linear:
            replacement = BitLinear(child.in_features, child.out_features, bias=child.bias is not None)
            replacement.to(device=child.weight.device, dtype=child.weight.dtype)
            replacement.weight, replacement.bias = child.weight, child.bias
            setattr(module, name, replacement)
        else:
            to_bitlinear(child, skip=skip)
    return module
