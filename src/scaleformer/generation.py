"""Autoregressive generation with a cache: greedy, temperature, top-k, top-p, stop tokens.

``generate`` prefills the whole (left-padded) prompt in one call, then feeds one token per call. It works
with any decoder-style model that follows the forward contract
``model(input_ids, attention_mask=..., use_cache=True, cache=...) -> output with .logits and .cache``,
and with an ``EncoderDecoder`` given ``source_ids``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from scaleformer.models.transformer import EncoderDecoder
from scaleformer.sampling import filter_top_k, filter_top_p, sample_next

__all__ = ["generate", "sample_next", "filter_top_k", "filter_top_p"]


def _check_args(input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (batch, length) LongTensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. a BOS id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN compares False with everything
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        mask = attention_mask.bool()
        if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            raise ValueError("generate needs LEFT padding (mask rows like 0 0 1 1 1): right-padded rows would "
                             "continue after their padding")
        if not bool(mask[:, -1].all()):
            raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")


class _ModelEOS:
    """The default of ``generate(stop_tokens=...)``: the model's own end-of-sequence id, if it has one."""

    def __repr__(self) -> str:
        return "EOS"


#: ``generate(stop_tokens=EOS)``: stop at ``model.eos_token_id`` (set by ``scaleformer.load``), if any
EOS = _ModelEOS()


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: "int | Sequence[int] | None | _ModelEOS" = EOS, pad_token: int = 0,
             generator: torch.Generator | None = None, source_ids: Tensor | None = None,
             source_mask: Tensor | None = None, on_token: Callable[[Tensor], None] | None = None,
             cache: Any = None, draft: nn.Module | None = None, lookahead: int = 4, stats: Any = None,
             compile: bool = False, **model_kwargs: Any) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        input_ids: (B, T) prompts, left-padded when lengths differ (``attention_mask`` 0 on the padding).
            For an EncoderDecoder these are the target prefix (e.g. the BOS id) and ``source_ids`` the input.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature) after top-k / top-p.
        stop_tokens: a row is finished after emitting one of these; it then emits ``pad_token``.
            Generation ends early once every row is finished. By default (:data:`EOS`) the model's own
            end-of-sequence id, ``model.eos_token_id``, which ``scaleformer.load`` sets from a checkpoint's
            byte or BPE tokenizer (as Hugging Face's ``generate`` stops at its config's eos); ``None`` (or
            ``()``) never stops early.
        on_token: called with each new (B,) token column as soon as it is chosen (streaming output).
        cache: a decoding cache the prompts continue (e.g. structured prompting's joined demonstrations,
            :func:`scaleformer.icl.structured_generate`); consumed in place. None = start empty.
        draft: a small model with the same vocabulary: speculative decoding
            (:mod:`scaleformer.speculative`), ``lookahead`` draft tokens a round, each row on its own; the
            tokens follow ``model``'s distribution exactly (greedy: ``model``'s own greedy output), and
            ``stats`` (a :class:`~scaleformer.speculative.SpeculativeStats`) counts what was accepted.
        compile: decode every token after the prompt with the model's compiled step
            (:class:`~scaleformer.compiled_decoding.CompiledDecoding`: recurrent models, retention layers;
            the first call compiles for seconds, later calls with the same model reuse it). The same
            tokens as without it, to rounding (greedy: the same ids unless two logits tie within it).
        model_kwargs: passed to every forward call (e.g. ``multiway_split``).

    Returns:
        (B, T + n) ids: the prompts followed by the n <= max_new_tokens generated tokens.
    """
    _check_args(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    if stop_tokens is EOS:
        stop_tokens = getattr(model, "eos_token_id", None)
    compiled = None
    if compile:
        if draft is not None or model_kwargs:
            raise ValueError("compile=True decodes a model's plain steps: not with draft= or model options "
                             f"({', '.join(['draft'] * (draft is not None) + list(model_kwargs))})")
        from scaleformer.compiled_decoding import compiled_step

        compiled = compiled_step(model)  # ValueError, naming the part, for a model it does not cover
    if draft is not None:
        return _speculative(model, draft, input_ids, max_new_tokens, attention_mask=attention_mask,
                            options=dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                         stop_tokens=stop_tokens, lookahead=lookahead, stats=stats),
                            pad_token=pad_token, unsupported=dict(source_ids=source_ids, on_token=on_token,
                                                                   cache=cache, **model_kwargs))
    stops = torch.tensor([stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens or []),
                         dtype=torch.long, device=input_ids.device)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, EncoderDecoder):
            if source_ids is None:
                raise ValueError("an EncoderDecoder needs source_ids (the input to translate/transform)")
            step = lambda ids, mask, cache: model(source_ids if cache is None else None, ids, src_mask=source_mask,
                                                  tgt_mask=mask, use_cache=True, cache=cache)
        else:
            if source_ids is not None:
                raise ValueError("source_ids is only for EncoderDecoder models")
            # logits_to_keep=1: only the next token's logits are needed (a YOCO prefill skips its cross-decoder
            # for every other prompt token)
            step = lambda ids, mask, cache: model(ids, attention_mask=mask, use_cache=True, cache=cache,
                                                  logits_to_keep=1, **model_kwargs)
        if cache is not None and isinstance(model, EncoderDecoder):
            raise ValueError("cache= continues a decoder's cache; an EncoderDecoder starts from its source")
        out = step(input_ids, attention_mask, cache)
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for index in range(max_new_tokens):
            next_ids = sample_next(out.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=generator)
            tokens.append(torch.where(finished, torch.full_like(next_ids, pad_token), next_ids)[:, None])
            if on_token is not None:
                on_token(tokens[-1][:, 0])
            finished = finished | torch.isin(next_ids, stops)
            if index + 1 == max_new_tokens or bool(finished.all()):
                break
            # Finished rows keep feeding their sampled id (always a valid one; pad_token may not be): the
            # row's outputs are discarded, and rows never attend to each other.
            out = (step(next_ids[:, None], None, out.cache) if compiled is None
                   else compiled(next_ids[:, None], out.cache))
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)


def _speculative(model: nn.Module, draft: nn.Module, input_ids: Tensor, max_new_tokens: int, *,
                 attention_mask: Tensor | None, options: dict[str, Any], pad_token: int,
                 unsupported: dict[str, Any]) -> Tensor:
    """``generate(draft=...)``: each row speculatively on its own, laid out as ``generate`` lays it out
    (the prompts as given, then each row's tokens, ``pad_token`` after a row's stop token)."""
    from scaleformer.speculative import SpeculativeStats, speculative_generate

    given = [name for name, value in unsupported.items() if value is not None]
    if given or isinstance(model, EncoderDecoder):
        raise ValueError("speculative decoding (draft=) takes a decoder's prompts only, not "
                         + (", ".join(given) or "an EncoderDecoder"))
    if options["stats"] is None:
        options["stats"] = SpeculativeStats()
    rows = []
    for row in range(input_ids.shape[0]):
        prompt = input_ids[row:row + 1]
        if attention_mask is not None:
            prompt = prompt[:, attention_mask[row].bool()]
        ids, _ = speculative_generate(model, draft, prompt, max_new_tokens, **options)
        rows.append(ids[0, prompt.shape[1]:])
    width = max(len(row) for row in rows)
    new = torch.full((input_ids.shape[0], width), pad_token, dtype=torch.long, device=input_ids.device)
    for index, row in enumerate(rows):
        new[index, :len(row)] = row
    return torch.cat([input_ids, new], dim=1)
