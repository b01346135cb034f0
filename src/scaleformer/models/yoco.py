"""YOCO, You Only Cache Once (arXiv 2405.05254): a decoder-decoder language model.

The self-decoder (the first half of the layers: gated retention, or sliding-window attention) keeps a
fixed-size state per layer. Its output is projected once into keys and values, and every layer of the
cross-decoder attends to those: decoding caches one layer's keys and values, whatever the depth. In a
prefill, only the last prompt token needs the cross-decoder (``logits_to_keep=1``, as ``generate`` asks),
so the prompt's other tokens stop after the global key/value projection.

Shapes: B batch, T length, V vocabulary.
"""

from __future__ import annotations

from scaleformer.cache import TransformerCache
from scaleformer.config import YOCOConfig
from scaleformer.models.transformer import Decoder

__all__ = ["YOCO"]


class YOCO(Decoder):
    """A Decoder whose layers are a self-decoder then a cross-decoder (see
    :func:`~scaleformer.models.architecture.model_config`); its cache holds the self-decoder's states and
    one shared :class:`~scaleformer.cache.KVCache` (``cache.stages["global_kv"]``)."""

    config: YOCOConfig

    def new_cache(self) -> TransformerCache:
        return self.decoder.new_cache()
