"""The models: Encoder (BERT-like), Decoder (GPT-like, and RetNet and every hybrid: a decoder is whatever its
layers are), EncoderDecoder (MT-like). Each is built from a :class:`~scaleformer.models.architecture.ModelConfig`
(a flat TransformerConfig converts to one per side).

Each model owns its embeddings, positions and output head; ``scaleformer.build(config)`` gives a model
that runs as is. Shapes: B batch, T length, S source length, C width, V vocabulary.

Positions count real tokens only (``attention_mask`` 1 = token, 0 = padding), so a left-padded row gives
the same logits for its tokens as the same row unpadded, and cached decoding continues each row's count.
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scaleformer.cache import LayerState, TransformerCache
from scaleformer.config import ConfigBase, TransformerConfig
from scaleformer.layers.bitlinear import to_bitlinear
from scaleformer.layers.context import Context, Source, positions_from_mask
from scaleformer.layers.multiway import Multiway, per_way
from scaleformer.layers.positions import (
    LearnedPositions,
    RelativePositionBias,
    Rotary,
    sinusoidal_positions,
)
from scaleformer.models.architecture import (
    DilatedAttention,
    EncoderDecoderConfig,
    LearnedPosition,
    ModelConfig,
    RoPE,
    SinusoidalPosition,
    T5Bias,
    XPos,
    rotated_heads,
)
from scaleformer.models.families import model_config
from scaleformer.models.base import LanguageModel, ModelOutput, new_embedding
from scaleformer.models.inputs import (
    check_attention_mask,
    check_cache_batch,
    check_contiguous_documents,
    check_document_ids,
    check_token_ids,
    document_runs,
    new_token_mask,
)
from scaleformer.ops.retention import Form

__all__ = ["ModelOutput", "TransformerStack", "Encoder", "Decoder", "EncoderDecoder"]


class TransformerStack(nn.Module):
    """Token + position embeddings, the blocks, a final norm: a model's one stack, or one side of an
    encoder-decoder."""

    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.causal = cfg.causal
        self.embed_tokens = embed_tokens
        self.embed_scale = cfg.embed_dim**0.5 if cfg.scale_embeddings else 1.0
        position = cfg.position
        self.embed_positions = (LearnedPositions(position.max_positions, cfg.embed_dim)
                                if isinstance(position, LearnedPosition) else None)
        self.rotary = self._rotary(cfg)
        self.relative_bias = None
        if isinstance(position, T5Bias):  # one table for every layer it reaches (the config checks their heads agree)
            heads = next(iter(cfg.relative_bias_heads))
            self.relative_bias = RelativePositionBias(heads, bidirectional=not self.causal, num_buckets=position.buckets,
                                                      max_distance=position.max_distance)
        # Multiway scope "all" (TorchScale's BEiT-3): the embedding and final norms get per-way copies too.
        stack_ways = cfg.ways if cfg.multiway is not None and cfg.multiway.scope == "all" else 1
        self.embedding_norm = per_way(cfg.norm_factory(), stack_ways) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(cfg.build_layers())
        # Stages (MixerConfig.build_stage): run before the first layer of a run of their mixer (YOCO's shared
        # key/value projection), registered under their own names (so their weights keep their names).
        self.stage_at: dict[int, str] = {}
        for index, layer in enumerate(cfg.layers):
            stage = None if index and cfg.layers[index - 1].mixer == layer.mixer else layer.mixer.build_stage(cfg)
            if stage is not None:
                name, module = stage
                self.add_module(name, to_bitlinear(module) if cfg.linear == "bitlinear" else module)
                self.stage_at[index] = name
        # From a stage on, layers that keep no state of their own need only the tokens whose outputs are asked
        # for (YOCO's cross-decoder in a prefill: the last token's)
        stateless_from = next(i for i in range(len(self.blocks), -1, -1)
                              if i == 0 or self.blocks[i - 1].mixer.new_state() is not None)
        self.cut_at = next((i for i in sorted(self.stage_at) if i >= stateless_from), None)
        # Pre-LN and Sub-LN leave the residual stream unnormalized; Post-LN/DeepNorm end on a norm already.
        self.final_norm = (per_way(cfg.norm_factory(), stack_ways)
                           if cfg.residual.kind in ("pre", "subln") and cfg.final_norm else None)
        self.window = self._window()

    @staticmethod
    def _rotary(cfg: ModelConfig) -> Rotary | None:
        if not isinstance(cfg.position, (RoPE, XPos)):
            return None
        # One set of phases per call serves every attention layer: the config checks they share a head width.
        heads = [h for h in (rotated_heads(layer.mixer) for layer in cfg.layers) if h is not None]
        head_dim = cfg.embed_dim // heads[0] if heads else 2  # only retention layers: nothing to rotate here
        if isinstance(cfg.position, XPos):
            return Rotary(head_dim, cfg.position.base, cfg.position.scale_base)
        return Rotary(head_dim, cfg.position.base, rotated=round(cfg.position.fraction * head_dim))

    def _window(self) -> int | None:
        """How far back a cached query can see, when every layer that keeps keys reads a window of them
        (else None): the cache forgets older slots."""
        windows = [block.mixer.lookback for block in self.blocks if _holds_keys(block.mixer.new_state())]
        return max(windows) if windows and None not in windows else None

    def new_cache(self, cache_type: type[TransformerCache] = TransformerCache) -> TransformerCache:
        """An empty cache holding the state each layer makes for itself (``new_state()``)."""
        layers: list[LayerState | None] = [block.mixer.new_state() for block in self.blocks]
        stages = {name: getattr(self, name).new_state() for name in self.stage_at.values()}
        return cache_type(layers=layers, stages=stages,
                          keep_keys=any(_holds_keys(state) for state in [*layers, *stages.values()]))

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, cache: TransformerCache | None = None,
                encoder_hidden: Tensor | None = None, encoder_mask: Tensor | None = None,
                multiway_split: int | None = None, sequence_group: dist.ProcessGroup | None = None,
                document_ids: Tensor | None = None, form: Form | None = None,
                encoder_document_ids: Tensor | None = None, last_tokens: int | None = None,
                embeddings: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> hidden (B, T, C); appends to ``cache`` when given.

        ``embeddings`` (B, T, C): input vectors in place of ``embed_tokens(input_ids)`` and this stack's
        positions (input_ids then may be None), for models that embed their own inputs (BEiT-3: image patches
        and text, with positions per modality); the embedding norm and dropout still apply.

        ``last_tokens``: return only the hidden states of the last this many tokens (B, last_tokens, C). A
        cross-decoder (YOCO) then runs on those tokens alone, after projecting every token's keys and values.

        ``sequence_group``: the input is this rank's shard (rank i holds positions [i·T, (i+1)·T)) of a
        sequence split across the group; dilated attention then runs sequence-parallel.
        ``document_ids`` (B, T): packed rows; positions restart and attention stays within each document.
        ``form``: the retention form of retention layers (default: chunkwise, recurrent for one token).
        ``encoder_document_ids`` (B, S_src): the packed source's documents; cross-attention reads only the
        source document with the query's own id.
        """
        if embeddings is not None:
            input_ids = embeddings[..., 0]  # only its shape and device are read
        source = None if encoder_hidden is None else Source(
            hidden=encoder_hidden, mask=encoder_mask.bool() if encoder_mask is not None else None,
            document_ids=encoder_document_ids)
        ctx = self.context(input_ids, attention_mask, cache, sequence_group, document_ids,
                           form=form, multiway_split=multiway_split, source=source)
        x = self.embed(input_ids, ctx) if embeddings is None else self.finish_embedding(embeddings, ctx)
        recompute = self.cfg.checkpoint_activations and self.training and cache is None
        for index, block in enumerate(self.blocks):
            if index in self.stage_at:
                x, ctx = self._run_stage(index, x, ctx, cache, last_tokens)
            if recompute:  # keep only block inputs; the backward pass recomputes the rest
                x = checkpoint(block, x, ctx, None, use_reentrant=False)
            else:
                x = block(x, ctx, cache.layers[index] if cache is not None else None)
        if cache is not None and self.window is not None:
            cache.forget_outside(self.window)
        if last_tokens is not None and x.shape[1] > last_tokens:
            x = x[:, -last_tokens:]
        if self.final_norm is None:
            return x
        way_ids = ctx.way_ids if ctx.way_ids is None else ctx.way_ids[:, ctx.way_ids.shape[1] - x.shape[1]:]
        return Multiway.apply(self.final_norm, x, way_ids)

    def _run_stage(self, index: int, x: Tensor, ctx: Context, cache: TransformerCache | None,
                   last_tokens: int | None) -> tuple[Tensor, Context]:
        """The stage before layer ``index`` adds its feature to the context (its state in the cache); from
        :attr:`cut_at` on, with ``last_tokens``, the layers run on those tokens only, since no later layer
        keeps a state from the others."""
        name = self.stage_at[index]
        ctx = getattr(self, name)(x, ctx, cache.stages[name] if cache is not None else None)
        if index != self.cut_at or last_tokens is None or last_tokens >= x.shape[1] or ctx.document_ids is not None:
            return x, ctx
        return x[:, -last_tokens:], ctx.last_tokens(last_tokens)

    def context(self, input_ids: Tensor, attention_mask: Tensor | None, cache: TransformerCache | None,
                sequence_group: dist.ProcessGroup | None, document_ids: Tensor | None, *, form: Form | None = None,
                multiway_split: int | None = None, source: Source | None = None) -> Context:
        """This call's positions and keys (appending the new tokens to ``cache``), shared by every layer,
        in one frozen Context."""
        b, t = input_ids.shape
        mask = attention_mask.bool() if attention_mask is not None else None
        positions = split_documents = None
        if sequence_group is not None:
            self._check_sequence_parallel(attention_mask, cache, input_ids, sequence_group, document_ids)
            start = None
            if document_ids is not None:  # positions count within documents, which may begin on other ranks
                positions, split_documents = self._split_document_positions(mask, document_ids, sequence_group)
                document_ids = split_documents[:, dist.get_rank(sequence_group) * t:][:, :t]
            else:
                start = self._split_start(attention_mask, b, t, sequence_group, input_ids.device)
        else:
            start = cache.next_position if cache is not None and cache.length else None
        if positions is None and mask is None and document_ids is None and start is not None and t == 1:
            positions = start[:, None]  # a decoding step: the next position, without a running count
        elif positions is None:
            real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
            positions = positions_from_mask(real, start, document_ids)
        self._check_positions(positions, self.embed_tokens.weight.dtype)
        past, key_mask, key_positions = 0, mask, positions
        if cache is not None and cache.keep_keys:
            past = cache.held
            cache.append_tokens(mask, positions)
            key_mask, key_positions = cache.key_mask, cache.key_positions
        elif cache is not None:  # no layer reads cached keys: only the positions advance
            cache.append_tokens(mask, positions)
        return Context(positions=positions, key_positions=key_positions, causal=self.causal, token_mask=mask,
                       key_mask=key_mask, past=past, document_ids=document_ids, sequence_group=sequence_group,
                       split_documents=split_documents,
                       rotary=self.rotary, way_ids=self._way_ids(positions, multiway_split), source=source, form=form,
                       relative_bias=(self.relative_bias(positions, key_positions) if self.relative_bias is not None
                                      else None),
                       features={type(f): f for f in cache.context_features()} if cache is not None else {})

    def embed(self, input_ids: Tensor, ctx: Context) -> Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_scale != 1.0:  # x · 1.0 is x: no op for the common case
            x = x * self.embed_scale
        if self.embed_positions is not None:
            x = x + self.embed_positions(ctx.positions)
        elif isinstance(self.cfg.position, SinusoidalPosition):
            x = x + sinusoidal_positions(ctx.positions, self.cfg.embed_dim, x.dtype)
        return self.finish_embedding(x, ctx)

    def finish_embedding(self, x: Tensor, ctx: Context) -> Tensor:
        """The embedding norm (if any) and dropout, after tokens and positions."""
        if self.embedding_norm is not None:
            x = Multiway.apply(self.embedding_norm, x, ctx.way_ids)
        return self.dropout(x) if self.training else x

    def _check_positions(self, positions: Tensor, dtype: torch.dtype) -> None:
        if self.embed_positions is None and (self.rotary is None or self.rotary.scale_base is None):
            return
        last = int(positions.max())
        if self.embed_positions is not None and last >= self.embed_positions.table.num_embeddings:
            raise ValueError(f"position {last} is beyond the learned position table (max_positions="
                             f"{self.embed_positions.table.num_embeddings}); use a shorter input or a larger max_positions")
        if self.rotary is not None and self.rotary.scale_base is not None:
            limit = self.rotary.max_xpos_position(dtype)
            if last > limit:
                raise ValueError(f"position {last} overflows xPos scaling in {dtype} (limit {limit} with "
                                 f"xpos_scale_base={self.rotary.scale_base}); raise xpos_scale_base or use float64")

    @staticmethod
    def _split_start(attention_mask: Tensor | None, b: int, t: int, group: dist.ProcessGroup,
                     device: torch.device) -> Tensor:
        """(B,) the position of this rank's first token in each row of a split sequence: the real tokens of
        the earlier ranks' shards (all of their positions when nothing is padded)."""
        rank = dist.get_rank(group)
        if attention_mask is None:
            return torch.full((b,), rank * t, device=device)
        from scaleformer.parallel.context import gather_across

        counts = gather_across(attention_mask.bool().sum(1), group)  # (W, B) real tokens per rank and row
        return counts[:rank].sum(0)

    @staticmethod
    def _split_document_positions(mask: Tensor | None, document_ids: Tensor,
                                  group: dist.ProcessGroup) -> tuple[Tensor, Tensor]:
        """Packed rows split across ``group``: (this shard's positions, every rank's document ids (B, W·T),
        renumbered as :func:`document_runs` numbers a whole row). The ids and padding of every rank
        (integers, gathered once per call) give each token its position in its document, wherever the
        document began."""
        from scaleformer.parallel.context import gather_across

        flat = lambda x: x.permute(1, 0, 2).flatten(1)  # noqa: E731  (W, B, T) -> (B, W·T)
        everywhere = document_runs(flat(gather_across(document_ids, group)))
        real = torch.ones_like(document_ids, dtype=torch.bool) if mask is None else mask
        real_everywhere = flat(gather_across(real, group))
        rank, t = dist.get_rank(group), document_ids.shape[1]
        positions = positions_from_mask(real_everywhere, None, everywhere)[:, rank * t:(rank + 1) * t]
        return positions, everywhere

    def _check_sequence_parallel(self, attention_mask: Tensor | None, cache: TransformerCache | None,
                                 input_ids: Tensor, group: dist.ProcessGroup, document_ids: Tensor | None) -> None:
        """Context parallelism's preconditions, each refused on every rank alike (none depends on the rank's
        data but the length, which one all-gather compares) before any layer exchanges anything."""
        if cache is not None:
            raise ValueError("a sequence split across processes takes no cache (it is for training and scoring)")
        if any(isinstance(layer.mixer, DilatedAttention) for layer in self.cfg.layers):
            if attention_mask is not None:
                raise ValueError("LongNet's sequence-parallel dilated attention takes unpadded shards: drop "
                                 "attention_mask")
            if document_ids is not None:
                raise ValueError("LongNet's sequence-parallel dilated attention takes no packed documents: "
                                 "give each rank's shard one sequence")
        if any(layer.cross_attention is not None for layer in self.cfg.layers):
            raise ValueError("sequence parallelism is supported for arch='encoder' and 'decoder'")
        if self.relative_bias is not None:
            raise ValueError("a sequence split across processes takes no T5 relative bias (position='relative')")
        from scaleformer.parallel.context import check_even_split

        check_even_split(input_ids.shape[1], group, input_ids.device)

    def _way_ids(self, positions: Tensor, multiway_split: int | None) -> Tensor | None:
        if self.cfg.ways == 1:
            if multiway_split is not None:
                raise ValueError("multiway_split was given but the model has multiway=1")
            return None
        if multiway_split is None:
            raise ValueError(f"this model has multiway={self.cfg.ways}: pass multiway_split=<first position "
                             f"of the second modality> (e.g. the number of image tokens)")
        return (positions >= multiway_split).long()


def _holds_keys(state: LayerState | None) -> bool:
    return state is not None and state.holds_keys


class Encoder(LanguageModel):
    """Bidirectional encoder with a token-prediction head (BERT-like)."""

    def __init__(self, cfg: TransformerConfig | ModelConfig) -> None:
        super().__init__(cfg)
        self.encoder = TransformerStack(model_config(cfg, "encoder"), self.embed_tokens)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None, multiway_split: int | None = None,
                sequence_group: dist.ProcessGroup | None = None, document_ids: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V); ``document_ids`` (B, T) packs several documents in a row."""
        if use_cache or cache is not None:
            raise ValueError("Encoder is bidirectional: every token sees the whole input, so there is no "
                             "incremental decoding cache; call it on the full input")
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        document_ids = check_document_ids(document_ids, input_ids, None, renumber=sequence_group is None)
        hidden = self.encoder(input_ids, attention_mask=attention_mask, multiway_split=multiway_split,
                              sequence_group=sequence_group, document_ids=document_ids)
        return self.output(hidden)


class Decoder(LanguageModel):
    """Causal language model: GPT-like, RetNet, or any mix of layers a ModelConfig lists."""

    def __init__(self, cfg: ConfigBase) -> None:
        super().__init__(cfg)
        self.decoder = TransformerStack(model_config(cfg, "decoder"), self.embed_tokens)

    def new_cache(self) -> TransformerCache:
        return self.decoder.new_cache()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: TransformerCache | None = None, multiway_split: int | None = None,
                sequence_group: dist.ProcessGroup | None = None, document_ids: Tensor | None = None,
                form: Form | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T) covers the new tokens (1 = token, 0 = padding).

        With ``use_cache`` (or a ``cache``), the new tokens' keys/values are appended to the cache
        (a fresh one when ``cache`` is None) and attention covers everything cached. With
        ``sequence_group`` (LongNet), ``input_ids`` is this rank's shard of a longer sequence.
        ``document_ids`` (B, T) packs several documents in a row: each is modelled as if it were alone.
        ``form`` chooses the retention form of retention layers ("parallel", "chunkwise" or "recurrent"; all
        agree; default chunkwise, recurrent for one token).
        ``logits_to_keep`` > 0: logits (B, n, V) of the last n tokens only (0 = all), as Hugging Face's
        argument of that name; generation prefills with 1. A YOCO cross-decoder then runs on those n tokens.
        """
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        check_token_ids(input_ids, self.config.vocab_size)
        check_attention_mask(attention_mask)
        if form is not None and not any(form in layer.mixer.support.forms for layer in self.decoder.cfg.layers):
            raise ValueError(f"form={form!r} chooses how retention layers run (and lightning and other recurrent "
                             "layers); this model has none with that form")
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            check_cache_batch(cache.batch_size, input_ids)
        document_ids = check_document_ids(document_ids, input_ids, cache, renumber=sequence_group is None)
        hidden = self.decoder(input_ids, attention_mask=new_token_mask(attention_mask, input_ids, cache),
                              cache=cache, multiway_split=multiway_split, sequence_group=sequence_group,
                              document_ids=document_ids, form=form, last_tokens=logits_to_keep or None)
        return self.output(hidden, cache)


class EncoderDecoder(LanguageModel):
    """Sequence-to-sequence model (MT-like): source ids through the encoder, target ids through the decoder."""

    def __init__(self, cfg: EncoderDecoderConfig | TransformerConfig) -> None:
        super().__init__(cfg)
        pair = model_config(cfg)
        assert isinstance(pair, EncoderDecoderConfig)
        self.encoder = TransformerStack(pair.encoder, self.embed_tokens)
        target_embedding = self.embed_tokens if pair.share_embeddings else new_embedding(cfg.vocab_size, cfg.embed_dim)
        self.decoder = TransformerStack(pair.decoder, target_embedding)

    def new_cache(self) -> TransformerCache:
        return self.decoder.new_cache()

    def _head_embedding(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
        """src_ids (B, S) -> encoder hidden states (B, S, C)."""
        return self.encoder(src_ids, attention_mask=src_mask, document_ids=document_ids)

    def forward(self, src_ids: Tensor | None, tgt_ids: Tensor, *, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None, use_cache: bool = False, cache: TransformerCache | None = None,
                src_document_ids: Tensor | None = None, tgt_document_ids: Tensor | None = None) -> ModelOutput:
        """src_ids (B, S) and tgt_ids (B, T) -> logits (B, T, V) for the next target token.

        With a cache that already holds the encoded source, ``src_ids`` may be None: the source is
        encoded once, at the first (prefill) call. Packed pairs: ``src_document_ids`` (B, S) and
        ``tgt_document_ids`` (B, T) give each token's document; target document k reads source document k.
        """
        if (src_document_ids is None) != (tgt_document_ids is None):
            raise ValueError("packed pairs need both src_document_ids and tgt_document_ids")
        if tgt_document_ids is not None:
            self._check_pairs(src_ids, tgt_ids, src_document_ids, tgt_document_ids, cache)
        check_token_ids(tgt_ids, self.config.vocab_size, "tgt_ids")
        check_attention_mask(tgt_mask, "tgt_mask")
        if src_ids is not None:
            check_token_ids(src_ids, self.config.vocab_size, "src_ids")
            check_attention_mask(src_mask, "src_mask")
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None:
            check_cache_batch(cache.batch_size, tgt_ids, "tgt_ids")
        encoder_hidden, src_mask = self._encoded_source(src_ids, src_mask, cache, src_document_ids)
        hidden = self.decoder(tgt_ids, attention_mask=new_token_mask(tgt_mask, tgt_ids, cache), cache=cache,
                              encoder_hidden=encoder_hidden, encoder_mask=src_mask, document_ids=tgt_document_ids,
                              encoder_document_ids=src_document_ids)
        return self.output(hidden, cache, self._head_embedding())

    @staticmethod
    def _check_pairs(src_ids: Tensor | None, tgt_ids: Tensor, src_documents: Tensor, tgt_documents: Tensor,
                     cache: TransformerCache | None) -> None:
        if src_ids is None:
            raise ValueError("packed pairs need src_ids")
        check_document_ids(src_documents, src_ids, cache)
        check_document_ids(tgt_documents, tgt_ids, cache)
        check_contiguous_documents(src_documents, "src_document_ids")
        check_contiguous_documents(tgt_documents, "tgt_document_ids")
        if not bool((tgt_documents[:, :, None] == src_documents[:, None, :]).any(-1).all()):
            raise ValueError("every target document needs the source document with its id in the same row")

    def _encoded_source(self, src_ids: Tensor | None, src_mask: Tensor | None, cache: TransformerCache | None,
                        document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The encoder's output and source mask: from the cache when it holds them, else encoded now."""
        if cache is not None and cache.encoder_hidden is not None:
            assert cache.encoder_mask is not None
            return cache.encoder_hidden, cache.encoder_mask
        if src_ids is None:
            raise ValueError("src_ids is required unless the cache already holds the encoded source")
        encoder_hidden = self.encode(src_ids, src_mask, document_ids)
        src_mask = torch.ones(src_ids.shape, dtype=torch.bool, device=src_ids.device) if src_mask is None else src_mask.bool()
        if cache is not None:
            cache.encoder_hidden, cache.encoder_mask = encoder_hidden, src_mask
        return encoder_hidden, src_mask
