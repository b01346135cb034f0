"""The Transformer family: Encoder (BERT-like), Decoder (GPT-like), EncoderDecoder (MT-like).

Each model owns its embeddings, positions and output head; ``scaleformer.build(config)`` gives a model
that runs as is. Shapes: B batch, T length, S source length, C width, V vocabulary.

Positions count real tokens only (``attention_mask`` 1 = token, 0 = padding), so a left-padded row gives
the same logits for its tokens as the same row unpadded, and cached decoding continues each row's count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scaleformer.cache import TransformerCache
from scaleformer.config import TransformerConfig
from scaleformer.layers.attention import MultiheadAttention
from scaleformer.layers.block import Block
from scaleformer.layers.context import Context, positions_from_mask
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.moe import MoEFeedForward
from scaleformer.layers.multiway import Multiway, per_way
from scaleformer.layers.norms import make_norm
from scaleformer.layers.positions import LearnedPositions, RelativePositionBias, Rotary, sinusoidal_positions
from scaleformer.layers.scaling import ResidualScaling, residual_scaling
from scaleformer.models.base import LanguageModel, ModelOutput, new_embedding, run_blocks
from scaleformer.models.inputs import (check_attention_mask, check_cache_batch, check_document_ids, check_token_ids,
                                       new_token_mask)

__all__ = ["ModelOutput", "TransformerStack", "Encoder", "Decoder", "EncoderDecoder", "transformer_blocks"]


def transformer_blocks(cfg: TransformerConfig, side: str) -> list[Block]:
    """The blocks of the ``side`` ("encoder" or "decoder") stack of ``cfg``."""
    count = cfg.layers if side == "encoder" or cfg.arch != "encoder_decoder" else cfg.num_decoder_layers
    encoder_layers, decoder_layers = (cfg.layers, cfg.num_decoder_layers) if cfg.arch == "encoder_decoder" else (count, count)
    scaling = residual_scaling(cfg.norm, side, cfg.arch, encoder_layers, decoder_layers)
    rates = [cfg.drop_path * i / max(count - 1, 1) for i in range(count)] if count > 1 else [cfg.drop_path]
    norm = lambda dim=cfg.embed_dim: make_norm(cfg.norm_type, dim, cfg.norm_eps)  # noqa: E731
    cross = side == "decoder" and cfg.arch == "encoder_decoder"
    return [Block(_self_attention(cfg, side, scaling), _ffn(cfg, index, scaling), norm=norm, scheme=cfg.norm,
                  alpha=scaling.alpha, ways=cfg.multiway, dropout=cfg.dropout, drop_path=rate,
                  cross_attn=_cross_attention(cfg, scaling) if cross else None)
            for index, rate in enumerate(rates)]


def _self_attention(cfg: TransformerConfig, side: str, scaling: ResidualScaling) -> MultiheadAttention:
    subln = cfg.norm == "subln"
    return MultiheadAttention(
        cfg.embed_dim, cfg.heads, kv_heads=cfg.kv_heads, bias=cfg.bias, attention_dropout=cfg.attention_dropout,
        inner_norm=(lambda: make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)) if subln else None,
        gain=scaling.gain, impl=cfg.attention_impl, window=cfg.window,
        block=cfg.blockwise_causal_block if side == "decoder" else None,
        dilated=(cfg.segment_lengths, cfg.dilation_rates) if cfg.attention == "dilated" else None,
        ways=cfg.multiway if cfg.multiway_scope == "all" else 1)


def _cross_attention(cfg: TransformerConfig, scaling: ResidualScaling) -> MultiheadAttention:
    return MultiheadAttention(cfg.embed_dim, cfg.heads, kv_heads=cfg.kv_heads, bias=cfg.bias,
                              attention_dropout=cfg.attention_dropout, gain=scaling.cross_gain,
                              impl=cfg.attention_impl)


def _ffn(cfg: TransformerConfig, index: int, scaling: ResidualScaling) -> nn.Module:
    subln = cfg.norm == "subln"
    if cfg.moe is not None and cfg.moe.is_moe_layer(index):
        return MoEFeedForward(cfg.moe, cfg.embed_dim, cfg.ffn_dim, kind=cfg.ffn, activation=cfg.activation,
                              bias=cfg.bias, activation_dropout=cfg.activation_dropout,
                              inner_norm=cfg.norm_type if subln else None, norm_eps=cfg.norm_eps, gain=scaling.gain)
    return per_way(lambda: FeedForward(
        cfg.embed_dim, cfg.ffn_dim, kind=cfg.ffn, activation=cfg.activation, bias=cfg.bias,
        activation_dropout=cfg.activation_dropout,
        inner_norm=make_norm(cfg.norm_type, cfg.ffn_dim, cfg.norm_eps) if subln else None, gain=scaling.gain),
        cfg.multiway)


class TransformerStack(nn.Module):
    """Token + position embeddings, a stack of blocks, final norm: one side of a model."""

    def __init__(self, cfg: TransformerConfig, side: str, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = side == "decoder"
        self.embed_tokens = embed_tokens
        self.embed_scale = cfg.embed_dim**0.5 if cfg.scale_embeddings else 1.0
        self.embed_positions = LearnedPositions(cfg.max_positions, cfg.embed_dim) if cfg.position == "absolute" else None
        self.rotary = (Rotary(cfg.head_dim, cfg.rope_base, cfg.xpos_scale_base if cfg.position == "xpos" else None)
                       if cfg.position in ("rope", "xpos") else None)
        self.relative_bias = (RelativePositionBias(cfg.heads, bidirectional=not self.causal,
                                                   num_buckets=cfg.relative_buckets,
                                                   max_distance=cfg.relative_max_distance)
                              if cfg.position == "relative" else None)
        # Multiway scope "all" (TorchScale's BEiT-3): the embedding and final norms get per-way copies too.
        stack_norm = lambda: per_way(lambda: make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps),  # noqa: E731
                                     cfg.multiway if cfg.multiway_scope == "all" else 1)
        self.embedding_norm = stack_norm() if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(transformer_blocks(cfg, side))
        # Pre-LN and Sub-LN leave the residual stream unnormalized; Post-LN/DeepNorm end on a norm already.
        self.final_norm = stack_norm() if cfg.norm in ("pre", "subln") else None

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, cache: TransformerCache | None = None,
                encoder_hidden: Tensor | None = None, encoder_mask: Tensor | None = None,
                multiway_split: int | None = None, sequence_group: dist.ProcessGroup | None = None,
                document_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> hidden (B, T, C); appends to ``cache`` when given.

        ``sequence_group``: the input is this rank's shard (rank i holds positions [i·T, (i+1)·T)) of a
        sequence split across the group; dilated attention then runs sequence-parallel.
        ``document_ids`` (B, T): packed rows; positions restart and attention stays within each document.
        """
        ctx = self.context(input_ids, attention_mask, cache, sequence_group, document_ids)
        ctx.way_ids = self._way_ids(ctx.positions, multiway_split)
        ctx.encoder_hidden = encoder_hidden
        ctx.encoder_mask = encoder_mask.bool() if encoder_mask is not None else None
        x = self.embed(input_ids, ctx)
        x = run_blocks(self.blocks, x, ctx, cache.layers if cache is not None else None,
                       recompute=self.cfg.checkpoint_activations and self.training)
        if cache is not None and self.cfg.window is not None:
            cache.forget_outside(self.cfg.window)
        return Multiway.apply(self.final_norm, x, ctx.way_ids) if self.final_norm is not None else x

    def context(self, input_ids: Tensor, attention_mask: Tensor | None, cache: TransformerCache | None,
                sequence_group: dist.ProcessGroup | None, document_ids: Tensor | None) -> Context:
        """This call's positions and keys (appending the new tokens to ``cache``), shared by every layer."""
        b, t = input_ids.shape
        if sequence_group is not None:
            self._check_sequence_parallel(attention_mask, cache)
            start = torch.full((b,), dist.get_rank(sequence_group) * t, device=input_ids.device)
        else:
            start = cache.next_position if cache is not None and cache.length else None
        mask = attention_mask.bool() if attention_mask is not None else None
        real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        positions = positions_from_mask(real, start, document_ids)
        self._check_positions(positions, self.embed_tokens.weight.dtype)
        past, key_mask, key_positions = 0, mask, positions
        if cache is not None:
            past = cache.held
            cache.append_tokens(real, positions)
            key_mask, key_positions = cache.key_mask, cache.key_positions
        ctx = Context(positions=positions, key_positions=key_positions, causal=self.causal, token_mask=mask,
                      key_mask=key_mask, past=past, document_ids=document_ids, sequence_group=sequence_group,
                      rotary=self.rotary)
        if self.relative_bias is not None:
            ctx.relative_bias = self.relative_bias(positions, key_positions)
        return ctx

    def embed(self, input_ids: Tensor, ctx: Context) -> Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        if self.embed_positions is not None:
            x = x + self.embed_positions(ctx.positions)
        elif self.cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(ctx.positions, self.cfg.embed_dim, x.dtype)
        if self.embedding_norm is not None:
            x = Multiway.apply(self.embedding_norm, x, ctx.way_ids)
        return self.dropout(x)

    def _check_positions(self, positions: Tensor, dtype: torch.dtype) -> None:
        if self.embed_positions is None and (self.rotary is None or self.rotary.scale_base is None):
            return
        last = int(positions.max())
        if self.embed_positions is not None and last >= self.cfg.max_positions:
            raise ValueError(f"position {last} is beyond the learned position table (max_positions="
                             f"{self.cfg.max_positions}); use a shorter input or a larger max_positions")
        if self.rotary is not None and self.rotary.scale_base is not None:
            limit = self.rotary.max_xpos_position(dtype)
            if last > limit:
                raise ValueError(f"position {last} overflows xPos scaling in {dtype} (limit {limit} with "
                                 f"xpos_scale_base={self.cfg.xpos_scale_base}); raise xpos_scale_base or use float64")

    def _check_sequence_parallel(self, attention_mask: Tensor | None, cache: TransformerCache | None) -> None:
        if self.cfg.attention != "dilated":
            raise ValueError("sequence parallelism splits dilated attention: it needs attention='dilated'")
        if attention_mask is not None or cache is not None:
            raise ValueError("sequence-parallel forward takes packed, unpadded shards and no cache")
        if self.cfg.arch == "encoder_decoder":
            raise ValueError("sequence parallelism is supported for arch='encoder' and 'decoder'")

    def _way_ids(self, positions: Tensor, multiway_split: int | None) -> Tensor | None:
        if self.cfg.multiway == 1:
            if multiway_split is not None:
                raise ValueError("multiway_split was given but the model has multiway=1")
            return None
        if multiway_split is None:
            raise ValueError(f"this model has multiway={self.cfg.multiway}: pass multiway_split=<first position "
                             f"of the second modality> (e.g. the number of image tokens)")
        return (positions >= multiway_split).long()


class Encoder(LanguageModel):
    """Bidirectional encoder with a token-prediction head (BERT-like)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.encoder = TransformerStack(cfg, "encoder", self.embed_tokens)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None, multiway_split: int | None = None,
                sequence_group: dist.ProcessGroup | None = None, document_ids: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V); ``document_ids`` (B, T) packs several documents in a row."""
        if use_cache or cache is not None:
            raise ValueError("Encoder is bidirectional: every token sees the whole input, so there is no "
                             "incremental decoding cache; call it on the full input")
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        check_document_ids(document_ids, input_ids, None)
        hidden = self.encoder(input_ids, attention_mask=attention_mask, multiway_split=multiway_split,
                              sequence_group=sequence_group, document_ids=document_ids)
        return self.output(hidden)


class Decoder(LanguageModel):
    """Causal language model (GPT-like)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.decoder = TransformerStack(cfg, "decoder", self.embed_tokens)

    def new_cache(self) -> TransformerCache:
        return TransformerCache.empty(len(self.decoder.blocks))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None, multiway_split: int | None = None,
                sequence_group: dist.ProcessGroup | None = None, document_ids: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T) covers the new tokens (1 = token, 0 = padding).

        With ``use_cache`` (or a ``cache``), the new tokens' keys/values are appended to the cache
        (a fresh one when ``cache`` is None) and attention covers everything cached. With
        ``sequence_group`` (LongNet), ``input_ids`` is this rank's shard of a longer sequence.
        ``document_ids`` (B, T) packs several documents in a row: each is modelled as if it were alone.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            check_cache_batch(cache.batch_size, input_ids)
        check_document_ids(document_ids, input_ids, cache)
        hidden = self.decoder(input_ids, attention_mask=new_token_mask(attention_mask, input_ids, cache),
                              cache=cache, multiway_split=multiway_split, sequence_group=sequence_group,
                              document_ids=document_ids)
        return self.output(hidden, cache)


class EncoderDecoder(LanguageModel):
    """Sequence-to-sequence model (MT-like): source ids through the encoder, target ids through the decoder."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.encoder = TransformerStack(cfg, "encoder", self.embed_tokens)
        target_embedding = (self.embed_tokens if cfg.share_encoder_decoder_embeddings
                            else new_embedding(cfg.vocab_size, cfg.embed_dim))
        self.decoder = TransformerStack(cfg, "decoder", target_embedding)

    def new_cache(self) -> TransformerCache:
        return TransformerCache.empty(len(self.decoder.blocks))

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src_ids (B, S) -> encoder hidden states (B, S, C)."""
        return self.encoder(src_ids, attention_mask=src_mask)

    def forward(self, src_ids: Tensor | None, tgt_ids: Tensor, *, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None) -> ModelOutput:
        """src_ids (B, S) and tgt_ids (B, T) -> logits (B, T, V) for the next target token.

        With a cache that already holds the encoded source, ``src_ids`` may be None: the source is
        encoded once, at the first (prefill) call.
        """
        check_token_ids(tgt_ids, self.config.vocab_size, "tgt_ids")
        check_attention_mask(tgt_mask, "tgt_mask")
        if src_ids is not None:
            check_token_ids(src_ids, self.config.vocab_size, "src_ids")
            check_attention_mask(src_mask, "src_mask")
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            check_cache_batch(cache.batch_size, tgt_ids, "tgt_ids")
        encoder_hidden, src_mask = self._encoded_source(src_ids, src_mask, cache)
        hidden = self.decoder(tgt_ids, attention_mask=new_token_mask(tgt_mask, tgt_ids, cache), cache=cache,
                              encoder_hidden=encoder_hidden, encoder_mask=src_mask)
        return self.output(hidden, cache, self.decoder.embed_tokens)

    def _encoded_source(self, src_ids: Tensor | None, src_mask: Tensor | None,
                        cache: TransformerCache | None) -> tuple[Tensor, Tensor]:
        """The encoder's output and source mask: from the cache when it holds them, else encoded now."""
        if cache is not None and cache.encoder_hidden is not None:
            assert cache.encoder_mask is not None
            return cache.encoder_hidden, cache.encoder_mask
        if src_ids is None:
            raise ValueError("src_ids is required unless the cache already holds the encoded source")
        encoder_hidden = self.encode(src_ids, src_mask)
        src_mask = torch.ones(src_ids.shape, dtype=torch.bool, device=src_ids.device) if src_mask is None else src_mask.bool()
        if cache is not None:
            cache.encoder_hidden, cache.encoder_mask = encoder_hidden, src_mask
        return encoder_hidden, src_mask
