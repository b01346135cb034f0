"""Multiway (BEiT-3 / VLMo): modality-specific copies of a token-wise module.

Each token is routed to copy ``way_ids[b, t]``; every copy is used in the forward pass on its own
tokens and receives gradients only from them. Only token-wise modules (norms, FFNs) may be wrapped:
the routing gathers tokens of one way from the whole batch.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

__all__ = ["Multiway", "per_way"]


def per_way(make: Callable[[], nn.Module], ways: int) -> nn.Module:
    """``make()`` itself for one way; a :class:`Multiway` of ``ways`` copies otherwise (opt-in wrapper only,
    so a model without modalities has no ``ways.0`` in its parameter names)."""
    return make() if ways == 1 else Multiway(make, ways)


class Multiway(nn.Module):
    @staticmethod
    def apply(module: nn.Module, x: Tensor, way_ids: Tensor | None) -> Tensor:
        """``module(x)``, routed by ``way_ids`` when ``module`` is a Multiway."""
        return module(x, way_ids) if isinstance(module, Multiway) else module(x)

    def __init__(self, make: Callable[[], nn.Module], ways: int) -> None:
        super().__init__()
        self.ways = nn.ModuleList([make() for _ in range(ways)])

    def forward(self, x: Tensor, way_ids: Tensor | None = None) -> Tensor:
        """x (B, T, C), way_ids (B, T) long in [0, ways); None routes every token to copy 0."""
        if len(self.ways) == 1 or way_ids is None:
            return self.ways[0](x)
        out = None
        for way, module in enumerate(self.ways):
            selected = way_ids == way
            routed = module(x[selected])  # (N_way, C)
            if out is None:
                out = x.new_zeros((*x.shape[:-1], routed.shape[-1]))
            out = out.index_put((selected,), routed)
        assert out is not None
        return out
