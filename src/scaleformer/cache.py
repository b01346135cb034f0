"""Typed decoding state.

A :class:`KVCache` holds one attention layer's keys and values; a :class:`TransformerCache` holds a
whole model's: every layer's KVCache plus what the masks need (which cached slots are real tokens, and
their positions). Prefill and single-token steps go through the same forward code with different lengths;
the cache only grows. ``reorder`` selects batch rows (beam search).

Shapes: B batch, H heads, T cached length, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DecodingCache", "KVCache", "TransformerCache", "RetentionCache"]


@runtime_checkable
class DecodingCache(Protocol):
    """What every model-level cache offers to generation code (``generate``, beam search, HF, lm-eval).

    ``length``: slots consumed (padding included); ``next_position`` (B,) the position of each row's next
    real token (None while empty); ``batch_size`` the rows held (None while empty); ``reorder`` keeps
    rows (beam search), in place; ``nbytes`` the memory of the cached state.
    """

    @property
    def length(self) -> int: ...

    @property
    def batch_size(self) -> int | None: ...

    next_position: Tensor | None

    def reorder(self, index: Tensor) -> None: ...

    def nbytes(self) -> int: ...


@dataclass
class KVCache:
    """Keys and values of one attention layer, (B, H, T, D), in a buffer grown by doubling.

    Keys are stored after the position transform (RoPE/xPos) of their own position, so they never need
    recomputing. ``update`` is in place and returns views of everything cached so far.
    """

    key: Tensor | None = None  # (B, H, capacity, D)
    value: Tensor | None = None
    length: int = 0
    min_capacity: int = 16  # first allocation size (see reserve)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens up front (e.g. prompt + max_new_tokens): no growth copies later."""
        self.min_capacity = max(self.min_capacity, capacity)
        if self.key is not None and self.value is not None and capacity > self.key.shape[-2]:
            self._grow(self.key, self.value, capacity)

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (the used length, not the buffer's spare capacity)."""
        if self.key is None or self.value is None:
            return 0
        per_token = (self.key[..., :1, :].numel() * self.key.element_size()
                     + self.value[..., :1, :].numel() * self.value.element_size())
        return per_token * self.length

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        new = key.shape[-2]
        if self.key is None:
            self.key, self.value = key.new_empty(0), value.new_empty(0)
            self._grow(key, value, max(new, self.min_capacity))
        elif self.length + new > self.key.shape[-2]:
            self._grow(key, value, max(2 * self.key.shape[-2], self.length + new))
        assert self.key is not None and self.value is not None
        self.key[..., self.length:self.length + new, :] = key
        self.value[..., self.length:self.length + new, :] = value
        self.length += new
        return self.key[..., :self.length, :], self.value[..., :self.length, :]

    def _grow(self, key: Tensor, value: Tensor, capacity: int) -> None:
        shape = (*key.shape[:-2], capacity, key.shape[-1])
        new_key = key.new_zeros(shape)
        new_value = value.new_zeros((*value.shape[:-2], capacity, value.shape[-1]))
        if self.length:
            assert self.key is not None and self.value is not None
            new_key[..., :self.length, :] = self.key[..., :self.length, :]
            new_value[..., :self.length, :] = self.value[..., :self.length, :]
        self.key, self.value = new_key, new_value

    def reorder(self, index: Tensor) -> None:
        if self.key is not None:
            assert self.value is not None
            self.key, self.value = self.key.index_select(0, index), self.value.index_select(0, index)


@dataclass
class TransformerCache:
    """Decoding state of a Decoder, or of the decoder side of an EncoderDecoder.

    ``key_mask`` (B, T) marks which cached slots are real tokens (left padding is cached but masked);
    ``key_positions`` (B, T) their positions; ``next_position`` (B,) the position of the next real token.
    For an EncoderDecoder, ``encoder_hidden`` and ``encoder_mask`` hold the encoded source and
    ``cross`` the per-layer cross-attention keys/values, projected once on first use.
    """

    layers: list[KVCache]
    key_mask: Tensor | None = None  # (B, T) bool
    key_positions: Tensor | None = None  # (B, T) long
    next_position: Tensor | None = None  # (B,) long
    encoder_hidden: Tensor | None = None  # (B, S, C)
    encoder_mask: Tensor | None = None  # (B, S) bool
    cross: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> "TransformerCache":
        return cls(layers=[KVCache() for _ in range(num_layers)], cross=[None] * num_layers)

    @property
    def length(self) -> int:
        """Number of cached slots (padding included)."""
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    @property
    def batch_size(self) -> int | None:
        """Rows the cache holds (None while empty)."""
        for value in (self.key_mask, self.encoder_hidden):
            if value is not None:
                return value.shape[0]
        return None

    def nbytes(self) -> int:
        """Bytes of cached keys and values, self- and cross-attention."""
        cross = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in
                    (kv for kv in self.cross if kv is not None))
        return sum(layer.nbytes() for layer in self.layers) + cross

    def append_tokens(self, mask: Tensor, positions: Tensor) -> None:
        """Record the mask (B, T_new) and positions (B, T_new) of tokens being added to every layer."""
        self.key_mask = mask if self.key_mask is None else torch.cat([self.key_mask, mask], dim=1)
        self.key_positions = positions if self.key_positions is None else torch.cat([self.key_positions, positions], 1)
        start = self.next_position if self.next_position is not None else 0
        self.next_position = start + mask.long().sum(1)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) in this order, e.g. the surviving beams; in place."""
        for layer in self.layers:
            layer.reorder(index)
        for name in ("key_mask", "key_positions", "next_position", "encoder_hidden", "encoder_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))
        self.cross = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                      for kv in self.cross]


@dataclass
class RetentionCache:
    """Decoding state of a RetNet: one fixed-size state per layer, whatever the context length.

    ``states[i]`` (B, H, K, V + 1) is layer i's retention state (the extra value column carries the
    normalizer's running sum); ``next_position`` (B,) the position of each row's next real token;
    ``length`` the number of slots consumed (padding included).
    """

    states: list[Tensor | None]
    next_position: Tensor | None = None
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "RetentionCache":
        return cls(states=[None] * num_layers)

    def update(self, layer: int, state: Tensor) -> None:
        """Layer ``layer``'s state after the tokens of this call."""
        self.states[layer] = state

    def advance(self, real: Tensor) -> None:
        """Account for a call's tokens (B, T) bool (False = padding), after every layer updated its state."""
        start = self.next_position if self.length and self.next_position is not None else 0
        self.next_position = start + real.long().sum(1)
        self.length += real.shape[1]

    @property
    def batch_size(self) -> int | None:
        """Rows the cache holds (None while empty)."""
        return None if self.next_position is None else self.next_position.shape[0]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) in this order (beam search); in place."""
        self.states = [None if s is None else s.index_select(0, index) for s in self.states]
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states if s is not None)
