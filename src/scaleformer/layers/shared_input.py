"""Linear layers that read the same input, multiplied as one matrix while decoding.

Why: a decoding step multiplies every weight by a single row, and each product is its own call — the
dispatcher, ``F.linear``'s reshapes, one fork and join of MKL's thread team. A retention layer reads its
input four times (queries, keys, values, gate; five with gated decays) and a GLU feed-forward twice. Inside
:func:`scaleformer.runtime.decoding_layout` those weights are stored side by side in one column-major block
— each weight becomes a view of its columns, so nothing is copied and every other use of the weights
still works — and :func:`project` multiplies a row or two by the whole block once, then splits the result.
A product with one matrix of Σ out columns sums each output over the same inputs as the separate products
do, so the outputs agree with the layers' own to float rounding (the layout's promise), not bit for bit.

Outside the layout, or for more than two rows (a prompt), :func:`project` calls each layer as usual.
Forward hooks on the member layers do not run for the block's product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SharedInputBlock", "project", "BLOCK_ATTRIBUTE", "DECODING_ROWS"]

BLOCK_ATTRIBUTE = "_shared_input_block"  # set on a group's first layer by decoding_layout, removed on leaving
DECODING_ROWS = 2  # the layout's scope: one or two rows (see scaleformer.runtime's docstring)


@dataclass(frozen=True)
class SharedInputBlock:
    """The weights of ``members`` (ids of ``nn.Linear`` layers, in order) as one (Σ out, in) matrix stored
    column-major; ``sizes`` are the members' output widths, ``bias`` their biases end to end (zeros for a
    member without one), None when none has one. The members' weights and biases are views of these, so
    loading new values into them in place reaches the block too."""

    weight: Tensor
    bias: Tensor | None
    sizes: tuple[int, ...]
    members: tuple[int, ...]


def project(x: Tensor, linears: Sequence[nn.Linear]) -> tuple[Tensor, ...]:
    """Each of ``linears`` applied to ``x`` (..., in), in order: one product when the layout placed exactly
    these layers in one block and ``x`` holds at most two rows, else one call per layer."""
    block = linears[0].__dict__.get(BLOCK_ATTRIBUTE)
    if (block is not None and x.numel() <= DECODING_ROWS * x.shape[-1]
            and block.members == tuple(id(linear) for linear in linears)):
        return F.linear(x, block.weight, block.bias).split(block.sizes, dim=-1)
    return tuple(linear(x) for linear in linears)


def lay_out_block(linears: Sequence[nn.Linear]) -> SharedInputBlock | None:
    """Place ``linears``' weights side by side in one column-major block and make each weight a view of its
    columns (the values unchanged); None, touching nothing, when they cannot share one: not plain
    ``nn.Linear`` layers (a subclass may quantize or adapt its weight), inputs of different widths,
    weights that are not contiguous or differ in dtype or device, a column offset that is odd (a rotation
    views pairs of channels as complex numbers, which needs even offsets), or a block narrower than its
    input (the column-major order is the slow one for such a matrix)."""
    if len(linears) < 2 or len({id(linear.weight) for linear in linears}) < len(linears):
        return None
    weights = [linear.weight for linear in linears]
    first = weights[0]
    if (any(type(linear) is not nn.Linear for linear in linears)
            or any(w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
                   or not w.is_contiguous() for w in weights)):
        return None
    sizes = tuple(w.shape[0] for w in weights)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if any(offset % 2 for offset in offsets) or sum(sizes) < first.shape[1]:
        return None
    columns = torch.empty(first.shape[1], sum(sizes), dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for weight, offset, size in zip(weights, offsets, sizes):
            columns[:, offset:offset + size].copy_(weight.t())
            weight.data = columns[:, offset:offset + size].t()
        bias = None
        if any(linear.bias is not None for linear in linears):  # one vector, the biases views of it too
            bias = first.new_zeros(sum(sizes))
            for linear, offset, size in zip(linears, offsets, sizes):
                if linear.bias is not None:
                    bias[offset:offset + size].copy_(linear.bias)
                    linear.bias.data = bias[offset:offset + size]
    return SharedInputBlock(weight=columns.t(), bias=bias, sizes=sizes, members=tuple(id(x) for x in linears))
