"""The per-forward context: what every layer of one call shares, computed once by the model.

A model builds one :class:`Context` per call from its inputs (ids, padding mask, packed document ids,
cache, Multiway split, sequence-parallel group) and hands it to every block. Mixers read what they need
from it and derive their own masks and biases through :meth:`Context.shared`, which computes a value the
first time a layer asks and returns the same tensor to every later layer — rotary phases, a sliding
window's mask and the dense equivalent of a dilated pattern are each built once per call, not per layer.

What only one family of mixers reads is not a field: it is a *feature*, a small typed object keyed by its
class (:meth:`Context.feature`, :meth:`Context.with_feature`). A mixer's stage (YOCO's shared key/value
projection, see :class:`~scaleformer.mixer.MixerConfig.build_stage`) adds one for the layers after it; a
cache adds those it carries (structured prompting's :class:`~scaleformer.cache.KeyBias`). The context
module knows none of them.

Shapes: B batch, T new tokens, S keys (held in the cache + new), H heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, TypeVar

import torch
from torch import Tensor

from scaleformer.layers.positions import Rotary

__all__ = ["Context", "Source", "DocumentRows", "positions_from_mask"]

T_ = TypeVar("T_")
F_ = TypeVar("F_")


def positions_from_mask(mask: Tensor, start: Tensor | None = None, document_ids: Tensor | None = None) -> Tensor:
    """(B, T) bool mask -> (B, T) long positions counting real tokens from ``start`` (B,) (0 if None).

    With ``document_ids`` (B, T), the count restarts at 0 where a new document begins. Padding slots get
    the position of the next real token (clamped at ``start``); they are masked out of attention anyway.
    """
    counts = mask.long().cumsum(1)
    if document_ids is not None:  # subtract the count reached before each token's document began
        starts = torch.ones_like(mask)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        before = torch.where(starts, counts - mask.long(), 0)
        counts = counts - torch.cummax(before, dim=1).values
    positions = counts - 1
    if start is not None:
        positions = positions + start[:, None]
        return torch.maximum(positions, start[:, None])
    return positions.clamp(min=0)


@dataclass(frozen=True)
class Source:
    """An encoder-decoder's encoded source, which every cross-attention layer of the call reads."""

    hidden: Tensor  # (B, S_src, C)
    mask: Tensor | None = None  # (B, S_src) bool, False = padding
    document_ids: Tensor | None = None  # (B, S_src) packed sources: target document k reads source document k


@dataclass(frozen=True)
class Context:
    """One forward call's shared inputs, built once; mixers derive the rest through :meth:`shared` (its
    memo is the one mutable part: values computed from the fields, never new inputs)."""

    positions: Tensor  # (B, T) each new token's position (restarting per document in packed rows)
    key_positions: Tensor  # (B, S) positions of every key: held in the cache, then new
    causal: bool  # decoder side: a query sees keys at or before its own slot
    token_mask: Tensor | None = None  # (B, T) bool, False = padding; None = no padding
    key_mask: Tensor | None = None  # (B, S) bool; None = every key is real
    past: int = 0  # key slots held before this call (S = past + T)
    document_ids: Tensor | None = None  # (B, T) packed rows: which document each token belongs to
    way_ids: Tensor | None = None  # (B, T) Multiway: which copy each token uses
    sequence_group: Any = None  # torch.distributed group: the tokens are this rank's shard of a sequence
    #: with ``sequence_group`` and packed rows: every rank's document ids (B, W·T), gathered once per call
    split_documents: Tensor | None = None
    #: (B, S) the documents of the keys, where they are not this call's tokens (context parallelism)
    key_document_ids: Tensor | None = None
    rotary: Rotary | None = None  # RoPE/xPos of this model, applied to queries and keys
    relative_bias: Tensor | None = None  # (B, H, T, S) T5 bias, computed once for all layers
    source: Source | None = None  # an encoder-decoder's encoded source, for cross-attention
    #: the form recurrent mixers run in this call ("parallel", "chunkwise", "recurrent"; None: their
    #: default): a call option of every mixer that declares forms (MixerSupport.forms), not of one family
    form: str | None = None
    #: what one family of mixers reads, one typed object per class (see :meth:`feature`)
    features: Mapping[type, Any] = field(default_factory=dict)
    _shared: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def feature(self, kind: type[F_]) -> F_ | None:
        """This call's feature of class ``kind``, or None when nothing added one."""
        return self.features.get(kind)

    def with_feature(self, value: Any) -> "Context":
        """This context with ``value`` as its feature of ``type(value)`` (replacing one of that class)."""
        return dataclasses.replace(self, features={**self.features, type(value): value})

    def shared(self, key: Hashable, compute: Callable[[], T_]) -> T_:
        """``compute()`` the first time ``key`` is asked for in this call, the same value afterwards."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def recurrence_group(self, documents: "DocumentRows | None" = None) -> Any:
        """A recurrent op's ``sequence_group`` in this call: None in one process; under context parallelism
        the group, or for packed rows laid out as ``documents``, how those rows meet the other ranks' (a
        :class:`~scaleformer.parallel.context.DocumentSplit`)."""
        if self.sequence_group is None or documents is None:
            return self.sequence_group
        from scaleformer.parallel.context import document_split

        return document_split(self, documents)

    @property
    def plain(self) -> bool:
        """Nothing restricts attention beyond (causal) order: no padding, nothing cached before, no documents."""
        return self.token_mask is None and self.past == 0 and self.document_ids is None

    def rotate(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys (B, H, T, D) rotated by RoPE/xPos at this call's positions; phases computed once."""
        return self.rotate_one(q, is_query=True), self.rotate_one(k, is_query=False)

    def rotate_one(self, x: Tensor, *, is_query: bool) -> Tensor:
        """Queries (or keys) (B, H, T, D) rotated at this call's positions (unchanged without RoPE/xPos)."""
        if self.rotary is None:
            return x
        rotary = self.rotary
        if rotary.scale_base is None:  # RoPE: one set of phases serves queries and keys
            phases = self.shared(("phases", x.dtype), lambda: rotary.phases(self.positions, x.dtype))
        else:
            phases = self.shared(("phases", x.dtype, "query" if is_query else "key"),
                                 lambda: rotary.phases(self.positions, x.dtype, is_query=is_query))
        return rotary.rotate(x, phases)

    def last_tokens(self, count: int) -> "Context":
        """This context for the call's last ``count`` tokens as queries, every key kept: what the layers
        see that run on those tokens alone (YOCO's cross-decoder skipping a prompt's earlier tokens)."""
        t = self.positions.shape[1]
        if count >= t:
            return self
        if self.document_ids is not None or self.relative_bias is not None or self.sequence_group is not None:
            raise ValueError("packed documents, a T5 bias and sequence parallelism need every query")
        cut = lambda x: None if x is None else x[:, t - count:]  # noqa: E731
        return dataclasses.replace(self, positions=cut(self.positions), token_mask=cut(self.token_mask),
                                   way_ids=cut(self.way_ids), past=self.past + t - count, _shared={})

    def cross_mask(self) -> Tensor | None:
        """Bool (B, 1, 1 | T, S_src): the source tokens a query may read — real ones, and with packed documents
        only those of its own document."""
        def compute() -> Tensor | None:
            source = self.source
            mask = None if source is None or source.mask is None else source.mask[:, None, None, :]
            if source is not None and source.document_ids is not None and self.document_ids is not None:
                same = self.document_ids[:, None, :, None] == source.document_ids[:, None, None, :]
                mask = same if mask is None else mask & same
            return mask
        return self.shared("cross_mask", compute)

    def visible(self, *, window: int | None = None, block: int | None = None) -> Tensor:
        """Bool (B, 1, T, S): the key is real, in the query's document, causal (within ``window`` positions,
        in its ``block`` or the one before) — or the key is the query itself, so no row is empty."""
        return self.shared(("visible", window, block), lambda: self._visible(window, block))

    def _visible(self, window: int | None, block: int | None) -> Tensor:
        t, s = self.positions.shape[1], self.key_positions.shape[1]
        device = self.positions.device
        q_slot = torch.arange(self.past, self.past + t, device=device)[:, None]
        k_slot = torch.arange(s, device=device)[None, :]
        seen = (self.key_mask if self.key_mask is not None
                else torch.ones_like(self.key_positions, dtype=torch.bool))[:, None, :]  # (B, 1, S)
        if self.document_ids is not None:  # packed rows hold no cache: keys are the new tokens (or every rank's)
            keys = self.document_ids if self.key_document_ids is None else self.key_document_ids
            seen = seen & (keys[:, None, :] == self.document_ids[:, :, None])
        if self.causal:
            seen = seen & (k_slot <= q_slot)
        distance = self.positions[:, :, None] - self.key_positions[:, None, :]
        if window is not None:  # W positions: the query's own and the W - 1 before it (either side if bidirectional)
            seen = seen & (distance.abs() < window)
        if block is not None:
            seen = seen & (self.key_positions[:, None, :] // block >= self.positions[:, :, None] // block - 1)
        return (seen | (k_slot == q_slot))[:, None]


@dataclass(frozen=True)
class DocumentRows:
    """Packed rows laid out one document per row, for ops whose state must not cross a boundary (retention,
    the dilated op): ``gather`` makes (N, L, ...) rows of N documents, right-padded to the longest L;
    ``scatter`` puts per-document results back in place."""

    index: Tensor  # (N, L) long: which token of the flattened (B·T) batch sits in each slot
    filled: Tensor  # (N, L) bool: the slot holds a token of the document (False: right padding)
    valid: Tensor  # (N, L) bool: ... and that token is real (not padding inside a packed row)
    batch: int

    @classmethod
    def of(cls, document_ids: Tensor, token_mask: Tensor | None = None) -> "DocumentRows":
        b, t = document_ids.shape
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # every row starts a document
        starts = starts.flatten()
        document = starts.long().cumsum(0) - 1  # (B·T,) which document each token belongs to
        first = starts.nonzero()[:, 0]  # (N,) flat index of each document's first token
        offset = torch.arange(b * t, device=document_ids.device) - first[document]
        count, length = first.shape[0], int(torch.bincount(document).max())
        index = torch.zeros(count, length, dtype=torch.long, device=document_ids.device)
        filled = torch.zeros(count, length, dtype=torch.bool, device=document_ids.device)
        index[document, offset] = torch.arange(b * t, device=document_ids.device)
        filled[document, offset] = True
        valid = filled if token_mask is None else filled & token_mask.flatten()[index]
        return cls(index=index, filled=filled, valid=valid, batch=b)

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (N, L, ...)."""
        return x.flatten(0, 1)[self.index]

    def scatter(self, rows: Tensor, length: int) -> Tensor:
        """(N, L, ...) -> (B, T, ...) with T = ``length``."""
        out = rows.new_zeros((self.batch * length, *rows.shape[2:]))
        out = out.index_put((self.index[self.filled],), rows[self.filled])
        return out.unflatten(0, (self.batch, length))
