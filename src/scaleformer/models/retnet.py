"""RetNet (arXiv 2307.08621): a decoder-only LM with multi-scale retention instead of attention.

The form is chosen per call — ``model(ids, form="parallel" | "chunkwise" | "recurrent")`` — and all
three give the same logits and gradients (to rounding); ``form=None`` uses chunkwise for several tokens
and recurrent for one. With a cache, each layer keeps one fixed-size state: decoding memory does not
grow with the context.

Shapes: B batch, T length, C width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scaleformer.cache import RetentionCache
from scaleformer.config import RetNetConfig
from scaleformer.layers.block import Block
from scaleformer.layers.context import Context, positions_from_mask
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.layers.norms import make_norm
from scaleformer.layers.retention import MultiScaleRetention
from scaleformer.layers.scaling import residual_scaling
from scaleformer.models.base import LanguageModel, ModelOutput, run_blocks
from scaleformer.models.inputs import (check_attention_mask, check_cache_batch, check_document_ids, check_token_ids,
                                       new_token_mask)
from scaleformer.ops.retention import Form

__all__ = ["RetNet", "retnet_blocks"]


def retnet_blocks(cfg: RetNetConfig) -> list[Block]:
    """RetNet's layers: retention, then a (SwiGLU) FFN, under Pre-LN or DeepNorm."""
    scaling = residual_scaling(cfg.norm, "decoder", "decoder", cfg.layers, cfg.layers)
    rates = [cfg.drop_path * i / (cfg.layers - 1) for i in range(cfg.layers)] if cfg.layers > 1 else [cfg.drop_path]
    return [Block(MultiScaleRetention(cfg.embed_dim, cfg.value_dim, cfg.heads, decay=cfg.decay, norm_eps=cfg.norm_eps,
                                      rope_base=cfg.rope_base, gain=scaling.gain, normalizer=cfg.normalizer,
                                      chunk_size=cfg.chunk_size),
                  _ffn(cfg, index, scaling.gain), norm=lambda: make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps),
                  scheme=cfg.norm, alpha=scaling.alpha, dropout=cfg.dropout, drop_path=rate)
            for index, rate in enumerate(rates)]


def _ffn(cfg: RetNetConfig, index: int, gain: float) -> nn.Module:
    if cfg.moe is not None and cfg.moe.is_moe_layer(index):
        return MoEFeedForward(cfg.moe, cfg.embed_dim, cfg.ffn_dim, kind=cfg.ffn, activation=cfg.activation,
                              bias=False, activation_dropout=cfg.activation_dropout, gain=gain)
    return FeedForward(cfg.embed_dim, cfg.ffn_dim, kind=cfg.ffn, activation=cfg.activation, bias=False,
                       activation_dropout=cfg.activation_dropout, gain=gain)


class RetNet(LanguageModel):
    """Retentive network language model; owns its embedding and output head."""

    def __init__(self, cfg: RetNetConfig) -> None:
        super().__init__(cfg)
        self.embed_scale = cfg.embed_dim**0.5 if cfg.scale_embeddings else 1.0
        self.embedding_norm = make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(retnet_blocks(cfg))
        self.final_norm = make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if cfg.norm == "pre" else None

    def new_cache(self) -> RetentionCache:
        return RetentionCache.empty(len(self.blocks))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: RetentionCache | None = None, form: Form | None = None,
                document_ids: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V).

        ``attention_mask`` (B, T): 1 = token, 0 = padding (anywhere; padding is invisible to real tokens).
        With ``use_cache`` (or a ``cache``), each layer's state is carried in the cache: prefill a prompt in
        one call, then feed one token per call. ``document_ids`` (B, T) packs several documents in a row:
        each starts from an empty state at position 0.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        if use_cache and cache is None:
            cache = self.new_cache()
        check_cache_batch(cache.batch_size if cache is not None else None, input_ids)
        check_document_ids(document_ids, input_ids, cache)
        ctx = self._context(input_ids, new_token_mask(attention_mask, input_ids, cache), cache, form, document_ids)
        x = self.embed_tokens(input_ids) * self.embed_scale
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = run_blocks(self.blocks, self.dropout(x), ctx, cache.layers if cache is not None else None,
                       recompute=self.config.checkpoint_activations and self.training)
        if cache is not None:
            cache.advance(ctx.token_mask if ctx.token_mask is not None else torch.ones_like(input_ids, dtype=torch.bool))
        return self.output(self.final_norm(x) if self.final_norm is not None else x, cache)

    @staticmethod
    def _context(input_ids: Tensor, mask: Tensor | None, cache: RetentionCache | None, form: Form | None,
                 document_ids: Tensor | None) -> Context:
        start = cache.next_position if cache is not None and cache.length else None
        mask = mask.bool() if mask is not None else None
        real = mask if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        positions = positions_from_mask(real, start, document_ids)
        return Context(positions=positions, key_positions=positions, causal=True, token_mask=mask,
                       document_ids=document_ids, form=form)
