"""The Transformer family: Encoder (BERT-like), Decoder (GPT-like), EncoderDecoder (MT-like).

Each model owns its embeddings, positions and output head; ``scaleformer.build(config)`` gives a model
that runs as is. Shapes: B batch, T length, S source length, C width, V vocabulary.

Positions count real tokens only (``attention_mask`` 1 = token, 0 = padding), so a left-padded row gives
the same logits for its tokens as the same row unpadded, and cached decoding continues each row's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scaleformer.cache import TransformerCache
from scaleformer.config import TransformerConfig
from scaleformer.layers.block import BlockSpec, TransformerBlock
from scaleformer.layers.moe import moe_layers
from scaleformer.layers.multiway import Multiway
from scaleformer.layers.norms import make_norm
from scaleformer.layers.positions import LearnedPositions, RelativePositionBias, Rotary, sinusoidal_positions
from scaleformer.layers.scaling import residual_scaling
from scaleformer.models.inputs import check_attention_mask, check_cache_batch, check_token_ids, new_token_mask
from scaleformer.ops.dilated import dilated_bias

__all__ = ["ModelOutput", "TransformerStack", "Encoder", "Decoder", "EncoderDecoder"]


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    cache: TransformerCache | None = None
    aux_loss: Tensor | None = None  # scalar; 0 for dense models (MoE layers add their balance loss)
    hidden_states: Tensor | None = None  # (B, T, C) after the final norm


def block_specs(cfg: TransformerConfig, side: str) -> list[BlockSpec]:
    """One BlockSpec per layer of the ``side`` ("encoder" or "decoder") stack of ``cfg``."""
    enc_layers = cfg.layers
    dec_layers = cfg.num_decoder_layers
    count = enc_layers if side == "encoder" else dec_layers
    if cfg.arch != "encoder_decoder":
        enc_layers = dec_layers = count = cfg.layers
    scaling = residual_scaling(cfg.norm, side, cfg.arch, enc_layers, dec_layers)
    drop_rates = [cfg.drop_path * i / max(count - 1, 1) for i in range(count)] if count > 1 else [cfg.drop_path]
    moe = [cfg.moe if cfg.moe is not None and cfg.moe.is_moe_layer(i) else None for i in range(count)]
    return [BlockSpec(
        embed_dim=cfg.embed_dim, heads=cfg.heads, ffn_dim=cfg.ffn_dim, ffn=cfg.ffn, activation=cfg.activation,
        norm=cfg.norm, norm_type=cfg.norm_type, norm_eps=cfg.norm_eps, bias=cfg.bias, dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
        drop_path=rate, alpha=scaling.alpha, gain=scaling.gain, cross_gain=scaling.cross_gain,
        cross_attention=(side == "decoder" and cfg.arch == "encoder_decoder"), multiway=cfg.multiway,
        multiway_scope=cfg.multiway_scope,
        attention_impl=cfg.attention_impl, segment_lengths=cfg.segment_lengths, dilation_rates=cfg.dilation_rates,
        moe=moe[i]) for i, rate in enumerate(drop_rates)]


def positions_from_mask(mask: Tensor, start: Tensor | None) -> Tensor:
    """(B, T) bool mask -> (B, T) long positions counting real tokens from ``start`` (B,) (0 if None).

    Padding slots get the position of the next real token (clamped at ``start``); they are masked out
    of attention anyway.
    """
    positions = mask.long().cumsum(1) - 1
    if start is not None:
        positions = positions + start[:, None]
        return torch.maximum(positions, start[:, None])
    return positions.clamp(min=0)


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
        stack_norm = lambda: make_norm(cfg.norm_type, cfg.embed_dim, cfg.norm_eps)  # noqa: E731
        per_way = (lambda make: Multiway(make, cfg.multiway)) if cfg.multiway_scope == "all" else (lambda make: make())
        self.embedding_norm = per_way(stack_norm) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(spec) for spec in block_specs(cfg, side))
        # Pre-LN and Sub-LN leave the residual stream unnormalized; Post-LN/DeepNorm end on a norm already.
        self.final_norm = per_way(stack_norm) if cfg.norm in ("pre", "subln") else None

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

    def _stack_norm(self, norm: nn.Module, x: Tensor, way_ids: Tensor | None) -> Tensor:
        return norm(x, way_ids) if isinstance(norm, Multiway) else norm(x)

    def embed(self, input_ids: Tensor, positions: Tensor, way_ids: Tensor | None = None) -> Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        elif self.cfg.position == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.cfg.embed_dim, x.dtype)
        if self.embedding_norm is not None:
            x = self._stack_norm(self.embedding_norm, x, way_ids)
        return self.dropout(x)

    def _attention_mask(self, query_mask: Tensor, key_mask: Tensor, query_positions: Tensor,
                        key_positions: Tensor, past: int) -> Tensor:
        """Bool (B, 1, T, S): key is real [and causal, blockwise] — or the key is the query itself."""
        t, s = query_mask.shape[1], key_mask.shape[1]
        q_slot = torch.arange(past, past + t, device=key_mask.device)[:, None]
        k_slot = torch.arange(s, device=key_mask.device)[None, :]
        visible = key_mask[:, None, :]  # (B, 1, S)
        if self.causal:
            visible = visible & (k_slot <= q_slot)
            block = self.cfg.blockwise_causal_block
            if block is not None:
                visible = visible & (key_positions[:, None, :] // block >= query_positions[:, :, None] // block - 1)
        return (visible | (k_slot == q_slot))[:, None]

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, cache: TransformerCache | None = None,
                encoder_hidden: Tensor | None = None, encoder_mask: Tensor | None = None,
                multiway_split: int | None = None, sequence_group: dist.ProcessGroup | None = None) -> Tensor:
        """input_ids (B, T) -> hidden (B, T, C); appends to ``cache`` when given.

        ``sequence_group``: the input is this rank's shard (rank i holds positions [i·T, (i+1)·T)) of a
        sequence split across the group; dilated attention then runs sequence-parallel.
        """
        b, t = input_ids.shape
        if sequence_group is not None:
            self._check_sequence_parallel(attention_mask, cache)
            start = torch.full((b,), dist.get_rank(sequence_group) * t, device=input_ids.device)
        else:
            start = cache.next_position if cache is not None and cache.length else None
        padded = attention_mask is not None
        mask = attention_mask.bool() if padded else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        positions = positions_from_mask(mask, start)
        self._check_positions(positions, self.embed_tokens.weight.dtype)
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.append_tokens(mask, positions)
            key_mask, key_positions = cache.key_mask, cache.key_positions
            assert key_mask is not None and key_positions is not None
        else:
            key_mask, key_positions = mask, positions

        # Dilated attention runs its own op over a whole sequence; cached steps use its dense equivalent.
        use_dilated = self.cfg.attention == "dilated" and past == 0
        simple_causal = self.causal and not padded and past == 0 and self.cfg.blockwise_causal_block is None
        simple = use_dilated or simple_causal or (not self.causal and not padded)
        attn_mask = None if simple else self._attention_mask(mask, key_mask, positions, key_positions, past)
        bias = self.relative_bias(positions, key_positions) if self.relative_bias is not None else None
        if self.cfg.attention == "dilated" and not use_dilated:
            attn_mask, bias = self._dilated_mask_and_bias(attn_mask, positions, key_positions)
        way_ids = self._way_ids(positions, multiway_split)
        cross_mask = encoder_mask[:, None, None, :].bool() if encoder_mask is not None else None

        x = self.embed(input_ids, positions, way_ids)
        for index, block in enumerate(self.blocks):
            cross_kv = self._cross_keys_values(index, block, encoder_hidden, cache)
            kwargs = dict(mask=attn_mask, bias=bias, causal=simple_causal or (use_dilated and self.causal),
                          rotary=self.rotary, positions=positions,
                          cache=cache.layers[index] if cache is not None else None, cross_keys_values=cross_kv,
                          cross_mask=cross_mask, way_ids=way_ids, use_dilated=use_dilated,
                          dilated_key_mask=mask if use_dilated and padded else None, sequence_group=sequence_group,
                          token_mask=mask if padded else None)
            if self.cfg.checkpoint_activations and self.training and cache is None:
                x = checkpoint(lambda h, blk=block, kw=kwargs: blk(h, **kw), x, use_reentrant=False)
            else:
                x = block(x, **kwargs)
        return self._stack_norm(self.final_norm, x, way_ids) if self.final_norm is not None else x

    def _check_sequence_parallel(self, attention_mask: Tensor | None, cache: TransformerCache | None) -> None:
        if self.cfg.attention != "dilated":
            raise ValueError("sequence parallelism splits dilated attention: it needs attention='dilated'")
        if attention_mask is not None or cache is not None:
            raise ValueError("sequence-parallel forward takes packed, unpadded shards and no cache")
        if self.cfg.arch == "encoder_decoder":
            raise ValueError("sequence parallelism is supported for arch='encoder' and 'decoder'")

    def _dilated_mask_and_bias(self, mask: Tensor, query_positions: Tensor, key_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Dense equivalent of dilated attention for cached steps: bias log c (B, H, T, S), mask refined.

        A query that no pattern links to any real key (only padding queries) keeps only its own slot,
        with bias 0, like every other padding query.
        """
        cfg = self.cfg
        bias = dilated_bias(query_positions, key_positions, heads=cfg.heads, segment_lengths=cfg.segment_lengths,
                            dilation_rates=cfg.dilation_rates, causal=self.causal)
        past = mask.shape[-1] - mask.shape[-2]
        t, s = mask.shape[-2], mask.shape[-1]
        own_slot = torch.arange(s, device=mask.device)[None, :] == torch.arange(past, past + t, device=mask.device)[:, None]
        linked = mask & torch.isfinite(bias)
        fallback = ~linked.any(-1, keepdim=True) & own_slot
        return linked | fallback, torch.where(linked, bias, 0.0).to(self.embed_tokens.weight.dtype)

    def _way_ids(self, positions: Tensor, multiway_split: int | None) -> Tensor | None:
        if self.cfg.multiway == 1:
            if multiway_split is not None:
                raise ValueError("multiway_split was given but the model has multiway=1")
            return None
        if multiway_split is None:
            raise ValueError(f"this model has multiway={self.cfg.multiway}: pass multiway_split=<first position "
                             f"of the second modality> (e.g. the number of image tokens)")
        return (positions >= multiway_split).long()

    @staticmethod
    def _cross_keys_values(index: int, block: TransformerBlock, encoder_hidden: Tensor | None,
                           cache: TransformerCache | None) -> tuple[Tensor, Tensor] | None:
        if not block.spec.cross_attention:
            return None
        if cache is not None and cache.cross[index] is not None:
            return cache.cross[index]
        assert encoder_hidden is not None
        keys_values = block.cross_attn.project_source(encoder_hidden)
        if cache is not None:
            cache.cross[index] = keys_values
        return keys_values


class _LanguageModelBase(nn.Module):
    """Token embedding + output head (tied or not) shared by the three models."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = self._new_embedding()
        self.output_projection = None if cfg.tie_embeddings else self._new_head()

    def _new_embedding(self) -> nn.Embedding:
        embedding = nn.Embedding(self.config.vocab_size, self.config.embed_dim)
        nn.init.normal_(embedding.weight, std=self.config.embed_dim**-0.5)
        return embedding

    def _new_head(self) -> nn.Linear:
        head = nn.Linear(self.config.embed_dim, self.config.vocab_size, bias=False)
        nn.init.normal_(head.weight, std=self.config.embed_dim**-0.5)
        return head

    def logits(self, hidden: Tensor, embedding: nn.Embedding) -> Tensor:
        if self.output_projection is not None:
            return self.output_projection(hidden)
        return F.linear(hidden, embedding.weight)

    def _zero_aux(self, hidden: Tensor) -> Tensor:
        """Sum of the MoE layers' weighted balance losses of this forward (0 for a dense model)."""
        zero = hidden.new_zeros(())
        if self.config.moe is None:  # walking the module tree costs ~0.1 ms a call: only when there is MoE
            return zero
        return sum((layer.aux_loss for layer in moe_layers(self) if layer.aux_loss is not None), zero)


class Encoder(_LanguageModelBase):
    """Bidirectional encoder with a token-prediction head (BERT-like)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.encoder = TransformerStack(cfg, "encoder", self.embed_tokens)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None, multiway_split: int | None = None,
                sequence_group: dist.ProcessGroup | None = None) -> ModelOutput:
        if use_cache or cache is not None:
            raise ValueError("Encoder is bidirectional: every token sees the whole input, so there is no "
                             "incremental decoding cache; call it on the full input")
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        hidden = self.encoder(input_ids, attention_mask=attention_mask, multiway_split=multiway_split,
                              sequence_group=sequence_group)
        return ModelOutput(self.logits(hidden, self.embed_tokens), None, self._zero_aux(hidden), hidden)


class Decoder(_LanguageModelBase):
    """Causal language model (GPT-like)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.decoder = TransformerStack(cfg, "decoder", self.embed_tokens)

    def new_cache(self) -> TransformerCache:
        return TransformerCache.empty(len(self.decoder.blocks))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None, multiway_split: int | None = None,
                sequence_group: dist.ProcessGroup | None = None) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T) covers the new tokens (1 = token, 0 = padding).

        With ``use_cache`` (or a ``cache``), the new tokens' keys/values are appended to the cache
        (a fresh one when ``cache`` is None) and attention covers everything cached. With
        ``sequence_group`` (LongNet), ``input_ids`` is this rank's shard of a longer sequence.
        """
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            check_cache_batch(cache.batch_size, input_ids)
        hidden = self.decoder(input_ids, attention_mask=new_token_mask(attention_mask, input_ids, cache),
                              cache=cache, multiway_split=multiway_split, sequence_group=sequence_group)
        return ModelOutput(self.logits(hidden, self.embed_tokens), cache, self._zero_aux(hidden), hidden)


class EncoderDecoder(_LanguageModelBase):
    """Sequence-to-sequence model (MT-like): source ids through the encoder, target ids through the decoder."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.encoder = TransformerStack(cfg, "encoder", self.embed_tokens)
        target_embedding = self.embed_tokens if cfg.share_encoder_decoder_embeddings else self._new_embedding()
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
        if cache is not None and cache.encoder_hidden is not None:
            encoder_hidden, src_mask = cache.encoder_hidden, cache.encoder_mask
        else:
            if src_ids is None:
                raise ValueError("src_ids is required unless the cache already holds the encoded source")
            encoder_hidden = self.encode(src_ids, src_mask)
            if src_mask is None:
                src_mask = torch.ones(src_ids.shape, dtype=torch.bool, device=src_ids.device)
            if cache is not None:
                cache.encoder_hidden, cache.encoder_mask = encoder_hidden, src_mask.bool()
        hidden = self.decoder(tgt_ids, attention_mask=new_token_mask(tgt_mask, tgt_ids, cache), cache=cache,
                              encoder_hidden=encoder_hidden, encoder_mask=src_mask)
        return ModelOutput(self.logits(hidden, self.decoder.embed_tokens), cache, self._zero_aux(hidden), hidden)

