"""Typed decoding state.

A :class:`KVCache` holds one attention layer's keys and values; a :class:`TransformerCache` holds a
whole model's: every layer's KVCache plus what the masks need (which cached slots are real tokens, and
their positions). Prefill and single-token steps go through the same forward code with different lengths;
the cache only grows. ``reorder`` selects batch rows (beam search).

Shapes: B batch, H heads, T cached length, D head dim.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DecodingCache", "LayerState", "KVCache", "MomentumKVCache", "S2KVCache", "RetentionState", "LayerCache",
           "KeyBias", "TransformerCache", "RetentionCache", "CacheSnapshot", "save_cache", "load_cache"]


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


@runtime_checkable
class LayerState(Protocol):
    """One layer's decoding state. Each mixer module makes its own (``new_state()``; None when it keeps
    none), so the model never guesses a layer's kind of state: any small typed object with these will do.

    ``holds_keys``: it keeps a slot per token (keys and values), so the model tracks every slot's mask and
    position for it (and a layer's ``lookback`` says how far back its queries read); a fixed-size state (a
    retention or recurrent state) does not, and nothing then grows with the context. ``reorder`` keeps batch
    rows ``index`` in place (beam search); ``nbytes`` is the state's memory.
    """

    holds_keys: ClassVar[bool]

    def reorder(self, index: Tensor) -> None: ...

    def nbytes(self) -> int: ...


@dataclass
class KVCache:
    """Keys and values of one attention layer, (B, H_kv, T, D), in a buffer grown by doubling.

    Keys are stored after the position transform (RoPE/xPos) of their own position, so they never need
    recomputing. ``update`` is in place and returns views of everything held. ``drop_front`` forgets the
    oldest slots (sliding-window attention keeps only what a future query can still see): the live slots
    are ``[start, start + length)`` of the buffer, moved back to its front when it fills up.
    ``cross`` holds this layer's cross-attention keys and values of the encoded source (encoder-decoder).
    """

    holds_keys: ClassVar[bool] = True
    key: Tensor | None = None  # (B, H_kv, capacity, D)
    value: Tensor | None = None
    length: int = 0  # slots held
    min_capacity: int = 16  # first allocation size (see reserve)
    start: int = 0  # buffer index of the first held slot
    cross: tuple[Tensor, Tensor] | None = None

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens up front (e.g. prompt + max_new_tokens): no growth copies later."""
        self.min_capacity = max(self.min_capacity, capacity)
        if self.key is not None and capacity > self.key.shape[-2]:
            self._move(capacity)

    def nbytes(self) -> int:
        """Bytes of the held keys and values (not the buffer's spare capacity), cross-attention's included."""
        held = 0
        if self.key is not None and self.value is not None:
            held = (self.key[..., :1, :].numel() * self.key.element_size()
                    + self.value[..., :1, :].numel() * self.value.element_size()) * self.length
        if self.cross is not None:
            held += sum(t.numel() * t.element_size() for t in self.cross)
        return held

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        new = key.shape[-2]
        if self.key is None:
            self.key, self.value = key.new_zeros((*key.shape[:-2], 0, key.shape[-1])), value.new_zeros(
                (*value.shape[:-2], 0, value.shape[-1]))
        if self.start + self.length + new > self.key.shape[-2]:
            needed = self.length + new
            capacity = self.key.shape[-2]
            self._move(capacity if needed <= capacity // 2 else max(2 * capacity, needed, self.min_capacity))
        assert self.key is not None and self.value is not None
        end = self.start + self.length
        self.key[..., end:end + new, :] = key
        self.value[..., end:end + new, :] = value
        self.length += new
        return self.key[..., self.start:end + new, :], self.value[..., self.start:end + new, :]

    def drop_front(self, count: int) -> None:
        """Forget the ``count`` oldest held slots (O(1): the buffer is compacted only when it fills)."""
        assert 0 <= count <= self.length
        self.start, self.length = self.start + count, self.length - count

    def _move(self, capacity: int) -> None:
        """Into a buffer of ``capacity`` slots, the held ones first."""
        assert self.key is not None and self.value is not None
        held = slice(self.start, self.start + self.length)
        new_key = self.key.new_zeros((*self.key.shape[:-2], capacity, self.key.shape[-1]))
        new_value = self.value.new_zeros((*self.value.shape[:-2], capacity, self.value.shape[-1]))
        new_key[..., :self.length, :] = self.key[..., held, :]
        new_value[..., :self.length, :] = self.value[..., held, :]
        self.key, self.value, self.start = new_key, new_value, 0

    @classmethod
    def join(cls, states: "list[KVCache]") -> "KVCache":
        """The rows of ``states`` (one layer's caches of several requests) in one cache, in order. Each is
        left-padded with zero slots to the longest (the model masks them: its ``key_mask`` is padded alike);
        any other tensor of a subclass (a momentum sum) is per row and stacked as it is."""
        if any(state.cross is not None for state in states):
            raise ValueError("joining caches with cross-attention (an encoder-decoder's) is not supported")
        length = max(state.length for state in states)
        held = [state.key[..., state.start:state.start + state.length, :] for state in states if state.key is not None]
        if len(held) != len(states):
            raise ValueError("cannot join an empty KVCache with others: prefill every request first")
        joined = _join_fields(states, skip={"key", "value", "length", "start", "min_capacity", "cross"})
        joined.key = torch.cat([_pad_front(k, length, dim=-2) for k in held])
        joined.value = torch.cat([_pad_front(s.value[..., s.start:s.start + s.length, :], length, dim=-2)
                                  for s in states])
        joined.length, joined.start = length, 0
        joined.min_capacity = max(state.min_capacity for state in states)
        return joined

    def truncate(self, count: int) -> None:
        """Forget the ``count`` newest held slots (a rejected speculation); the buffer keeps its capacity."""
        if not 0 <= count <= self.length:
            raise ValueError(f"cannot drop {count} of {self.length} held slots")
        self.length -= count

    def reorder(self, index: Tensor) -> None:
        if self.key is not None:
            assert self.value is not None
            self.key, self.value = self.key.index_select(0, index), self.value.index_select(0, index)
        if self.cross is not None:
            self.cross = (self.cross[0].index_select(0, index), self.cross[1].index_select(0, index))


@dataclass
class MomentumKVCache(KVCache):
    """A momentum-attention layer's keys and values, and its momentum sum Σ_{i≤t} η^{t−i} v_i (B, H_kv, 1, D)."""

    momentum: Tensor | None = None

    def nbytes(self) -> int:
        extra = 0 if self.momentum is None else self.momentum.numel() * self.momentum.element_size()
        return super().nbytes() + extra

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        if self.momentum is not None:
            self.momentum = self.momentum.index_select(0, index)


@dataclass
class S2KVCache(KVCache):
    """An S2-Attention layer's keys and values, reduced: each key/value head keeps only the blocks one of
    its query heads can still read (its local window ahead, its vertical shard, everything for dense
    heads), so heads hold different slots. ``positions`` (B, H_kv, S) gives each held slot's position
    (−1: an empty slot or padding, never read). Compacted whenever the first query block of a call has
    moved on; the layer builds its masks from ``positions``. ``consumed`` counts the slots a full cache
    would hold, for reports against it (:meth:`full_nbytes`)."""

    layout: Any = None  # scaleformer.ops.s2.S2Layout
    heads: int = 1  # query heads
    positions: Tensor | None = None
    consumed: int = 0
    compacted_block: int = -1

    def nbytes(self) -> int:
        extra = 0 if self.positions is None else self.positions.numel() * self.positions.element_size()
        return super().nbytes() + extra

    def full_nbytes(self) -> int:
        """What a full cache of the same tokens holds: keys and values of every slot consumed."""
        if self.key is None or self.value is None:
            return 0
        return (self.key[..., :1, :].numel() * self.key.element_size()
                + self.value[..., :1, :].numel() * self.value.element_size()) * self.consumed

    def update_with_positions(self, key: Tensor, value: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append (B, H_kv, T, D) keys and values at ``positions`` (B, T) (−1: padding); return everything held,
        with positions (B, H_kv, S). Slots no query from this call on can read are dropped first."""
        real = positions[positions >= 0]
        if self.positions is not None and real.numel():
            self._compact(int(real.min()) // self.layout.block, positions)
        keys, values = self.update(key, value)
        new = positions[:, None, :].expand(-1, key.shape[1], -1)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], dim=2)
        self.consumed += key.shape[2]
        return keys, values, self.positions

    def _compact(self, first_block: int, new_positions: Tensor) -> None:
        if first_block <= self.compacted_block:
            return
        assert self.positions is not None and self.key is not None and self.value is not None
        self.compacted_block = first_block
        kv_heads = self.positions.shape[1]
        group = self.heads // kv_heads
        rows = new_positions.clamp(min=0).min(1).values  # (B,) the first query position of each row
        first = (rows // self.layout.block)[:, None, None, None]
        h = torch.arange(self.heads, device=rows.device).view(kv_heads, group)[None, :, :, None]  # (1, H_kv, G, 1)
        j = (self.positions // self.layout.block)[:, :, None, :]  # (B, H_kv, 1, S)
        alive = self.layout.read_later(self.heads, h, first, j).any(2) & (self.positions >= 0)
        count = int(alive.sum(-1).max())
        if count == self.length:  # the fullest key/value head keeps every slot: the others' dead ones are masked
            self.positions = torch.where(alive, self.positions, -1)
            return
        order = torch.sort((~alive).to(torch.int8), dim=-1, stable=True).indices[..., :count]  # held slots first
        held = slice(self.start, self.start + self.length)
        index = order[..., None].expand(-1, -1, -1, self.key.shape[-1])
        keys, values = self.key[..., held, :].gather(2, index), self.value[..., held, :].gather(2, index)
        self.key[..., :count, :], self.value[..., :count, :] = keys, values
        self.positions = torch.where(alive.gather(2, order), self.positions.gather(2, order), -1)
        self.start, self.length = 0, count

    def reorder(self, index: Tensor) -> None:
        super().reorder(index)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index)

    def drop_front(self, count: int) -> None:
        super().drop_front(count)
        if self.positions is not None:
            self.positions = self.positions[..., count:]

    @classmethod
    def join(cls, states: "list[KVCache]") -> "S2KVCache":
        """As :meth:`KVCache.join`, each head's slot positions padded with −1 (never read); compaction runs
        again from the earliest block any row has reached (it only drops what no row can read)."""
        s2 = [state for state in states if isinstance(state, S2KVCache)]
        if len(s2) != len(states) or any(state.positions is None for state in s2):
            raise ValueError("cannot join an empty S2 cache with others: prefill every request first")
        layouts = {(state.layout, state.heads) for state in s2}
        if len(layouts) != 1:
            raise ValueError("cannot join S2 caches of different layouts")
        positions = [state.positions for state in s2]
        joined = KVCache.join.__func__(cls, [dataclasses.replace(state, positions=None, consumed=0, compacted_block=-1)
                                             for state in s2])
        assert isinstance(joined, S2KVCache)
        joined.positions = torch.cat([_pad_front(p, joined.length, -1) for p in positions])
        joined.consumed = max(state.consumed for state in s2)
        joined.compacted_block = min(state.compacted_block for state in s2)
        return joined


@dataclass
class RetentionState:
    """One retention layer's state (B, H, K, V + 1); the extra value column carries the normalizer's sum
    (a layer without a row normalizer keeps (B, H, K, V))."""

    holds_keys: ClassVar[bool] = False
    state: Tensor | None = None

    def update(self, state: Tensor | None) -> None:
        """The state after this call's tokens."""
        self.state = state

    def reorder(self, index: Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(0, index)

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * self.state.element_size()


LayerCache = KVCache | RetentionState


@dataclass(frozen=True)
class KeyBias:
    """A context feature (:meth:`~scaleformer.layers.context.Context.feature`): an additive attention score
    bias per held key slot (B, S) — structured prompting's log M on the test tokens' keys."""

    bias: Tensor


@dataclass
class TransformerCache:
    """Decoding state of a decoder (or of the decoder side of an EncoderDecoder): each layer's own cache
    (a :class:`KVCache` for attention, a :class:`RetentionState` for retention) and what the masks need.

    ``key_mask`` (B, S) marks which held slots are real tokens (left padding is cached but masked);
    ``key_positions`` (B, S) their positions; ``next_position`` (B,) the position of the next real token.
    ``dropped`` counts slots no longer held (sliding windows forget them; a model without attention holds
    none), so ``length`` — the slots consumed, what a Hugging Face style full mask covers — is
    ``dropped + held``. For an EncoderDecoder, ``encoder_hidden`` and ``encoder_mask`` hold the encoded
    source, and each layer's cache its cross-attention keys/values, projected once on first use.
    """

    layers: list[LayerCache | None]  # None: the layer keeps no state of its own (YOCO's cross-decoder)
    #: the states of the stack's stages, by the stage's name (YOCO's shared keys and values: "global_kv")
    stages: dict[str, Any] = field(default_factory=dict)
    key_mask: Tensor | None = None  # (B, S) bool
    key_positions: Tensor | None = None  # (B, S) long
    next_position: Tensor | None = None  # (B,) long
    encoder_hidden: Tensor | None = None  # (B, S_src, C)
    encoder_mask: Tensor | None = None  # (B, S_src) bool
    dropped: int = 0
    keep_keys: bool = True  # False when no layer attends to cached keys (then nothing grows with the context)
    #: structured prompting: an additive attention bias per held slot (B, S), and the bias every slot
    #: appended from now on gets (log M: the test tokens' scores × M); None = no bias
    key_bias: Tensor | None = None
    appended_bias: float = 0.0

    @classmethod
    def empty(cls, num_layers: int) -> "TransformerCache":
        return cls(layers=[KVCache() for _ in range(num_layers)])

    @property
    def held(self) -> int:
        """Slots held now (padding included): the keys a new query is compared with."""
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    @property
    def length(self) -> int:
        """Slots consumed since the cache was created (padding included)."""
        return self.dropped + self.held

    @property
    def cross(self) -> list[tuple[Tensor, Tensor] | None]:
        """Each layer's cross-attention keys and values (None before the first step or without cross-attention)."""
        return [layer.cross if isinstance(layer, KVCache) else None for layer in self.layers]

    @property
    def batch_size(self) -> int | None:
        """Rows the cache holds (None while empty)."""
        for value in (self.next_position, self.encoder_hidden):
            if value is not None:
                return value.shape[0]
        return None

    @property
    def parts(self) -> list[LayerCache]:
        """Every state held: each layer's own, then the stages' (YOCO's shared keys and values)."""
        return [layer for layer in self.layers if layer is not None] + list(self.stages.values())

    def context_features(self) -> tuple[Any, ...]:
        """The context features this cache carries into every call (structured prompting's key bias)."""
        return (KeyBias(self.key_bias),) if self.key_bias is not None else ()

    def nbytes(self) -> int:
        """Bytes of every state: keys and values (self-, cross- and shared attention), retention states."""
        return sum(part.nbytes() for part in self.parts)

    def append_tokens(self, mask: Tensor | None, positions: Tensor) -> None:
        """Record the mask (B, T_new; None = every token is real) and positions (B, T_new) of tokens being
        added to every layer."""
        if self.keep_keys:
            if mask is None:
                mask = torch.ones_like(positions, dtype=torch.bool)
            self.key_mask = mask if self.key_mask is None else torch.cat([self.key_mask, mask], dim=1)
            self.key_positions = positions if self.key_positions is None else torch.cat([self.key_positions, positions], 1)
            if self.key_bias is not None:
                self.key_bias = torch.cat([self.key_bias, self.key_bias.new_full(mask.shape, self.appended_bias)], 1)
        else:
            self.dropped += positions.shape[1]
        if mask is None:  # every new token is real: each row advances by T_new (no mask to count)
            self.next_position = (positions.new_full((positions.shape[0],), positions.shape[1])
                                  if self.next_position is None else self.next_position + positions.shape[1])
        else:
            start = self.next_position if self.next_position is not None else 0
            self.next_position = start + mask.long().sum(1)

    def forget_outside(self, window: int) -> None:
        """Drop the leading slots no future query can see through a window of ``window`` positions: in every
        row they are padding or lie at least ``window`` positions behind the row's next token."""
        if self.key_mask is None or self.key_positions is None or self.next_position is None:
            return
        visible = self.key_mask & (self.key_positions > self.next_position[:, None] - window)
        seen = visible.any(0)
        count = int(seen.long().argmax()) if bool(seen.any()) else seen.shape[0]
        if not count:
            return
        if self.stages:  # YOCO: the stage's shared keys stay whole; windowed layers keep only their tail
            for layer in self.layers:
                if layer is not None and layer.holds_keys:
                    layer.drop_front(max(0, count - (self.held - layer.length)))
            return
        self.key_mask, self.key_positions = self.key_mask[:, count:], self.key_positions[:, count:]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[:, count:]
        for layer in self.layers:
            if layer is not None and layer.holds_keys:
                layer.drop_front(count)
        self.dropped += count

    def fork(self) -> "TransformerCache":
        """An independent copy: decoding on either leaves the other as it was (beams, speculation, a prompt's
        state reused by several requests). Keys and values are copied without the buffers' spare room, and
        every tensor detached (a copy of decoding state, not of a graph to differentiate)."""
        return copy_state(self)

    def snapshot(self) -> "CacheSnapshot":
        """The state now, to :meth:`restore` later (any number of times)."""
        return CacheSnapshot(copy_state(self))

    def restore(self, snapshot: "CacheSnapshot") -> None:
        """Return to a snapshot of this cache, in place (the snapshot stays usable)."""
        if type(snapshot.cache) is not type(self):
            raise ValueError(f"a snapshot of a {type(snapshot.cache).__name__} cannot restore a {type(self).__name__}")
        state = copy_state(snapshot.cache)
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(state, item.name))

    def truncate(self, length: int) -> None:
        """Roll back to the first ``length`` slots consumed, in place: exact for caches that keep every token's
        keys and values (attention, grouped queries, YOCO's shared cache, cross-attention's source). A
        recurrent state (retention, the delta rule, Mamba-2, momentum), S2's reduced cache or a sliding
        window that already forgot slots cannot be rolled back from itself: take :meth:`snapshot` before
        the tokens to undo, and :meth:`restore` it."""
        count = self.length - length
        if length < 0 or count < 0:
            raise ValueError(f"cannot roll a cache of {self.length} slots back to {length}")
        if not count:
            return
        kinds = sorted({type(part).__name__ for part in self.parts if type(part) is not KVCache})
        if kinds or not self.keep_keys:
            raise ValueError(f"this cache holds {', '.join(kinds) or 'no keys'}: a state that cannot be rolled back "
                             "by itself; take cache.snapshot() before the tokens to undo and cache.restore() it")
        if self.dropped or any(part.length != self.held for part in self.parts):
            raise ValueError("a sliding window already forgot slots this cache would need after a rollback; "
                             "take cache.snapshot() before the tokens to undo and cache.restore() it")
        assert self.key_mask is not None and self.key_positions is not None and self.next_position is not None
        for part in self.parts:
            part.truncate(count)
        kept = self.held - count
        removed = self.key_mask[:, kept:]
        self.next_position = self.next_position - removed.long().sum(1)
        self.key_mask, self.key_positions = self.key_mask[:, :kept], self.key_positions[:, :kept]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[:, :kept]

    @classmethod
    def join(cls, caches: "list[TransformerCache]") -> "TransformerCache":
        """One cache holding the rows of ``caches`` (of one model; each prefilled), in order: continuous
        batching lets a request prefilled alone join a running batch. Slots are aligned at the newest end:
        a shorter row is left-padded with masked slots, which the model never reads, so each row decodes
        as it would alone. The inputs are not changed (the result shares none of their tensors' storage
        where padding was needed, and may share it otherwise: keep using one or the other)."""
        first = caches[0]
        if any(type(cache) is not type(first) or len(cache.layers) != len(first.layers)
               or set(cache.stages) != set(first.stages) or cache.keep_keys != first.keep_keys for cache in caches):
            raise ValueError("cannot join caches of different models")
        if any(cache.encoder_hidden is not None or cache.key_bias is not None for cache in caches):
            raise ValueError("joining caches of an encoder-decoder or of structured prompting is not supported")
        if any(cache.next_position is None for cache in caches):
            raise ValueError("cannot join an empty cache: prefill every request first")
        joined = copy.copy(first)
        joined.layers = [None if layer is None else join_states([cache.layers[i] for cache in caches])
                         for i, layer in enumerate(first.layers)]
        joined.stages = {name: join_states([cache.stages[name] for cache in caches]) for name in first.stages}
        joined.next_position = torch.cat([cache.next_position for cache in caches])
        joined.dropped = max(cache.dropped for cache in caches)
        if first.keep_keys:
            held = max(cache.held for cache in caches)
            joined.key_mask = torch.cat([_pad_front(cache.key_mask, held, False) for cache in caches])
            joined.key_positions = torch.cat([_pad_front(cache.key_positions, held, 0) for cache in caches])
        return joined

    def drop_padding(self) -> None:
        """Forget the leading slots that are padding in every row (left behind when rows leave a batch)."""
        if self.key_mask is None or not self.key_mask.shape[1]:
            return
        seen = self.key_mask.any(0)
        count = int(seen.long().argmax()) if bool(seen.any()) else seen.shape[0]
        if not count:
            return
        assert self.key_positions is not None
        # A part may hold only the newest slots (a window beside YOCO's shared cache). S2's reduced cache keeps
        # its own slots by position, not the model's: its compaction drops the padding it holds.
        for part in self.parts:
            if part.holds_keys and not isinstance(part, S2KVCache):
                part.drop_front(max(0, count - (self.held - part.length)))
        self.key_mask, self.key_positions = self.key_mask[:, count:], self.key_positions[:, count:]
        if self.key_bias is not None:
            self.key_bias = self.key_bias[:, count:]
        self.dropped += count

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (B',) in this order, e.g. the surviving beams; in place."""
        for part in self.parts:
            part.reorder(index)
        for name in ("key_mask", "key_positions", "next_position", "encoder_hidden", "encoder_mask", "key_bias"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))


@dataclass
class RetentionCache(TransformerCache):
    """Decoding state of a RetNet: one fixed-size :class:`RetentionState` per layer, whatever the context
    length (no keys are kept: ``held`` stays 0 and ``length`` counts the slots consumed)."""

    keep_keys: bool = False

    @classmethod
    def empty(cls, num_layers: int) -> "RetentionCache":
        return cls(layers=[RetentionState() for _ in range(num_layers)])

    @property
    def states(self) -> list[Tensor | None]:
        """Every layer's state tensor."""
        return [layer.state for layer in self.layers if isinstance(layer, RetentionState)]

    @states.setter
    def states(self, states: list[Tensor | None]) -> None:
        if len(states) != len(self.layers):
            raise ValueError(f"{len(states)} states for a cache of {len(self.layers)} layers")
        for layer, state in zip(self.layers, states):
            assert isinstance(layer, RetentionState)
            layer.update(state)


def join_states(states: list[Any]) -> Any:
    """One layer's states of several requests, as one state of all their rows (in order): a state
    class's own ``join`` (a cache of keys pads its slots), else each tensor field stacked along the batch
    (the first) dimension — what every fixed-size state (retention, the delta rule, Mamba-2) is."""
    own = getattr(type(states[0]), "join", None)
    if own is not None:
        return own(states)
    return _join_fields(states, skip=set())


def _join_fields(states: list[Any], skip: set[str]) -> Any:
    """A copy of ``states[0]`` whose tensor fields (not in ``skip``) are the states' stacked along dimension 0;
    any other field must be equal in all of them."""
    if any(type(state) is not type(states[0]) for state in states):
        raise ValueError(f"cannot join states of different kinds: {sorted({type(s).__name__ for s in states})}")
    joined = copy.copy(states[0])
    for item in dataclasses.fields(joined):
        if item.name in skip:
            continue
        values = [getattr(state, item.name) for state in states]
        if any(isinstance(value, Tensor) for value in values):
            if any(value is None for value in values):
                raise ValueError(f"cannot join {type(joined).__name__}s where only some hold {item.name}: "
                                 "prefill every request first")
            setattr(joined, item.name, torch.cat(values))
        elif any(value != values[0] for value in values[1:]):
            raise ValueError(f"cannot join {type(joined).__name__}s with different {item.name}")
    return joined


def _pad_front(x: Tensor, length: int, fill: Any = 0, dim: int = -1) -> Tensor:
    """``x`` with slots of ``fill`` before its own along ``dim`` (its slot dimension), to ``length`` slots."""
    missing = length - x.shape[dim]
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_full(shape, fill), x], dim=dim)


def copy_state(value: Any) -> Any:
    """An independent copy of decoding state: tensors detached and cloned (a KVCache's held slots only),
    lists, tuples, dicts and mutable dataclasses copied through; frozen dataclasses and numbers shared."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(item) for item in value)
    if isinstance(value, dict):
        return {key: copy_state(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not type(value).__dataclass_params__.frozen:
        copied = copy.copy(value)
        for item in dataclasses.fields(value):
            setattr(copied, item.name, copy_state(getattr(value, item.name)))
        if isinstance(value, KVCache) and value.key is not None:  # the held slots, moved to the front
            held = slice(value.start, value.start + value.length)
            copied.key, copied.value = value.key[..., held, :].clone(), value.value[..., held, :].clone()
            copied.start = 0
        return copied
    return value


@dataclass(frozen=True)
class CacheSnapshot:
    """A cache's state at one moment (:meth:`TransformerCache.snapshot`); restoring copies it again."""

    cache: TransformerCache

    @property
    def length(self) -> int:
        """Slots consumed when the snapshot was taken."""
        return self.cache.length


# ------------------------------------------------------------------------------------------------------------
# A cache on disk: its tensors in a safetensors file, its structure and numbers as JSON beside them. Loading
# fills the cache the model makes (model.new_cache()): the file names no class, so it can build nothing the
# model would not, and a file from another model's structure is refused.
# ------------------------------------------------------------------------------------------------------------

CACHE_FORMAT = "scaleformer-cache/1"


def save_cache(cache: TransformerCache, path: str | Path) -> Path:
    """Write ``cache`` to one safetensors file (written whole to a temporary name, then renamed)."""
    from safetensors.torch import save_file

    from scaleformer.durable import atomic_write, write_safetensors

    tensors: dict[str, Tensor] = {}
    structure = _encode(copy_state(cache), tensors, "")  # the copy holds no spare buffer room
    metadata = {"format": CACHE_FORMAT, "structure": json.dumps(structure)}
    path = Path(path)
    atomic_write(path, lambda temporary: write_safetensors(save_file, temporary, tensors, metadata))
    return path


def load_cache(path: str | Path, model: Any) -> TransformerCache:
    """The cache saved at ``path``, in the structure ``model.new_cache()`` gives, on the model's device."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors' own error type (SafetensorError) says what is wrong
        if not isinstance(error, (OSError, ValueError, RuntimeError)) and type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{path}: not a cache file ({' '.join(str(error).split())})") from None
    if metadata.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a cache written by save_cache (format {metadata.get('format')!r})")
    device = next(model.parameters()).device
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    cache = model.new_cache()
    try:
        _decode(json.loads(metadata["structure"]), cache, tensors, "cache")
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: a damaged cache file ({error!r})") from None
    return cache


def _encode(value: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if isinstance(value, Tensor):
        tensors[path] = value.detach().contiguous()
        return {"tensor": path}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"items": [_encode(item, tensors, f"{path}/{i}") for i, item in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if isinstance(value, dict):
        return {"dict": {key: _encode(item, tensors, f"{path}/{key}") for key, item in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                "fields": {f.name: _encode(getattr(value, f.name), tensors, f"{path}/{f.name}")
                           for f in dataclasses.fields(value)}}
    raise TypeError(f"cannot save a {type(value).__name__} at {path or 'the top'} of a cache")


def _decode(data: Any, template: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """``data`` read into the shape of ``template`` (what the model's fresh cache holds there)."""
    def mismatch(what: str) -> ValueError:
        return ValueError(f"the file's cache does not fit this model's at {where}: {what}")

    if isinstance(data, dict) and "tensor" in data:
        return tensors[data["tensor"]]
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if "items" in data:
        items = data["items"]
        if isinstance(template, (list, tuple)) and len(template) != len(items):
            raise mismatch(f"{len(items)} entries, this model's has {len(template)}")
        templates = template if isinstance(template, (list, tuple)) else [None] * len(items)
        decoded = [_decode(item, sub, tensors, f"{where}[{i}]") for i, (item, sub) in enumerate(zip(items, templates))]
        return tuple(decoded) if data["tuple"] else decoded
    if "dict" in data:
        if not isinstance(template, dict) or set(template) != set(data["dict"]):
            raise mismatch(f"entries {sorted(data['dict'])}")
        return {key: _decode(item, template[key], tensors, f"{where}.{key}") for key, item in data["dict"].items()}
    if not dataclasses.is_dataclass(template) or type(template).__name__ != data["type"]:
        raise mismatch(f"a {data['type']} where this model keeps {type(template).__name__}")
    if getattr(type(template), "__dataclass_params__").frozen:  # a part of the model's structure (S2's layout)
        if _encode(template, {}, "") != data:
            raise mismatch(f"a different {data['type']}")
        return template
    names = {f.name for f in dataclasses.fields(template)}
    if set(data["fields"]) != names:
        raise mismatch(f"fields {sorted(data['fields'])}, this model's {type(template).__name__} has {sorted(names)}")
    for name, item in data["fields"].items():
        setattr(template, name, _decode(item, getattr(template, name), tensors, f"{where}.{name}"))
    return template
