"""Checks of what a user passes to a model's forward: one clear ``ValueError`` instead of an index error
deep inside an embedding, or a mask value silently read as "token"."""

from __future__ import annotations

import torch
from torch import Tensor

from scaleformer.cache import DecodingCache

__all__ = ["check_token_ids", "check_attention_mask", "check_cache_batch", "check_document_ids", "document_runs",
           "check_contiguous_documents", "new_token_mask"]


def check_token_ids(ids: Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """ids must be a non-empty (batch, length) integer tensor of ids in [0, vocab_size)."""
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a (batch, length) tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}; add a batch "
                         "dimension with ids[None]")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): give at least one token per row")
    if torch.compiler.is_compiling():
        return  # value checks would break the graph; the eager call checked the same code path
    low, high = (int(x) for x in torch.aminmax(ids))  # one pass (a decoding step checks its token too)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name} holds ids outside [0, {vocab_size}) (they span [{low}, {high}]); the model's "
                         f"vocab_size is {vocab_size}")


def check_attention_mask(mask: Tensor | None, name: str = "attention_mask") -> None:
    """A mask is boolean, or numbers that are all exactly 0 (padding) or 1 (token)."""
    if mask is None or mask.dtype == torch.bool or torch.compiler.is_compiling():
        return
    if not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1) | torch.isnan(mask.float())].flatten()[:3].tolist()
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (token), found {odd}")


def check_document_ids(document_ids: Tensor | None, input_ids: Tensor, cache: DecodingCache | None, *,
                       renumber: bool = True) -> Tensor | None:
    """Packed rows: an integer id per token, same shape as the ids; a full row at a time (no cache). Returns
    the ids as :func:`document_runs` renumbers them, the one definition every mixer uses (``renumber``
    False: as given, for a shard of a split row, which the model renumbers once it has every rank's)."""
    if document_ids is None:
        return None
    if not isinstance(document_ids, Tensor) or document_ids.shape != input_ids.shape:
        shape = tuple(document_ids.shape) if isinstance(document_ids, Tensor) else type(document_ids).__name__
        raise ValueError(f"document_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must hold integer document ids, got {document_ids.dtype}")
    if cache is not None:
        raise ValueError("document_ids pack whole documents into a row for training or scoring; decode with a "
                         "cache one document per row instead")
    return document_runs(document_ids) if renumber else document_ids


def document_runs(document_ids: Tensor) -> Tensor:
    """(B, T) -> (B, T): a document is a maximal run of equal ids, numbered 0, 1, 2, ... along each row. An id
    used again later in a row ([0,0,0,1,1,1,0,0,0]) starts a new document, for attention (which groups tokens
    by equal id) exactly as for positions and recurrent states (which restart where the id changes)."""
    runs = torch.zeros_like(document_ids)
    runs[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).cumsum(1)
    return runs


def check_contiguous_documents(document_ids: Tensor, name: str) -> None:
    """Refuse an id that comes back after another document in a row, where ids are matched across two
    sequences (an encoder-decoder's packed pairs: target document k reads source document k)."""
    runs = document_runs(document_ids)
    for row in range(document_ids.shape[0] if document_ids.shape[1] else 0):
        if int(runs[row, -1]) + 1 != int(torch.unique(document_ids[row]).numel()):
            raise ValueError(f"{name} row {row}: an id is used for two separate runs of tokens; packed pairs are "
                             "matched by id, so give each document its own id")


def check_cache_batch(cache_batch: int | None, ids: Tensor, name: str = "input_ids") -> None:
    if cache_batch is not None and cache_batch != ids.shape[0]:
        raise ValueError(f"the cache holds {cache_batch} rows but {name} has {ids.shape[0]}; step a cache with the "
                         "batch it was filled with (reorder it first for beam search)")


def new_token_mask(attention_mask: Tensor | None, input_ids: Tensor, cache: DecodingCache | None) -> Tensor | None:
    """Accept a mask over the new tokens (B, T) or, Hugging Face style, over cached + new (B, S + T)."""
    if attention_mask is None:
        return None
    new, past = input_ids.shape[1], cache.length if cache is not None else 0
    if attention_mask.shape == input_ids.shape:
        return attention_mask
    if past and attention_mask.shape == (input_ids.shape[0], past + new):
        return attention_mask[:, past:]
    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {tuple(input_ids.shape)} "
                     f"(the new tokens) or {(input_ids.shape[0], past + new)} (cached + new tokens)")
