"""YOCO's cross-decoder (arXiv 2405.05254): one key/value projection of the self-decoder's output, shared by
every cross-decoder layer.

:class:`GlobalKeyValue` runs once per call, where the cross-decoder begins: a norm, then keys (rotated at
their positions) and values with ``kv_heads`` heads, appended to the model cache's one shared
:class:`~scaleformer.cache.KVCache`. Each :class:`GlobalKVAttention` layer projects only its queries and
attends to those keys and values (the call's :class:`SharedKeyValue`), causally — so a model of L layers caches one layer's
keys and values instead of L.

Shapes: B batch, T query length, S key length, C = H·D model width, H query heads, H_kv key/value heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from scaleformer.cache import KVCache
from scaleformer.config import check_choice
from scaleformer.layers.context import Context
from scaleformer.parallel.context import context_parallel_keys
from scaleformer.ops.attention import attention, attention_reference

__all__ = ["GlobalKeyValue", "GlobalKVAttention", "SharedKeyValue"]


@dataclass(frozen=True)
class SharedKeyValue:
    """A context feature: the keys and values (B, H_kv, S, D) every cross-decoder layer of the call reads."""

    key: Tensor
    value: Tensor


def _xavier(linear: nn.Linear, gain: float) -> None:
    nn.init.xavier_uniform_(linear.weight, gain=gain)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class GlobalKeyValue(nn.Module):
    """keys, values = RoPE(W_K N(x)), W_V N(x), computed once for the whole cross-decoder.

    Args:
        embed_dim, heads, kv_heads: width C, the cross-decoder's query heads H (the head width is C / H) and
            the key/value heads H_kv it keeps.
        norm: makes the norm applied to x first (YOCO's K/V layer norm).
        bias: biases on the two projections.
    """

    def __init__(self, embed_dim: int, heads: int, kv_heads: int, *, norm: Callable[[], nn.Module],
                 bias: bool = False) -> None:
        super().__init__()
        self.head_dim, self.kv_heads = embed_dim // heads, kv_heads
        self.norm = norm()
        self.k_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias)
        for proj in (self.k_proj, self.v_proj):  # as AttentionCore's key and value projections
            _xavier(proj, 1 / math.sqrt(2))

    def new_state(self) -> KVCache:
        """The model's one shared key/value cache."""
        return KVCache()

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Context:
        """A stage (MixerConfig.build_stage): x (B, T, C) -> ``ctx`` with the :class:`SharedKeyValue` of
        every key and value (B, H_kv, S, D): this call's, after those ``cache`` holds."""
        h = self.norm(x)
        key, value = (proj(h).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
                      for proj in (self.k_proj, self.v_proj))
        key = ctx.rotate_one(key, is_query=False)
        if ctx.sequence_group is not None:  # context parallelism: every rank's keys this one's queries read
            key, value, ctx = context_parallel_keys(key, value, ctx)
        if cache is not None:
            key, value = cache.update(key, value)
        return ctx.with_feature(SharedKeyValue(key, value))


class GlobalKVAttention(nn.Module):
    """out = W_O · Attention(RoPE(W_Q x), keys, values) over the call's :class:`SharedKeyValue`, causal.

    Args:
        embed_dim, heads: width C and query heads H.
        bias: biases on the two projections.
        gain: DeepNorm β: multiplies the Xavier-initialised output projection.
        impl: "sdpa" (fused kernels) or "reference" (pure PyTorch), as for every attention.
    """

    def __init__(self, embed_dim: int, heads: int, *, bias: bool = False, gain: float = 1.0,
                 impl: str = "sdpa") -> None:
        super().__init__()
        check_choice(impl, ("sdpa", "reference"), "attention impl")
        self.heads, self.head_dim, self.impl = heads, embed_dim // heads, impl
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        _xavier(self.q_proj, 1 / math.sqrt(2))
        _xavier(self.out_proj, 1.0)
        with torch.no_grad():
            self.out_proj.weight.mul_(gain)

    def new_state(self) -> None:
        """No state of its own: it reads the model's one shared key/value cache."""
        return None

    def forward(self, x: Tensor, ctx: Context, cache: None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C). The layer holds no state of its own (``cache`` is always None): the
        keys and values are the model's one shared cache, the call's :class:`SharedKeyValue`."""
        shared = ctx.feature(SharedKeyValue)
        if shared is None:
            raise RuntimeError("GlobalKVAttention reads the keys and values of a GlobalKeyValue run earlier in the "
                               "same call (a SharedKeyValue context feature); it runs inside a model's cross-decoder")
        key, value = shared.key, shared.value
        query = ctx.rotate_one(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2),
                               is_query=True)
        op = attention if self.impl == "sdpa" else attention_reference
        if ctx.plain:  # whole sequences without padding: the fused kernels' causal mask
            out = op(query, key, value, causal=True)
        else:
            out = op(query, key, value, mask=ctx.visible())
        return self.out_proj(out.transpose(1, 2).flatten(2))
