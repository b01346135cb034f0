"""One layer of every model family: a token mixer, optional cross-attention, a feed-forward network,
wired by the residual scheme.

    pre:      x = x + f(N(x))
    post:     x = N(x + f(x))
    deepnorm: x = N(α·x + f(x))                      (DeepNet)
    subln:    x = x + f(N(x)), f with an inner norm  (Magneto; cross-attention: input norm only)

The mixer is any module called as ``mixer(x, ctx, cache)`` — self-attention in all its patterns, or
retention — so a Transformer layer and a RetNet layer are the same Block with different parts.

Shapes: B batch, T length, C width.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from scaleformer.layers.attention import SoftmaxAttention
from scaleformer.layers.context import Context
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.layers.multiway import Multiway, per_way

__all__ = ["Block", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples with probability p (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device).bernoulli_(1 - self.p)
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    """mixer, [cross-attention], [FFN] — each a residual sublayer with its own norm.

    Args:
        mixer: ``mixer(x, ctx, cache) -> (B, T, C)``.
        ffn: a FeedForward (or a Multiway of them, routed by ``ctx.way_ids``) or an MoE layer (routing the
            real tokens, ``ctx.token_mask``); None: no FFN sublayer (a Mamba-2 block is the mixer alone).
        norm: makes one norm of width C.
        scheme, alpha: the residual scheme and DeepNorm's α.
        ways: Multiway copies of the two block norms (1 = none).
        cross_attn: cross-attention to the encoder's output (decoders of encoder-decoders).
        dropout, drop_path: on every sublayer's output.
    """

    def __init__(self, mixer: nn.Module, ffn: nn.Module | None, *, norm: Callable[[], nn.Module], scheme: str = "pre",
                 alpha: float = 1.0, ways: int = 1, cross_attn: SoftmaxAttention | None = None,
                 dropout: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.scheme, self.alpha = scheme, alpha
        self.mixer, self.mixer_norm = mixer, per_way(norm, ways)
        self.cross_attn = cross_attn
        self.cross_attn_norm = norm() if cross_attn is not None else None
        self.ffn, self.ffn_norm = ffn, (per_way(norm, ways) if ffn is not None else None)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def _regularized(self, h: Tensor) -> Tensor:
        if not self.training:  # both are the identity then; skipping the calls matters for one-token steps
            return h
        return self.drop_path(self.dropout(h))

    def _residual(self, x: Tensor, branch: Callable[[Tensor], Tensor], norm: nn.Module, ctx: Context) -> Tensor:
        """One residual sublayer: pre/subln x + f(N(x)); post/deepnorm N(α·x + f(x))."""
        if self.scheme in ("pre", "subln"):
            return x + self._regularized(branch(Multiway.apply(norm, x, ctx.way_ids)))
        return Multiway.apply(norm, x * self.alpha + self._regularized(branch(x)), ctx.way_ids)

    def forward(self, x: Tensor, ctx: Context, cache=None) -> Tensor:
        """x (B, T, C) -> (B, T, C); ``cache`` is this layer's part of the model's cache (or None)."""
        x = self._residual(x, lambda h: self.mixer(h, ctx, cache), self.mixer_norm, ctx)
        if self.cross_attn is not None:
            cross_attn, keys_values = self.cross_attn, self._cross_keys_values(ctx, cache)
            mask = ctx.cross_mask()
            x = self._residual(x, lambda h: cross_attn.cross(h, keys_values, mask=mask), self.cross_attn_norm, ctx)
        if self.ffn is None:
            return x
        return self._residual(x, lambda h: self._ffn(h, ctx), self.ffn_norm, ctx)

    def _ffn(self, h: Tensor, ctx: Context) -> Tensor:
        if isinstance(self.ffn, MoEFeedForward):
            return self.ffn(h, ctx.token_mask)  # MoE routes real tokens only
        return Multiway.apply(self.ffn, h, ctx.way_ids)

    def _cross_keys_values(self, ctx: Context, cache) -> tuple[Tensor, Tensor]:
        """The encoder output's keys and values for this layer: projected once, then kept in the cache."""
        if cache is not None and cache.cross is not None:
            return cache.cross
        assert self.cross_attn is not None and ctx.source is not None
        keys_values = self.cross_attn.project_source(ctx.source.hidden)
        if cache is not None:
            cache.cross = keys_values
        return keys_values
