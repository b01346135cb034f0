"""What every model shares: the output type, the token embedding and head, and the aux-loss walk.

Shapes: B batch, T length, C width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.cache import DecodingCache
from scaleformer.layers.moe import moe_layers

__all__ = ["ModelOutput", "LanguageModel", "new_embedding", "tensor_names"]


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    cache: DecodingCache | None = None
    aux_loss: Tensor | None = None  # scalar; 0 for dense models (MoE layers add their balance loss)
    hidden_states: Tensor | None = None  # (B, T, C) after the final norm


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Names of each state tensor (a tied embedding has several)."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    return aliases


def new_embedding(vocab_size: int, embed_dim: int) -> nn.Embedding:
    embedding = nn.Embedding(vocab_size, embed_dim)
    nn.init.normal_(embedding.weight, std=embed_dim**-0.5)
    return embedding


class LanguageModel(nn.Module):
    """Token embedding and output head (tied to the embedding, or its own), and the model's output.

    ``config`` needs ``vocab_size``, ``embed_dim``, ``tie_embeddings`` and ``moe`` (set when some layer is MoE).
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = new_embedding(config.vocab_size, config.embed_dim)
        self.output_projection = None
        if not config.tie_embeddings:
            self.output_projection = nn.Linear(config.embed_dim, config.vocab_size, bias=False)
            nn.init.normal_(self.output_projection.weight, std=config.embed_dim**-0.5)

    @property
    def head_weight(self) -> nn.Parameter:
        """The (V, C) matrix the logits multiply by: the output projection's, or the tied token embedding's."""
        if self.output_projection is not None:
            return self.output_projection.weight
        return self._head_embedding().weight

    def _head_embedding(self) -> nn.Embedding:
        """The embedding a tied head reads (an EncoderDecoder's is its decoder's)."""
        return self.embed_tokens

    def output(self, hidden: Tensor, cache: DecodingCache | None = None,
               embedding: nn.Embedding | None = None) -> ModelOutput:
        """Logits of ``hidden`` (through ``embedding`` when tied; the model's own by default) and aux loss."""
        if self.output_projection is not None:
            logits = self.output_projection(hidden)
        else:
            logits = F.linear(hidden, (embedding or self.embed_tokens).weight)
        return ModelOutput(logits, cache, self._aux_loss(hidden), hidden)

    def _aux_loss(self, hidden: Tensor) -> Tensor:
        """Sum of the MoE layers' weighted balance losses of this forward (0 for a dense model)."""
        zero = hidden.new_zeros(())
        if not self.config.moe:  # walking the module tree costs ~0.1 ms a call: only when there is MoE
            return zero
        return sum((layer.aux_loss for layer in moe_layers(self) if layer.aux_loss is not None), zero)
