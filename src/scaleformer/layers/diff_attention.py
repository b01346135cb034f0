"""Differential attention as a Block's mixer: DIFF Transformer (arXiv 2410.05258) and its V2 (Jan 2026).

Shapes: B batch, T length, C model width, h differential heads; d = C / 2h component head dim in V1, d = C / h
head dim in V2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scaleformer.cache import KVCache
from scaleformer.layers.attention import Projections, SoftmaxAttention
from scaleformer.layers.context import Context
from scaleformer.parallel.context import context_parallel_keys
from scaleformer.layers.norms import RMSNorm
from scaleformer.ops.diff_attention import diff_attention, diff_attention_reference

__all__ = ["DifferentialAttention", "DifferentialAttentionV2", "lambda_init_for_depth"]


def lambda_init_for_depth(depth: int) -> float:
    """λ_init = 0.8 − 0.6·exp(−0.3·(depth − 1)) for the layer at ``depth`` (1 = the first)."""
    return 0.8 - 0.6 * math.exp(-0.3 * (depth - 1))


class DifferentialAttention(SoftmaxAttention):
    """out = W_O · (1 − λ_init) · RMSNorm_head((softmax(Q₁K₁ᵀ/√d) − λ softmax(Q₂K₂ᵀ/√d)) V).

    ``heads`` differential heads, each with two query/key components of width d = C / 2·heads and values
    of width 2d — the projections have exactly the shapes of a standard attention layer with 2·heads
    heads, so "half the heads" matches a Transformer's parameter count (plus 4d λ numbers and the norm's
    2d weights). The layer is that attention layer with a different inner computation: the same masks,
    windows, blockwise pattern, padding, packed documents and KV cache (it caches the 2·kv_heads key and
    value component heads). λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init is one scalar per layer, learned
    through the four vectors (init N(0, 0.1²)); λ_init follows the layer's depth unless given.
    """

    def __init__(self, projections: Projections, *, lambda_init: float, window: int | None = None,
                 block: int | None = None, dropout: float = 0.0, impl: str = "sdpa", norm_eps: float = 1e-5) -> None:
        """``projections`` as an attention layer with 2·heads heads (and 2·kv_heads key/value heads);
        ``lambda_init`` the layer's λ_init (:func:`lambda_init_for_depth` gives the paper's)."""
        if projections.heads % 2 or projections.embed_dim % projections.heads:
            raise ValueError(f"the projections' heads ({projections.heads}) must be even (two components per "
                             f"differential head) and divide embed_dim ({projections.embed_dim})")
        super().__init__(projections, window=window, block=block, dropout=dropout, impl=impl)
        self.diff_heads = projections.heads // 2
        self.lambda_init = lambda_init
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.empty(self.head_dim)) for _ in range(4))
        self.head_norm = RMSNorm(2 * self.head_dim, eps=norm_eps)
        self._reset_lambdas()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lambda_q1"):  # not yet during the base class's __init__
            self._reset_lambdas()

    def _reset_lambdas(self) -> None:
        for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(vector, mean=0.0, std=0.1)

    def lam(self) -> Tensor:
        """λ (a 0-d float32 or wider tensor)."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        first = torch.exp((self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)).sum())
        second = torch.exp((self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)).sum())
        return first - second + self.lambda_init

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Tensor:
        q, k, v = (self._split(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = ctx.rotate(q, k)
        if ctx.sequence_group is not None:  # context parallelism: the keys of every rank this one reads
            k, v, ctx = context_parallel_keys(k, v, ctx)
        if cache is not None:
            k, v = cache.update(k, v)
        mask, bias, causal = self.visibility(ctx, q.dtype, k.shape[-2])
        op = diff_attention if self.impl == "sdpa" else diff_attention_reference
        out = op(q, k, v, self.lam(), mask=mask, bias=bias, causal=causal,
                 dropout_p=self.attention_dropout if self.training else 0.0)
        out = self.head_norm(out) * (1 - self.lambda_init)  # (B, h, T, 2d)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class DifferentialAttentionV2(SoftmaxAttention):
    """DIFF Transformer V2: out = W_O · concat_i(a_{2i} − sigmoid(λ_{t,i}) · a_{2i+1}), λ_t = W_λ x_t.

    One ordinary attention call with 2h query heads of width d = C / h over H_kv key/value heads (the fused
    kernels, the KV cache, windows, packed documents and padding are softmax attention's own); query head j
    reads key/value head ⌊j / (2h / H_kv)⌋, so the pair (2i, 2i + 1) always shares one group's keys and
    values. Pairing head i with head i + h instead would subtract heads of different groups: the
    implementation mistake the authors warn against. λ is one number per token and output head, squashed
    by a sigmoid into (0, 1); no per-head norm and no λ_init (both V1's, dropped in V2). W_Q is C → 2C,
    W_K, W_V are C → H_kv·d, W_λ C → h (bias-free, as published, and initialised as nn.Linear is).
    """

    def __init__(self, projections: Projections, *, window: int | None = None, block: int | None = None,
                 dropout: float = 0.0, impl: str = "sdpa") -> None:
        """``projections`` as an attention layer of h heads (the output heads): its queries are doubled here."""
        super().__init__(projections, window=window, block=block, dropout=dropout, impl=impl)
        width = projections.embed_dim
        self.q_proj = nn.Linear(width, 2 * width, bias=projections.bias)  # 2h query heads of width d
        self.lambda_proj = nn.Linear(width, self.heads, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lambda_proj"):  # not yet during the base class's __init__
            self.lambda_proj.reset_parameters()

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Tensor:
        q, k, v = self._queries_keys_values(x, ctx)  # q (B, 2h, T, d); k, v (B, H_kv, T, d)
        lam = torch.sigmoid(self.lambda_proj(x)).transpose(1, 2)[..., None]  # (B, h, T, 1)
        out = self._mix(q, k, v, ctx, cache)  # (B, 2h, T, d): a_0 … a_{2h−1}
        return self._project(out[:, 0::2] - lam.to(out.dtype) * out[:, 1::2])
