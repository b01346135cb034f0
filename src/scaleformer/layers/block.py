"""One Transformer layer: self-attention, optional cross-attention, FFN, wired by the residual scheme.

    pre:      x = x + f(N(x))
    post:     x = N(x + f(x))
    deepnorm: x = N(α·x + f(x))                      (DeepNet)
    subln:    x = x + f(N(x)), f with an inner norm  (Magneto; cross-attention: input norm only)

Shapes: B batch, T length, S source length, C width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from scaleformer.cache import KVCache
from scaleformer.config import MoEConfig
from scaleformer.layers.attention import MultiheadAttention
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.layers.multiway import Multiway
from scaleformer.layers.norms import make_norm
from scaleformer.layers.positions import Rotary

__all__ = ["BlockSpec", "TransformerBlock", "DropPath", "residual"]


@dataclass(frozen=True)
class BlockSpec:
    """Everything one layer needs, resolved from the model config (one per layer, so layers may differ)."""

    embed_dim: int
    heads: int
    ffn_dim: int
    ffn: str = "mlp"
    activation: str = "gelu"
    norm: str = "pre"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    bias: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    drop_path: float = 0.0
    alpha: float = 1.0  # DeepNorm residual weight
    gain: float = 1.0  # DeepNorm β / Sub-LN γ for self-attention (v, out) and FFN
    cross_gain: float = 1.0  # the same for cross-attention
    cross_attention: bool = False
    multiway: int = 1
    multiway_scope: str = "ffn"  # "all": attention projections and inner norm get per-way copies too
    attention_impl: str = "sdpa"
    segment_lengths: tuple[int, ...] = ()  # non-empty: dilated self-attention (LongNet)
    dilation_rates: tuple[int, ...] = ()
    moe: MoEConfig | None = None  # a sparse mixture-of-experts FFN in this layer


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


def residual(x: Tensor, branch: Callable[[Tensor], Tensor], norm: Callable[[Tensor], Tensor], *, scheme: str,
             alpha: float, dropout: nn.Module, drop_path: nn.Module) -> Tensor:
    """One residual sublayer under ``scheme``: pre/subln x + f(N(x)); post/deepnorm N(α·x + f(x))."""
    if scheme in ("pre", "subln"):
        return x + drop_path(dropout(branch(norm(x))))
    return norm(x * alpha + drop_path(dropout(branch(x))))


class TransformerBlock(nn.Module):
    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        subln = spec.norm == "subln"
        norm: Callable[..., nn.Module] = lambda dim=spec.embed_dim: make_norm(spec.norm_type, dim, spec.norm_eps)
        multiway: Callable[[Callable[[], nn.Module]], Multiway] = lambda make: Multiway(make, spec.multiway)
        self.self_attn = MultiheadAttention(
            spec.embed_dim, spec.heads, bias=spec.bias, attention_dropout=spec.attention_dropout,
            inner_norm=norm if subln else None, gain=spec.gain, impl=spec.attention_impl,
            ways=spec.multiway if spec.multiway_scope == "all" else 1,
            dilated=(spec.segment_lengths, spec.dilation_rates) if spec.segment_lengths else None)
        self.self_attn_norm = multiway(norm)
        if spec.cross_attention:
            self.cross_attn = MultiheadAttention(
                spec.embed_dim, spec.heads, bias=spec.bias, attention_dropout=spec.attention_dropout,
                gain=spec.cross_gain, impl=spec.attention_impl)
            self.cross_attn_norm = norm()
        self.ffn: nn.Module
        if spec.moe is not None:
            self.ffn = MoEFeedForward(spec.moe, spec.embed_dim, spec.ffn_dim, kind=spec.ffn, activation=spec.activation,
                                      bias=spec.bias, activation_dropout=spec.activation_dropout,
                                      inner_norm=spec.norm_type if subln else None, norm_eps=spec.norm_eps,
                                      gain=spec.gain)
        else:
            self.ffn = multiway(lambda: FeedForward(
                spec.embed_dim, spec.ffn_dim, kind=spec.ffn, activation=spec.activation, bias=spec.bias,
                activation_dropout=spec.activation_dropout, inner_norm=norm(spec.ffn_dim) if subln else None,
                gain=spec.gain))
        self.ffn_norm = multiway(norm)
        self.dropout = nn.Dropout(spec.dropout)
        self.drop_path = DropPath(spec.drop_path)

    def _residual(self, x: Tensor, branch: Callable[[Tensor], Tensor], norm: Callable[[Tensor], Tensor]) -> Tensor:
        return residual(x, branch, norm, scheme=self.spec.norm, alpha=self.spec.alpha,
                        dropout=self.dropout, drop_path=self.drop_path)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None, causal: bool = False,
                rotary: Rotary | None = None, positions: Tensor | None = None, cache: KVCache | None = None,
                cross_keys_values: tuple[Tensor, Tensor] | None = None, cross_mask: Tensor | None = None,
                way_ids: Tensor | None = None, dilated_key_mask: Tensor | None = None,
                use_dilated: bool = False, sequence_group: object = None,
                token_mask: Tensor | None = None) -> Tensor:
        """x (B, T, C); mask (B, 1, T, S); bias (B, H, T, S); cross_mask (B, 1, 1, S_src); way_ids (B, T)."""
        x = self._residual(
            x, lambda h: self.self_attn(h, mask=mask, bias=bias, causal=causal, rotary=rotary,
                                        positions=positions, cache=cache, use_dilated=use_dilated,
                                        dilated_key_mask=dilated_key_mask, sequence_group=sequence_group,
                                        way_ids=way_ids),
            lambda h: self.self_attn_norm(h, way_ids))
        if self.spec.cross_attention:
            assert cross_keys_values is not None
            x = self._residual(x, lambda h: self.cross_attn.cross(h, cross_keys_values, mask=cross_mask),
                               self.cross_attn_norm)
        ffn_input = token_mask if self.spec.moe is not None else way_ids  # MoE routes real tokens only
        return self._residual(x, lambda h: self.ffn(h, ffn_input), lambda h: self.ffn_norm(h, way_ids))
