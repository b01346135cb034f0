"""Multi-head attention: one projection core and one class per pattern.

:class:`AttentionCore` holds what every pattern shares — the q/k/v/out projections (grouped-query when
``kv_heads`` < ``heads``), their Multiway copies, Sub-LN's inner norm, the initialisation, and the call of
the attention op. Each pattern is a class of its own, built by its config: :class:`SoftmaxAttention`
(dense, sliding-window or LeX blockwise-causal visibility; also cross-attention), :class:`MomentumAttention`
(softmax attention plus a decayed sum of earlier values), :class:`DilatedSelfAttention` (LongNet) and
:class:`S2SelfAttention`. Everything that depends on the call (positions, padding, cache, documents,
Multiway ids) comes from the :class:`~scaleformer.layers.context.Context`; each pattern derives its mask or
bias from it once per call.

Shapes: B batch, T query length, S key length, C = H·D model width, H heads, H_kv key/value heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from scaleformer.cache import KeyBias, KVCache, MomentumKVCache, S2KVCache
from scaleformer.parallel.context import balanced_causal_attention, context_parallel_keys
from scaleformer.config import check_choice
from scaleformer.layers.context import Context, DocumentRows
from scaleformer.layers.multiway import Multiway, per_way
from scaleformer.layers.norms import RMSNorm
from scaleformer.ops.attention import attention, attention_reference, repeat_kv_heads
from scaleformer.ops.dilated import dilated_attention, dilated_attention_reference, dilated_bias
from scaleformer.ops.dilated_parallel import sequence_parallel_dilated_attention
from scaleformer.ops.retention import retention
from scaleformer.ops.s2 import S2Layout, s2_attention, s2_token_mask

__all__ = ["Projections", "AttentionCore", "SoftmaxAttention", "GatedSoftmaxAttention", "MomentumAttention", "DilatedSelfAttention",
           "S2SelfAttention"]


@dataclass(frozen=True)
class Projections:
    """The projections every attention pattern has.

    ``embed_dim``, ``heads``: width C and query heads H. ``kv_heads``: key/value heads H_kv (divides H; None
    = H); each serves H / H_kv query heads and the cache holds H_kv heads (1 = multi-query). ``bias`` on the
    four projections. ``ways``: per-modality copies of the projections and the inner norm (Multiway scope
    "all"). ``gain``: DeepNorm's β / Sub-LN's γ, multiplying the Xavier-initialised value and output
    projections. ``inner_norm``: makes Sub-LN's norm between the attention and the output projection.
    ``qk_norm_eps``: an RMSNorm over each head's queries and keys before the rotation (Qwen3, OLMo 2), one
    weight vector for every head (and every Multiway copy); None = none.
    """

    embed_dim: int
    heads: int
    kv_heads: int | None = None
    bias: bool = True
    ways: int = 1
    gain: float = 1.0
    inner_norm: Callable[[], nn.Module] | None = None
    qk_norm_eps: float | None = None


class AttentionCore(nn.Module):
    """out = W_O · [inner_norm] · pattern(W_Q x, W_K x, W_V x): the projections, their initialisation, the op.

    ``dropout`` on the attention probabilities (training only); ``impl`` "sdpa" (fast path) or "reference"
    (pure PyTorch, same contract), and for the sparse patterns also "triton".
    """

    IMPLS: ClassVar[tuple[str, ...]] = ("sdpa", "reference")

    def __init__(self, projections: Projections, *, dropout: float = 0.0, impl: str = "sdpa") -> None:
        super().__init__()
        check_choice(impl, ("sdpa", "reference", "triton"), "attention impl")
        if impl not in self.IMPLS:
            raise ValueError("attention impl 'triton' is for dilated and S2 attention layers")
        embed_dim, heads, ways = projections.embed_dim, projections.heads, projections.ways
        self.heads, self.head_dim = heads, embed_dim // heads
        self.kv_heads = heads if projections.kv_heads is None else projections.kv_heads
        if heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({heads})")
        kv_dim, bias = self.kv_heads * self.head_dim, projections.bias
        self.q_proj = per_way(lambda: nn.Linear(embed_dim, embed_dim, bias=bias), ways)
        self.k_proj = per_way(lambda: nn.Linear(embed_dim, kv_dim, bias=bias), ways)
        self.v_proj = per_way(lambda: nn.Linear(embed_dim, kv_dim, bias=bias), ways)
        self.out_proj = per_way(lambda: nn.Linear(embed_dim, embed_dim, bias=bias), ways)
        inner_norm = projections.inner_norm
        self.inner_norm = per_way(inner_norm, ways) if inner_norm is not None else None
        if projections.qk_norm_eps is not None:
            self.q_norm = RMSNorm(self.head_dim, eps=projections.qk_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=projections.qk_norm_eps)
        self.attention_dropout, self.gain, self.impl = dropout, projections.gain, impl
        self.sinks: nn.Parameter | None = None  # softmax patterns may add attention sinks
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # q, k, v: Xavier with gain 1/sqrt(2) (as one fused (C, 3C) matrix would get); out: Xavier gain 1.
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gain), (self.out_proj, self.gain)):
            for linear in proj.ways if isinstance(proj, Multiway) else [proj]:
                nn.init.xavier_uniform_(linear.weight, gain=1.0 if proj is self.out_proj else 1 / math.sqrt(2))
                with torch.no_grad():
                    linear.weight.mul_(gain)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
        if getattr(self, "sinks", None) is not None:  # gpt-oss's init: N(0, 0.02²)
            nn.init.normal_(self.sinks, std=0.02)

    @property
    def lookback(self) -> int | None:
        """How many positions back (its own included) a query reads; None: all of them."""
        return None

    def new_state(self) -> KVCache:
        """This layer's decoding state: its keys and values."""
        return KVCache()

    def _split(self, x: Tensor) -> Tensor:  # (B, T, h·D) -> (B, h, T, D)
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def _queries_keys_values(self, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """(B, H, T, D) queries and (B, H_kv, T, D) keys and values of x, rotated at the call's positions."""
        q, k, v = (self._split(Multiway.apply(proj, x, ctx.way_ids)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ctx.rotate(q, k)
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, bias: Tensor | None,
                causal: bool) -> Tensor:
        op = attention_reference if self.impl == "reference" else attention
        dropout = self.attention_dropout if self.training else 0.0
        return op(q, k, v, mask=mask, bias=bias, causal=causal, dropout_p=dropout, sink=self.sinks)

    def _project(self, out: Tensor, way_ids: Tensor | None = None, gate: Tensor | None = None) -> Tensor:
        out = out.transpose(1, 2).flatten(2)  # (B, H, T, D) -> (B, T, C)
        if gate is not None:
            out = out * gate
        if self.inner_norm is not None:
            out = Multiway.apply(self.inner_norm, out, way_ids)
        return Multiway.apply(self.out_proj, out, way_ids)

    @property
    def _kernel(self) -> str:
        """The dilated and S2 ops' kernel for this layer's impl."""
        return "triton" if self.impl == "triton" else "auto"


def _score_bias(ctx: Context, dtype: torch.dtype) -> Tensor | None:
    """The call's additive score bias: T5's relative bias and structured prompting's per-key bias."""
    bias, per_key = ctx.relative_bias, ctx.feature(KeyBias)
    if per_key is not None:  # structured prompting: the test tokens' keys weigh M times
        key_bias = per_key.bias[:, None, None, :].to(dtype)
        bias = key_bias if bias is None else bias + key_bias
    return bias


class SoftmaxAttention(AttentionCore):
    """Softmax attention with dense, sliding-window (``window``: a query sees the W − 1 tokens before it and
    itself) or LeX blockwise-causal (``block``: its block of this many positions and the one before)
    visibility; also an encoder-decoder's cross-attention (:meth:`cross`). ``sinks``: one learned logit per
    query head in every softmax's denominator (gpt-oss), so a head can attend to nothing."""

    def __init__(self, projections: Projections, *, window: int | None = None, block: int | None = None,
                 dropout: float = 0.0, impl: str = "sdpa", sinks: bool = False) -> None:
        super().__init__(projections, dropout=dropout, impl=impl)
        self.window, self.block = window, block
        if sinks:
            self.sinks = nn.Parameter(torch.empty(self.heads))
            nn.init.normal_(self.sinks, std=0.02)

    @property
    def lookback(self) -> int | None:
        return self.window

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Tensor:
        """Self-attention of x (B, T, C). With ``cache``, the new keys/values are appended to it and
        attention runs over everything it holds."""
        q, k, v = self._queries_keys_values(x, ctx)
        return self._project(self._mix(q, k, v, ctx, cache), ctx.way_ids)

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context, cache: KVCache | None) -> Tensor:
        if ctx.sequence_group is not None:  # context parallelism: causal work balanced across the ranks, ...
            out = balanced_causal_attention(q, k, v, ctx, self._attend_in)
            if out is not None:
                return out
            k, v, ctx = context_parallel_keys(k, v, ctx)  # ... or the keys of every rank this one reads
        if cache is not None:
            k, v = cache.update(k, v)
        mask, bias, causal = self.visibility(ctx, q.dtype, k.shape[-2])
        return self._attend(q, k, v, mask=mask, bias=bias, causal=causal)

    def _attend_in(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
        """Attention of q over k, v, which are every key slot of ``ctx`` (no cache)."""
        mask, bias, causal = self.visibility(ctx, q.dtype, k.shape[-2])
        return self._attend(q, k, v, mask=mask, bias=bias, causal=causal)

    def visibility(self, ctx: Context, dtype: torch.dtype, keys: int) -> tuple[Tensor | None, Tensor | None, bool]:
        """What each query sees in this call: (bool mask (B, 1, T, S), bias, causal flag), over the last
        ``keys`` of the call's S key slots: a windowed layer beside YOCO's shared cache holds only the slots
        its window can still reach, while the model keeps them all."""
        if ctx.plain and self.window is None and self.block is None:  # the fused kernels' own causal mask
            return None, ctx.relative_bias, ctx.causal
        mask, bias = ctx.visible(window=self.window, block=self.block), _score_bias(ctx, dtype)
        if mask.shape[-1] != keys:
            mask, bias = mask[..., -keys:], None if bias is None else bias[..., -keys:]
        return mask, bias, False

    def project_source(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, H_kv, S, D) of an encoded source (B, S, C); cacheable."""
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    def cross(self, x: Tensor, keys_values: tuple[Tensor, Tensor], *, mask: Tensor | None = None) -> Tensor:
        """Cross-attention of x (B, T, C) to projected source keys/values; mask bool (B, 1, 1, S)."""
        return self._project(self._attend(self._split(self.q_proj(x)), *keys_values, mask=mask, bias=None,
                                          causal=False))


class GatedSoftmaxAttention(SoftmaxAttention):
    """Softmax attention with an elementwise output gate (Qwen3-Next's full-attention layers):
    W_O · (Attention(...) ⊙ sigmoid(W_G x)), the gate one number per channel of every head."""

    def __init__(self, projections: Projections, *, window: int | None = None, block: int | None = None,
                 dropout: float = 0.0, impl: str = "sdpa", sinks: bool = False) -> None:
        super().__init__(projections, window=window, block=block, dropout=dropout, impl=impl, sinks=sinks)
        width, bias = projections.embed_dim, projections.bias
        self.gate_proj = per_way(lambda: nn.Linear(width, width, bias=bias), projections.ways)

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Tensor:
        q, k, v = self._queries_keys_values(x, ctx)
        gate = torch.sigmoid(Multiway.apply(self.gate_proj, x, ctx.way_ids))
        return self._project(self._mix(q, k, v, ctx, cache), ctx.way_ids, gate)


class MomentumAttention(SoftmaxAttention):
    """Momentum attention (arXiv 2212.10559): MoAttn(V, K, q_t) = Attn(V, K, q_t) + Σ_{i<t} η^{t−i} v_i, per
    head (a key/value head's sum serves its query heads), η = ``momentum``. The sum is the retention op
    with unit queries and keys and decay η (minus v_t), so padding, packed documents and cached decoding
    (its state in a :class:`MomentumKVCache`) follow retention's exact rules."""

    def __init__(self, projections: Projections, *, momentum: float, window: int | None = None,
                 block: int | None = None, dropout: float = 0.0, impl: str = "sdpa", sinks: bool = False) -> None:
        super().__init__(projections, window=window, block=block, dropout=dropout, impl=impl, sinks=sinks)
        self.momentum = momentum

    def new_state(self) -> MomentumKVCache:
        """Keys, values and the momentum sum."""
        return MomentumKVCache()

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context, cache: KVCache | None) -> Tensor:
        out = super()._mix(q, k, v, ctx, cache)
        return out + repeat_kv_heads(self._momentum(v, ctx, cache), self.heads)

    def _momentum(self, v: Tensor, ctx: Context, cache: KVCache | None) -> Tensor:
        """Σ_{i<t} η^{t−i} v_i (B, H_kv, T, D) for this call's values v: retention with unit queries and keys
        (Σ_{i≤t}, carried on from the cache's sum), minus v_t."""
        log_decay = torch.full((v.shape[1],), math.log(self.momentum), dtype=torch.promote_types(v.dtype, torch.float32),
                               device=v.device)
        form = "recurrent" if v.shape[2] == 1 else "chunkwise"
        if ctx.document_ids is not None:  # each document's sum starts empty
            documents = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
            rows = documents.gather(v.transpose(1, 2)).transpose(1, 2)  # (N, H_kv, L, D)
            ones = rows.new_ones(*rows.shape[:-1], 1)
            summed, _ = retention(ones, ones, rows, log_decay=log_decay, form=form, mask=documents.valid,
                                  sequence_group=ctx.recurrence_group(documents))
            summed = documents.scatter(summed.transpose(1, 2), v.shape[2]).transpose(1, 2)
        else:
            ones = v.new_ones(*v.shape[:-1], 1)
            state = cache.momentum if isinstance(cache, MomentumKVCache) else None
            summed, state = retention(ones, ones, v, log_decay=log_decay, form=form, mask=ctx.token_mask,
                                      sequence_group=ctx.sequence_group,
                                      initial_state=state, output_final_state=cache is not None)
            if isinstance(cache, MomentumKVCache):
                cache.momentum = state
        own = v if ctx.token_mask is None else v * ctx.token_mask[:, None, :, None].to(v.dtype)
        return summed - own


class DilatedSelfAttention(AttentionCore):
    """LongNet's dilated self-attention: patterns (segment length w_i, dilation rate r_i) merged by their
    softmax mass. Whole sequences (nothing cached before) run the dilated op; cached steps and packed
    documents too, the latter each as a row of its own; later cached steps read the pattern's dense form.
    ``head_offsets``: which offset each head keeps in a pattern: "modulo" (h mod r) or TorchScale's
    "grouped" (see :mod:`scaleformer.ops.dilated`)."""

    IMPLS = ("sdpa", "reference", "triton")

    def __init__(self, projections: Projections, *, segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...],
                 head_offsets: str = "modulo", impl: str = "sdpa") -> None:
        super().__init__(projections, impl=impl)
        self.dilated = (tuple(segment_lengths), tuple(dilation_rates))
        self.dilated_head_offsets = head_offsets

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Tensor:
        q, k, v = self._queries_keys_values(x, ctx)
        first = ctx.past == 0
        if cache is not None:
            k, v = cache.update(k, v)
        if first:
            out = self._dilated(q, k, v, ctx)
        else:
            mask, bias = self._dilated_as_dense(ctx, q.dtype)
            out = self._attend(q, k, v, mask=mask, bias=bias, causal=False)
        return self._project(out, ctx.way_ids)

    def _dilated(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
        """The dilated op over whole sequences (nothing cached before); packed documents each as a row of
        their own, so segments restart with every document and the cost stays linear."""
        segments, rates = self.dilated
        k, v = repeat_kv_heads(k, self.heads), repeat_kv_heads(v, self.heads)
        if ctx.sequence_group is not None:  # this rank holds one shard of the sequence
            return sequence_parallel_dilated_attention(q, k, v, segment_lengths=segments, dilation_rates=rates,
                                                       causal=ctx.causal, group=ctx.sequence_group,
                                                       head_offsets=self.dilated_head_offsets)
        op = (partial(dilated_attention_reference, head_offsets=self.dilated_head_offsets) if self.impl == "reference"
              else partial(dilated_attention, kernel=self._kernel, head_offsets=self.dilated_head_offsets))
        if ctx.document_ids is None:
            return op(q, k, v, segment_lengths=segments, dilation_rates=rates, causal=ctx.causal,
                      key_mask=ctx.token_mask)
        documents = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
        rows = [documents.gather(x.transpose(1, 2)).transpose(1, 2) for x in (q, k, v)]  # (N, H, L, D)
        out = op(*rows, segment_lengths=segments, dilation_rates=rates, causal=ctx.causal, key_mask=documents.valid)
        return documents.scatter(out.transpose(1, 2), q.shape[2]).transpose(1, 2)

    def _dilated_as_dense(self, ctx: Context, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Dense equivalent of the dilated pattern (cached steps, packed documents): bias log c (B, H, T, S)
        and the mask of linked keys. A query no pattern links to a real key (only padding queries) keeps
        its own slot, with bias 0, like every other padding query."""
        segments, rates = self.dilated

        def compute() -> tuple[Tensor, Tensor]:
            bias = dilated_bias(ctx.positions, ctx.key_positions, heads=self.heads, segment_lengths=segments,
                                dilation_rates=rates, causal=ctx.causal, head_offsets=self.dilated_head_offsets)
            mask = ctx.visible()
            t, s = mask.shape[-2], mask.shape[-1]
            own_slot = torch.arange(s, device=mask.device)[None, :] == torch.arange(
                ctx.past, ctx.past + t, device=mask.device)[:, None]
            linked = mask & torch.isfinite(bias)
            return linked | (~linked.any(-1, keepdim=True) & own_slot), torch.where(linked, bias, 0.0).to(dtype)

        mask, bias = ctx.shared(("dilated", segments, rates, self.heads, self.dilated_head_offsets, dtype), compute)
        return mask, bias


class S2SelfAttention(AttentionCore):
    """S2-Attention: each head reads a local window of blocks and a strided shard of the rest
    (:class:`~scaleformer.ops.s2.S2Layout`). Whole sequences run the kept-blocks op; its cache keeps only
    the blocks a future query can read (:class:`S2KVCache`); everything else reads the layout densely."""

    IMPLS = ("sdpa", "reference", "triton")

    def __init__(self, projections: Projections, *, layout: S2Layout, impl: str = "sdpa") -> None:
        super().__init__(projections, impl=impl)
        self.s2 = layout

    def new_state(self) -> S2KVCache:
        """Keys and values of only the blocks a future query can read."""
        return S2KVCache(layout=self.s2, heads=self.heads)

    def forward(self, x: Tensor, ctx: Context, cache: KVCache | None = None) -> Tensor:
        q, k, v = self._queries_keys_values(x, ctx)
        if isinstance(cache, S2KVCache):
            out = self._s2_cached(q, k, v, ctx, cache)
        elif cache is None and self._s2_fast(ctx):
            out = self._s2(q, k, v, ctx)
        else:
            if ctx.sequence_group is not None:  # context parallelism: S2's mask over every rank's keys
                k, v, ctx = context_parallel_keys(k, v, ctx)
            if cache is not None:
                k, v = cache.update(k, v)
            layout, heads = self.s2, self.heads
            mask = ctx.shared(("s2", layout, heads), lambda: ctx.visible() & _s2_mask(layout, heads, ctx))
            bias = _score_bias(ctx, q.dtype)
            out = self._attend(q, k, v, mask=mask, bias=bias, causal=False)
        return self._project(out, ctx.way_ids)

    def _s2_fast(self, ctx: Context) -> bool:
        """Whether the kept-blocks op computes this call: whole sequences whose positions are their real
        tokens' order (nothing cached before, no score bias, no attention dropout, the sdpa kernels)."""
        return (ctx.past == 0 and self.impl != "reference" and ctx.relative_bias is None and ctx.feature(KeyBias) is None
                and not (self.training and self.attention_dropout) and ctx.sequence_group is None
                and ctx.shared("s2 positions are slots", lambda: _positions_are_slots(ctx)))

    def _s2(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context) -> Tensor:
        """The kept-blocks S2 op; packed documents each as a row of their own (blocks restart with them)."""
        if ctx.document_ids is None:
            return s2_attention(q, k, v, self.s2, causal=ctx.causal, key_mask=ctx.token_mask, kernel=self._kernel)
        documents = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
        rows = [documents.gather(x.transpose(1, 2)).transpose(1, 2) for x in (q, k, v)]  # (N, H, L, D)
        out = s2_attention(*rows, self.s2, causal=ctx.causal, key_mask=documents.valid, kernel=self._kernel)
        return documents.scatter(out.transpose(1, 2), q.shape[2]).transpose(1, 2)

    def _s2_cached(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context, cache: S2KVCache) -> Tensor:
        """S2 with its reduced cache: the first call by the kept-blocks op where it can, every later one
        against the slots each head still holds, masked by their positions."""
        if ctx.relative_bias is not None or ctx.feature(KeyBias) is not None or ctx.document_ids is not None:
            raise ValueError("S2-Attention's reduced cache takes no T5 bias, structured prompt or packed documents")
        positions = ctx.positions if ctx.token_mask is None else ctx.positions.masked_fill(~ctx.token_mask, -1)
        first_call = cache.positions is None
        keys, values, key_positions = cache.update_with_positions(k, v, positions)
        if first_call and self._s2_fast(ctx):
            return self._s2(q, k, v, ctx)
        group = self.heads // key_positions.shape[1]
        key_positions = key_positions.repeat_interleave(group, dim=1)[:, :, None, :]  # (B, H, 1, S)
        query_positions = ctx.positions[:, None, :, None]  # (B, 1, T, 1)
        h = torch.arange(self.heads, device=q.device)[None, :, None, None]
        size = self.s2.block
        seen = self.s2.reads(self.heads, h, query_positions // size, key_positions.clamp(min=0) // size, ctx.causal)
        seen = seen & (key_positions >= 0)
        if ctx.causal:
            seen = seen & (key_positions <= query_positions)
        seen = seen | ~seen.any(-1, keepdim=True)  # padding queries that see nothing: any finite row, unused
        return self._attend(q, keys, values, mask=seen, bias=None, causal=False)


def _s2_mask(layout: S2Layout, heads: int, ctx: Context) -> Tensor:
    """(B, H, T, S): the layout at this call's query and key positions."""
    return s2_token_mask(layout, heads, ctx.positions, ctx.key_positions, ctx.causal)


def _positions_are_slots(ctx: Context) -> bool:
    """Whether each real token's position is its index among its row's (document's) real tokens, the
    order the kept-blocks op assumes (not so for, e.g., structured prompting's shifted groups)."""
    real = ctx.token_mask if ctx.token_mask is not None else torch.ones_like(ctx.positions, dtype=torch.bool)
    if ctx.document_ids is None:
        expected = real.long().cumsum(1) - 1
        return bool((ctx.positions == expected)[real].all())
    documents = ctx.shared("documents", lambda: DocumentRows.of(ctx.document_ids, ctx.token_mask))
    positions = documents.gather(ctx.positions)
    return bool((positions == documents.valid.long().cumsum(1) - 1)[documents.valid].all())
