"""A decoding step compiled into one function: what a recurrent model's step costs once Python is gone.

Why: a decoding step of a small recurrent model is mostly not arithmetic. RetNet at width 512 with two
layers multiplies 33.6 MB of weights per token (≈ 0.6 ms on the project's 2-core CPU), and eager PyTorch
spends as long again or longer dispatching the step's ~150 small operations — norms, rotations, the
state update, the normalizer, the gates — one Python call and one kernel launch each (benchmarks/
RESULTS.md, issue 36). :class:`CompiledDecoding` writes the step as one function of tensors (token ids,
positions, each layer's state in; logits and states out) and hands it to ``torch.compile``, which fuses
the elementwise work of a layer into a few generated kernels around the matrix products and leaves one
call per step.

What it covers: decoder-only models whose every layer's mixer has a ``decode_step`` (the optional part of
the mixer contract, :mod:`scaleformer.mixer`) — retention with fixed or gated decays and every normalizer
(RetNet, gated RetNet), lightning attention, the delta rule (DeltaNet, Gated DeltaNet) and Mamba-2 — with
any residual scheme, plain norms, dense feed-forward networks (MLP or GLU) or none, and learned or
sinusoidal positions.
Anything else (attention, whose cache grows every step, and so every hybrid with it; YOCO's stages;
MoE; Multiway; BitNet linears) is refused by name when the step is built, so nothing is silently slower
or different.

The model's own forward stays the reference. Each ``decode_step`` is built from its layer's own pieces
(the same projections, op and read-out the forward calls); the one difference, retention's rotation in
real rather than complex arithmetic (inductor generates no code for complex views), is the same value to
rounding. The conformance suite checks every mixer's step against the forward in float64 (logits, states,
positions), and the cache the step advances is the model's own, so the model's forward, snapshots, forks
and ``generate`` continue it.

Costs: the first call compiles (10–35 s on a 2-core CPU: 24–33 s for 8 layers of width 512; the
default backend, inductor, needs a C++ compiler on a CPU), and a new batch size, dtype or weight layout
compiles again (from the second batch size on, one version serves every size). Use it where many tokens
are decoded with one model: ``scaleformer generate --compile``, ``sf.generate(..., compile=True)``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleformer.cache import TransformerCache
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.norms import RMSNorm
from scaleformer.layers.positions import sinusoidal_positions
from scaleformer.models.architecture import SinusoidalPosition
from scaleformer.models.base import ModelOutput

__all__ = ["CompiledDecoding", "compiled_step", "unsupported_reason"]

_PLAIN_NORMS = (RMSNorm, nn.LayerNorm)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s decoding step cannot be compiled by :class:`CompiledDecoding`, or None when it can."""
    from scaleformer.models.transformer import Decoder

    if not isinstance(model, Decoder):
        return f"it compiles decoder-only language models, not {type(model).__name__}"
    stack = model.decoder
    for index, block in enumerate(stack.blocks):
        if not hasattr(block.mixer, "decode_step"):
            return (f"layer {index}'s mixer ({type(block.mixer).__name__}) has no decode_step; covered: "
                    "retention (fixed or gated decays), lightning attention, the delta rule (DeltaNet, Gated "
                    "DeltaNet), Mamba-2")
        if block.cross_attn is not None:
            return f"layer {index} has cross-attention"
        if block.ffn is not None and type(block.ffn) is not FeedForward:
            return f"layer {index}'s feed-forward ({type(block.ffn).__name__}) is not covered (MoE, Multiway)"
        for norm in (block.mixer_norm, block.ffn_norm):
            if norm is not None and not isinstance(norm, _PLAIN_NORMS):
                return f"layer {index}'s {type(norm).__name__} norm (Multiway) is not covered"
    if getattr(model.config, "linear", "standard") != "standard":
        return "BitNet linears (linear='bitlinear') are not covered"
    if stack.stage_at:
        return f"stages ({', '.join(stack.stage_at.values())}: YOCO's shared keys and values) are not covered"
    for norm in (stack.embedding_norm, stack.final_norm):
        if norm is not None and not isinstance(norm, _PLAIN_NORMS):
            return f"a {type(norm).__name__} norm (Multiway) is not covered"
    return None


class CompiledDecoding:
    """``step(input_ids, cache)``: one decoding step of ``model`` — the new token of each row (B, 1), no
    padding — continuing ``cache`` (the model's own, from ``model.new_cache()`` or a prefill) in place,
    as ``model(input_ids, cache=cache)`` does; returns a :class:`~scaleformer.models.base.ModelOutput` with
    the logits (B, 1, V) and the cache.

    ``backend``: ``torch.compile``'s; "inductor" (the default) generates fused code, "eager" runs the same
    traced function without compiling it (for tests of the step's arithmetic, and to see what compiling
    buys). Raises ValueError, at construction, for a model it does not cover (:func:`unsupported_reason`).
    The model must stay in eval mode; its weights may change in place (the compiled code reads them at
    every call), and a changed layout (:func:`scaleformer.runtime.decoding_layout`) compiles anew.
    """

    def __init__(self, model: nn.Module, *, backend: str = "inductor") -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"compiled decoding: {reason}")
        self.model = model
        self.backend = backend
        # fullgraph: a graph break would leave Python between the pieces — the cost this class removes — so
        # it is an error here, not a silent slowdown. Dynamo keeps compiled versions per code object, at most
        # torch._dynamo.config.recompile_limit (8) of them, and every instance's guards are on its own model:
        # with one shared code object the ninth model compiled in a process would fail. A copy of the code
        # object per instance gives each its own versions.
        own_code = types.FunctionType(CompiledDecoding._plain_step.__code__.replace(), globals(), "_plain_step")
        self._step = torch.compile(types.MethodType(own_code, self), backend=backend, fullgraph=True)
        self._warm: set[torch.device] = set()

    def __call__(self, input_ids: Tensor, cache: TransformerCache) -> ModelOutput:
        from scaleformer.models.inputs import check_cache_batch, check_token_ids

        model = self.model
        if model.training:
            raise ValueError("compiled decoding runs a model in eval mode (dropout off); call model.eval()")
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"compiled decoding takes one new token per row, input_ids (B, 1); got "
                             f"{tuple(input_ids.shape)} (prefill a prompt with the model itself)")
        check_token_ids(input_ids, model.config.vocab_size)
        blocks = model.decoder.blocks
        if not isinstance(cache, TransformerCache) or len(cache.layers) != len(blocks) or any(
                type(layer) is not type(block.mixer.new_state()) for layer, block in zip(cache.layers, blocks)):
            raise ValueError("compiled decoding continues the model's own cache (model.new_cache(), or one a "
                             "prefill returned)")
        check_cache_batch(cache.batch_size, input_ids)
        batch = input_ids.shape[0]
        positions = (cache.next_position[:, None] if cache.length
                     else torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device))
        model.decoder._check_positions(positions, model.embed_tokens.weight.dtype)  # a learned table's length
        states = [self._held(layer, block.mixer, batch, input_ids.device) for layer, block in zip(cache.layers, blocks)]
        with torch.no_grad():
            if input_ids.device not in self._warm:
                # Layers keep per-device tables they fill on first use (rotation frequencies, decays); filled
                # during tracing, they would fail the compiled code's guards on the next call and compile it
                # again, so one eager step fills them first.
                self._plain_step(input_ids, positions, states)
                self._warm.add(input_ids.device)
            logits, states = self._step(input_ids, positions, states)
        cache.append_tokens(None, positions)  # as the model's forward records one real token per row
        for layer, state in zip(cache.layers, states):
            for field, tensor in zip(dataclasses.fields(layer), state):
                setattr(layer, field.name, tensor)
        return ModelOutput(logits, cache)

    def _held(self, layer: Any, mixer: nn.Module, batch: int, device: torch.device) -> tuple[Tensor, ...]:
        """A layer's state as the tuple its ``decode_step`` reads (the state dataclass's fields, in order),
        or the mixer's zeros for a layer that has read nothing."""
        held = tuple(getattr(layer, field.name) for field in dataclasses.fields(layer))
        if all(tensor is None for tensor in held):
            return mixer.empty_decode_state(batch, self.model.embed_tokens.weight.dtype, device)
        if any(tensor is None for tensor in held):
            raise ValueError(f"compiled decoding: a {type(layer).__name__} holds some of its tensors and not others")
        return held

    def _plain_step(self, input_ids: Tensor, positions: Tensor,
                    states: list[tuple[Tensor, ...]]) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """The step as tensor operations only (what ``torch.compile`` traces): the stack's forward for one
        token per row, every block by its residual scheme, each mixer through its ``decode_step``."""
        model, stack = self.model, self.model.decoder
        x = stack.embed_tokens(input_ids)
        if stack.embed_scale != 1.0:
            x = x * stack.embed_scale
        if stack.embed_positions is not None:
            x = x + stack.embed_positions(positions)
        elif isinstance(stack.cfg.position, SinusoidalPosition):
            x = x + sinusoidal_positions(positions, stack.cfg.embed_dim, x.dtype)
        if stack.embedding_norm is not None:
            x = stack.embedding_norm(x)
        new_states = []
        for block, state in zip(stack.blocks, states):
            pre = block.scheme in ("pre", "subln")
            mixed, state = block.mixer.decode_step(block.mixer_norm(x) if pre else x, positions, state)
            x = x + mixed if pre else block.mixer_norm(x * block.alpha + mixed)
            new_states.append(state)
            if block.ffn is not None:
                x = x + block.ffn(block.ffn_norm(x)) if pre else block.ffn_norm(x * block.alpha + block.ffn(x))
        if stack.final_norm is not None:
            x = stack.final_norm(x)
        logits = model.output_projection(x) if model.output_projection is not None else F.linear(x, model.head_weight)
        return logits, new_states


class _CompiledSteps(dict):
    """A model's compiled steps by backend, kept on the model: copies and pickles of the model start
    without them (compiled code belongs to this model object and process)."""

    def __deepcopy__(self, memo: dict) -> "_CompiledSteps":
        return _CompiledSteps()

    def __reduce__(self) -> tuple:
        return _CompiledSteps, ()


def compiled_step(model: nn.Module, backend: str = "inductor") -> CompiledDecoding:
    """The model's :class:`CompiledDecoding`, built once per model and backend and kept on the model (a
    compile costs seconds; ``generate(..., compile=True)`` asks for it at every call)."""
    steps = model.__dict__.get("_compiled_decoding")
    if steps is None:
        steps = model.__dict__["_compiled_decoding"] = _CompiledSteps()
    if backend not in steps:
        steps[backend] = CompiledDecoding(model, backend=backend)
    return steps[backend]
