"""Multi-head attention (self or cross) with optional Sub-LN inner norm, positions and a KV cache.

Shapes: B batch, T query length, S key length, C = H·D model width, H heads, D head dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scaleformer.cache import KVCache
from scaleformer.config import check_choice
from scaleformer.layers.multiway import Multiway
from scaleformer.layers.positions import Rotary
from scaleformer.ops.attention import attention, attention_reference
from scaleformer.ops.dilated import dilated_attention, dilated_attention_reference
from scaleformer.parallel.sequence import sequence_parallel_dilated_attention

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """out = W_O · [inner_norm] · Attention(W_Q x, W_K s, W_V s).

    Args:
        embed_dim, heads: width C and number of heads H.
        bias: biases on the four projections.
        attention_dropout: dropout on attention probabilities (training only).
        inner_norm: makes Sub-LN's norm between attention and the output projection (None = none).
        gain: DeepNorm β / Sub-LN γ: multiplies the Xavier-initialised value and output projections.
        impl: "sdpa" (fast path) or "reference" (pure PyTorch, same contract).
        dilated: (segment_lengths, dilation_rates) for LongNet's dilated self-attention. A call with
            ``use_dilated`` runs the dilated op over the whole sequence (no cached past); otherwise the
            caller passes the equivalent dense ``bias`` (decoding steps, see ops.dilated.dilated_bias).
        ways: per-modality copies of the projections and inner norm (Multiway, scope "all"); calls then
            take ``way_ids``.
    """

    def __init__(self, embed_dim: int, heads: int, *, bias: bool = True, attention_dropout: float = 0.0,
                 inner_norm: Callable[[], nn.Module] | None = None, gain: float = 1.0, impl: str = "sdpa",
                 dilated: tuple[tuple[int, ...], tuple[int, ...]] | None = None, ways: int = 1) -> None:
        super().__init__()
        check_choice(impl, ("sdpa", "reference"), "attention impl")
        self.heads, self.head_dim = heads, embed_dim // heads
        # ways > 1: a copy of every projection (and of the inner norm) per modality, each token using its
        # own (TorchScale's Multiway); the attention itself is shared.
        per_way: Callable[[Callable[[], nn.Module]], nn.Module] = (
            (lambda make: make()) if ways == 1 else (lambda make: Multiway(make, ways)))
        self.q_proj = per_way(lambda: nn.Linear(embed_dim, embed_dim, bias=bias))
        self.k_proj = per_way(lambda: nn.Linear(embed_dim, embed_dim, bias=bias))
        self.v_proj = per_way(lambda: nn.Linear(embed_dim, embed_dim, bias=bias))
        self.out_proj = per_way(lambda: nn.Linear(embed_dim, embed_dim, bias=bias))
        self.inner_norm = per_way(inner_norm) if inner_norm is not None else None
        self.attention_dropout = attention_dropout
        self.gain = gain
        self._attend: Callable[..., Tensor] = attention if impl == "sdpa" else attention_reference
        self._attend_dilated = dilated_attention if impl == "sdpa" else dilated_attention_reference
        self.dilated = dilated  # (segment_lengths, dilation_rates) or None
        self.reset_parameters()

    @staticmethod
    def _linears(proj: nn.Module) -> list[nn.Linear]:
        return list(proj.ways) if isinstance(proj, Multiway) else [proj]  # type: ignore[list-item]

    def reset_parameters(self) -> None:
        # q, k, v: Xavier with gain 1/sqrt(2) (as one fused (C, 3C) matrix would get); out: Xavier gain 1.
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gain), (self.out_proj, self.gain)):
            for linear in self._linears(proj):
                nn.init.xavier_uniform_(linear.weight, gain=1.0 if proj is self.out_proj else 1 / math.sqrt(2))
                with torch.no_grad():
                    linear.weight.mul_(gain)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    @staticmethod
    def _per_way(module: nn.Module, x: Tensor, way_ids: Tensor | None) -> Tensor:
        return module(x, way_ids) if isinstance(module, Multiway) else module(x)

    def _split(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, D)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, *, mask: Tensor | None = None, bias: Tensor | None = None, causal: bool = False,
                rotary: Rotary | None = None, positions: Tensor | None = None, cache: KVCache | None = None,
                use_dilated: bool = False, dilated_key_mask: Tensor | None = None,
                sequence_group: dist.ProcessGroup | None = None, way_ids: Tensor | None = None) -> Tensor:
        """Self-attention. x (B, T, C); mask bool (B, 1, T, S) with S = cached + T; bias (B, H, T, S).

        With ``cache``, the new keys/values are appended to it and attention runs over all of them.
        ``rotary`` applies RoPE/xPos at ``positions`` (B, T) to the new queries and keys.
        """
        q, k, v = (self._split(self._per_way(proj, x, way_ids)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rotary is not None:
            assert positions is not None
            q, k = rotary(q, positions, is_query=True), rotary(k, positions, is_query=False)
        if cache is not None:
            k, v = cache.update(k, v)
        if use_dilated:
            assert self.dilated is not None and q.shape[-2] == k.shape[-2], "dilated path needs the whole sequence"
            segments, rates = self.dilated
            if sequence_group is not None:  # this rank holds one shard of the sequence
                out = sequence_parallel_dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=rates,
                                                          causal=causal, group=sequence_group)
            else:
                out = self._attend_dilated(q, k, v, segment_lengths=segments, dilation_rates=rates, causal=causal,
                                           key_mask=dilated_key_mask)
            return self._project(out, way_ids)
        return self._output(q, k, v, mask=mask, bias=bias, causal=causal, way_ids=way_ids)

    def project_source(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, H, S, D) of an encoded source (B, S, C); cacheable."""
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    def cross(self, x: Tensor, keys_values: tuple[Tensor, Tensor], *, mask: Tensor | None = None) -> Tensor:
        """Cross-attention of x (B, T, C) to projected source keys/values; mask bool (B, 1, 1, S)."""
        return self._output(self._split(self.q_proj(x)), *keys_values, mask=mask, bias=None, causal=False)

    def _output(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, bias: Tensor | None,
                causal: bool, way_ids: Tensor | None = None) -> Tensor:
        dropout = self.attention_dropout if self.training else 0.0
        return self._project(self._attend(q, k, v, mask=mask, bias=bias, causal=causal, dropout_p=dropout), way_ids)

    def _project(self, out: Tensor, way_ids: Tensor | None = None) -> Tensor:
        out = out.transpose(1, 2).flatten(2)  # (B, H, T, D) -> (B, T, C)
        if self.inner_norm is not None:
            out = self._per_way(self.inner_norm, out, way_ids)
        return self._per_way(self.out_proj, out, way_ids)
