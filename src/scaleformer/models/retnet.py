"""RetNet (arXiv 2307.08621): a decoder-only LM with multi-scale retention instead of attention.

The form is chosen per call — ``model(ids, form="parallel" | "chunkwise" | "recurrent")`` — and all
three give the same logits and gradients (to rounding); ``form=None`` uses chunkwise for several tokens
and recurrent for one. With a cache, each layer keeps one fixed-size state: decoding memory does not
grow with the context.

Shapes: B batch, T length, C width, V vocabulary.
"""

from __future__ import annotations

from torch import Tensor, nn

from scaleformer.cache import RetentionCache
from scaleformer.config import RetNetConfig
from scaleformer.models.base import ModelOutput
from scaleformer.models.transformer import Decoder
from scaleformer.ops.retention import Form

__all__ = ["RetNet"]


class RetNet(Decoder):
    """Retentive network language model: a Decoder whose every layer is retention (see
    :func:`~scaleformer.models.architecture.model_config`); its cache holds one state per layer and no keys."""

    config: RetNetConfig

    @property
    def blocks(self) -> nn.ModuleList:
        """The layers (they live in the decoder stack, as in every decoder)."""
        return self.decoder.blocks

    def new_cache(self) -> RetentionCache:
        return self.decoder.new_cache(RetentionCache)  # type: ignore[return-value]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False,
                cache: RetentionCache | None = None, form: Form | None = None,
                document_ids: Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, T) -> logits (B, T, V).

        ``attention_mask`` (B, T): 1 = token, 0 = padding (anywhere; padding is invisible to real tokens).
        With ``use_cache`` (or a ``cache``), each layer's state is carried in the cache: prefill a prompt in
        one call, then feed one token per call. ``form`` picks the retention form (all three agree; default
        chunkwise, recurrent for one token). ``document_ids`` (B, T) packs several documents in a row: each
        starts from an empty state at position 0. ``logits_to_keep`` > 0: the last that many positions' logits.
        """
        return super().forward(input_ids, attention_mask=attention_mask, use_cache=use_cache, cache=cache,
                               document_ids=document_ids, form=form, logits_to_keep=logits_to_keep)
