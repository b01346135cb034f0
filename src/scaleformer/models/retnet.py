"""RetNet (arXiv 2307.08621): a decoder-only LM with multi-scale retention instead of attention.

The form is chosen per call — ``model(ids, form="parallel" | "chunkwise" | "recurrent")`` — and all
three give the same logits and gradients (to rounding); ``form=None`` uses chunkwise for several tokens
and recurrent for one. With a cache, each layer keeps one fixed-size state: decoding memory does not
grow with the context.

Shapes: B batch, T length, C width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scaleformer.cache import RetentionCache
from scaleformer.config import RetNetConfig
from scaleformer.layers.block import DropPath, residual
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.moe import MoEFeedForward, moe_layers
from scaleformer.layers.norms import make_norm
from scaleformer.layers.retention import MultiScaleRetention, RetentionTerms
from scaleformer.layers.scaling import residual_scaling
from scaleformer.models.inputs import check_attention_mask, check_cache_batch, check_token_ids, new_token_mask
from scaleformer.models.transformer import ModelOutput, positions_from_mask
from scaleformer.ops.retention import Form

__all__ = ["RetNet", "RetNetBlock"]


class RetNetBlock(nn.Module):
    """x + MSR(N(x)), then x + FFN(N(x)) (Pre-LN), or N(α·x + f(x)) under DeepNorm."""

    def __init__(self, cfg: RetNetConfig, *, drop_path: float, alpha: float, gain: float, moe: bool = False) -> None:
        super().__init__()
        self.scheme, self.alpha = cfg.norm, alpha
        self.retention = MultiScaleRetention(cfg.embed_dim, cfg.value_dim, cfg.heads, decay=cfg.decay,
                                             norm_eps=cfg.norm_eps, rope_base=cfg.rope_base, gain=gain,
                                             normalizer=cfg.normalizer)
        self.retention_norm = make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)
        self.ffn: nn.Module
        if moe and cfg.moe is not None:
            self.ffn = MoEFeedForward(cfg.moe, cfg.embed_dim, cfg.ffn_dim, kind=cfg.ffn, activation=cfg.activation,
                                      bias=False, activation_dropout=cfg.activation_dropout, gain=gain)
        else:
            self.ffn = FeedForward(cfg.embed_dim, cfg.ffn_dim, kind=cfg.ffn, activation=cfg.activation, bias=False,
                                   activation_dropout=cfg.activation_dropout, gain=gain)
        self.is_moe = isinstance(self.ffn, MoEFeedForward)
        self.ffn_norm = make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, *, positions: Tensor, mask: Tensor | None, form: Form, chunk_size: int,
                state: Tensor | None, output_final_state: bool,
                terms: RetentionTerms | None = None) -> tuple[Tensor, Tensor | None]:
        new_state: list[Tensor | None] = [None]

        def mix(h: Tensor) -> Tensor:
            out, new_state[0] = self.retention(h, positions=positions, mask=mask, form=form, chunk_size=chunk_size,
                                               state=state, output_final_state=output_final_state, terms=terms)
            return out

        common = dict(scheme=self.scheme, alpha=self.alpha, dropout=self.dropout, drop_path=self.drop_path)
        x = residual(x, mix, self.retention_norm, **common)
        ffn = (lambda h: self.ffn(h, mask)) if self.is_moe else self.ffn  # MoE routes real tokens only
        x = residual(x, ffn, self.ffn_norm, **common)
        return x, new_state[0]


class RetNet(nn.Module):
    """Retentive network language model; owns its embedding and output head."""

    def __init__(self, cfg: RetNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        nn.init.normal_(self.embed_tokens.weight, std=cfg.embed_dim**-0.5)
        self.embed_scale = cfg.embed_dim**0.5 if cfg.scale_embeddings else 1.0
        self.embedding_norm = make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        scaling = residual_scaling(cfg.norm, "decoder", "decoder", cfg.layers, cfg.layers)
        rates = [cfg.drop_path * i / (cfg.layers - 1) for i in range(cfg.layers)] if cfg.layers > 1 else [cfg.drop_path]
        self.blocks = nn.ModuleList(
            RetNetBlock(cfg, drop_path=rate, alpha=scaling.alpha, gain=scaling.gain,
                        moe=cfg.moe is not None and cfg.moe.is_moe_layer(i)) for i, rate in enumerate(rates))
        self.final_norm = make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps) if cfg.norm == "pre" else None
        self.output_projection = None
        if not cfg.tie_embeddings:
            self.output_projection = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
            nn.init.normal_(self.output_projection.weight, std=cfg.embed_dim**-0.5)

    def new_cache(self) -> RetentionCache:
        return RetentionCache.empty(len(self.blocks))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: RetentionCache | None = None, form: Form | None = None) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V).

        ``attention_mask`` (B, T): 1 = token, 0 = padding (anywhere; padding is invisible to real tokens).
        With ``use_cache`` (or a ``cache``), each layer's state is carried in the cache: prefill a prompt in
        one call, then feed one token per call.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        b, t = input_ids.shape
        if use_cache and cache is None:
            cache = self.new_cache()
        check_cache_batch(cache.batch_size if cache is not None else None, input_ids)
        mask = new_token_mask(attention_mask, input_ids, cache)
        start = cache.next_position if cache is not None and cache.length else None
        real = mask.bool() if mask is not None else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        positions = positions_from_mask(real, start)
        form = form if form is not None else ("recurrent" if t == 1 else "chunkwise")

        x = self.embed_tokens(input_ids) * self.embed_scale
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        x = self.dropout(x)
        # Rotation tables, decays and normalizer terms depend only on positions and are the same in every
        # layer (all layers share heads, decays and normalizer): computed once per call.
        terms = self.blocks[0].retention.position_terms(positions, x.dtype)
        for index, block in enumerate(self.blocks):
            kwargs = dict(positions=positions, mask=real if mask is not None else None, form=form, terms=terms,
                          chunk_size=self.config.chunk_size,
                          state=cache.states[index] if cache is not None else None,
                          output_final_state=cache is not None)
            if self.config.checkpoint_activations and self.training and cache is None:
                x, state = checkpoint(lambda h, blk=block, kw=kwargs: blk(h, **kw), x, use_reentrant=False)
            else:
                x, state = block(x, **kwargs)
            if cache is not None:
                cache.update(index, state)
        if cache is not None:
            cache.advance(real)
        hidden = self.final_norm(x) if self.final_norm is not None else x
        logits = self.output_projection(hidden) if self.output_projection is not None else F.linear(
            hidden, self.embed_tokens.weight)
        aux = hidden.new_zeros(())
        if self.config.moe is not None:  # walking the module tree costs ~0.1 ms a call: only when there is MoE
            aux = sum((layer.aux_loss for layer in moe_layers(self) if layer.aux_loss is not None), aux)
        return ModelOutput(logits, cache, aux, hidden)
