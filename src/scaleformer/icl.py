"""Structured prompting (arXiv 2212.06713): in-context learning with many demonstrations at a cost linear in
their number.

The demonstrations are split into M groups; each group is encoded on its own, all at positions 0 … L−1
(groups are cut to one length L, keeping their last tokens, as the paper's code does), so every group ends
just before the test input, which continues at position L. The groups' key/value caches are joined into one
cache of M·L slots, and the test tokens attend over all of it with the paper's rescaling: their scores over
the test context itself count M times (an additive log M on those keys — the same as holding each test key
M times, the duplicated-keys formulation). Inference only, for decoders whose layers are all softmax
attention (dense, grouped-query, any position kind).

Shapes: M groups, L group length, T test length, V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.cache import KVCache, TransformerCache
from scaleformer.files import jsonl_objects
from scaleformer.layers.attention import SoftmaxAttention
from scaleformer.models.base import ModelOutput
from scaleformer.models.transformer import Decoder

__all__ = ["group_demonstrations", "structured_prompt", "structured_cache", "structured_generate", "score_answers",
           "read_examples"]


def group_demonstrations(demonstrations: Sequence[Tensor], groups: int) -> Tensor:
    """(M, L) ids: the demonstrations (1-D id tensors, in order) dealt to the currently shortest of M groups,
    concatenated per group, then cut to the shortest group's length L keeping each group's last tokens."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if len(demonstrations) < groups:
        raise ValueError(f"{len(demonstrations)} demonstrations cannot fill {groups} groups")
    parts: list[list[Tensor]] = [[] for _ in range(groups)]
    lengths = [0] * groups
    for demo in demonstrations:
        if demo.dim() != 1 or demo.numel() == 0:
            raise ValueError("each demonstration must be a non-empty 1-D tensor of token ids")
        g = lengths.index(min(lengths))
        parts[g].append(demo)
        lengths[g] += demo.numel()
    length = min(lengths)
    return torch.stack([torch.cat(p)[-length:] for p in parts])


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, Decoder):
        raise ValueError("structured prompting needs a decoder (a causal language model)")
    for block in model.decoder.blocks:
        mixer = block.mixer
        if type(mixer) is not SoftmaxAttention or mixer.window is not None or mixer.block is not None:
            raise ValueError("structured prompting rescales softmax attention over a joined cache: every layer must "
                             f"be dense softmax attention (found {type(mixer).__name__} with another pattern)")


@torch.no_grad()
def structured_prompt(model: nn.Module, demonstrations: Sequence[Tensor] | Tensor, test_ids: Tensor,
                      groups: int | None = None) -> ModelOutput:
    """The test tokens (1-D, T) read after the demonstrations in structured groups.

    ``demonstrations``: a list of 1-D id tensors (grouped by :func:`group_demonstrations` into ``groups``), or
    an (M, L) tensor of groups already made. Returns the test tokens' logits (1, T, V) and the joined cache,
    which later calls continue (``model(next_ids, cache=out.cache)``), with the same rescaling.
    """
    grouped = _grouped(demonstrations, groups)
    if test_ids.dim() != 1 or test_ids.numel() == 0:
        raise ValueError("test_ids must be a non-empty 1-D tensor of token ids")
    return model(test_ids[None], cache=structured_cache(model, grouped))


@torch.no_grad()
def structured_cache(model: nn.Module, grouped: Tensor) -> TransformerCache:
    """The joined cache of (M, L) demonstration groups, each encoded independently at positions 0 … L−1;
    what follows it continues at position L with the test context weighted M times."""
    _check_model(model)
    was_training = model.training
    model.eval()
    try:
        encoded = model(grouped, use_cache=True).cache
    finally:
        model.train(was_training)
    return _join(encoded, grouped.shape[0], grouped.shape[1])


@torch.no_grad()
def structured_generate(model: nn.Module, demonstrations: Sequence[Tensor] | Tensor, prompt_ids: Tensor,
                        max_new_tokens: int, groups: int | None = None, **generate_options: Any) -> Tensor:
    """Continue ``prompt_ids`` (1-D) by up to ``max_new_tokens`` tokens after the demonstrations in structured
    groups (as :func:`structured_prompt`); ``generate_options`` as :func:`scaleformer.generate` (temperature,
    top_k, top_p, stop_tokens, generator, ...). Returns the new tokens (1-D)."""
    from scaleformer.generation import generate

    grouped = _grouped(demonstrations, groups)
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError("prompt_ids must be a non-empty 1-D tensor of token ids")
    ids = generate(model, prompt_ids[None], max_new_tokens, cache=structured_cache(model, grouped), **generate_options)
    return ids[0, prompt_ids.numel():]


def _grouped(demonstrations: Sequence[Tensor] | Tensor, groups: int | None) -> Tensor:
    grouped = demonstrations if isinstance(demonstrations, Tensor) else group_demonstrations(demonstrations, groups or 1)
    if grouped.dim() != 2 or (groups is not None and grouped.shape[0] != groups):
        raise ValueError(f"expected {groups or 'M'} groups of ids as an (M, L) tensor, got shape {tuple(grouped.shape)}")
    return grouped


def _join(cache: TransformerCache, groups: int, length: int) -> TransformerCache:
    """M caches of one row each (a batch of M) as one row of M·L slots, the test's slots weighted by M."""
    layers = []
    for part in cache.layers:
        assert isinstance(part, KVCache) and part.key is not None and part.value is not None
        key, value = (x[..., part.start:part.start + part.length, :] for x in (part.key, part.value))
        # (M, H, L, D) -> (1, H, M·L, D): group after group
        key, value = (x.transpose(0, 1).reshape(1, x.shape[1], groups * length, x.shape[-1]) for x in (key, value))
        layers.append(KVCache(key=key.contiguous(), value=value.contiguous(), length=groups * length))
    device = layers[0].key.device
    positions = torch.arange(length, device=device).repeat(groups)[None]
    return TransformerCache(layers=layers, key_mask=torch.ones(1, groups * length, dtype=torch.bool, device=device),
                            key_positions=positions, next_position=torch.tensor([length], device=device),
                            key_bias=torch.zeros(1, groups * length, dtype=torch.float64, device=device),
                            appended_bias=math.log(groups))  # float64: log M is not rounded before the scores are


@torch.no_grad()
def score_answers(model: nn.Module, demonstrations: Sequence[Tensor] | Tensor, prompt_ids: Tensor,
                  answers: Sequence[Tensor], groups: int | None = None) -> Tensor:
    """Log-likelihood (A,) of each answer (1-D ids) after ``prompt_ids``, under structured prompting; the
    answer with the highest is the model's choice."""
    scores = []
    for answer in answers:
        out = structured_prompt(model, demonstrations, torch.cat([prompt_ids, answer]), groups)
        logprobs = F.log_softmax(out.logits[0, prompt_ids.numel() - 1:-1].float(), dim=-1)
        scores.append(logprobs.gather(-1, answer[:, None].to(logprobs.device)).sum())
    return torch.stack(scores)


def read_examples(path: str | Path, *, with_options: bool) -> list[dict]:
    """A JSONL file of examples, one object per line: ``{"input": str, "output": str}`` for demonstrations;
    for test examples (``with_options``) either ``{"input": str, "options": [str, ...], "answer": int}``
    (multiple choice) or ``{"input": str, "output": str}`` (generation, scored by exact match). Any
    malformed line is one ValueError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start})") from None
    examples = []
    for where, example in jsonl_objects(text, path):
        if not isinstance(example.get("input"), str):
            raise ValueError(f"{where}: each line needs a string \"input\"")
        if with_options and "options" not in example:  # a generation test: the output, exactly
            if not isinstance(example.get("output"), str) or not example["output"].strip():
                raise ValueError(f"{where}: a test needs \"options\" and \"answer\" (multiple choice) or a "
                                 "non-empty string \"output\" (generation)")
        elif with_options:
            options, answer = example.get("options"), example.get("answer")
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
                raise ValueError(f"{where}: \"options\" must be a list of at least 2 non-empty strings")
            if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
                raise ValueError(f"{where}: \"answer\" must be the index of the right option (0..{len(options) - 1})")
        elif not isinstance(example.get("output"), str):
            raise ValueError(f"{where}: a demonstration needs a string \"output\"")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
