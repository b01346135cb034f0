"""Feed-forward networks: MLP and GLU (SwiGLU with activation="swish"), with Sub-LN's optional inner norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.config import check_choice
from scaleformer.layers.shared_input import project

__all__ = ["FeedForward", "ACTIVATIONS"]

# "none": the identity, for gated units without an activation (TransNormerLLM's SGLU)
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "none": lambda x: x}


class FeedForward(nn.Module):
    """mlp: W2 · [norm] · act(W1 x);   glu: W2 · [norm] · (act(W1 x) ⊙ W3 x).

    Args:
        gain: DeepNorm β / Sub-LN γ, multiplies every Xavier-initialised weight of this FFN.
        inner_norm: Sub-LN's norm on the hidden activations (width ffn_dim), None = none.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, *, kind: str = "mlp", activation: str = "gelu",
                 bias: bool = True, activation_dropout: float = 0.0, inner_norm: nn.Module | None = None,
                 gain: float = 1.0) -> None:
        super().__init__()
        check_choice(kind, ("mlp", "glu"), "FFN kind")
        check_choice(activation, ACTIVATIONS, "activation")
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.gate = nn.Linear(embed_dim, ffn_dim, bias=bias) if kind == "glu" else None
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias)
        self.activation = ACTIVATIONS[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.inner_norm = inner_norm
        self.gain = gain
        self.reset_parameters()

    def linears(self) -> list[nn.Linear]:
        return [m for m in (self.fc1, self.gate, self.fc2) if m is not None]

    def reset_parameters(self) -> None:
        for linear in self.linears():
            nn.init.xavier_uniform_(linear.weight)
            with torch.no_grad():
                linear.weight.mul_(self.gain)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def shared_input_linears(self) -> list[list[nn.Linear]]:
        """A GLU's two input projections (for :func:`scaleformer.runtime.decoding_layout`)."""
        return [] if self.gate is None else [[self.fc1, self.gate]]

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            hidden = self.activation(self.fc1(x))
        else:
            up, gate = project(x, (self.fc1, self.gate))
            hidden = self.activation(up) * gate
        if self.training:  # dropout is the identity in eval mode: no call per decoded token
            hidden = self.activation_dropout(hidden)
        if self.inner_norm is not None:
            hidden = self.inner_norm(hidden)
        return self.fc2(hidden)
