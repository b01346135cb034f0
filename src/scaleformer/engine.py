"""Continuous batching: many requests decoded together, joining and leaving between steps.

An :class:`Engine` holds one decoding cache for every running request (a row each). Each :meth:`Engine.step`

1. feeds every running row its last token in one forward call, and chooses each row's next token with that
   request's own options and random generator;
2. lets finished rows leave (``cache.reorder`` keeps the others; slots now padding in every row are
   dropped);
3. admits waiting requests up to ``max_batch``: each prompt is prefilled on its own (from the longest
   cached prefix, with a :class:`PrefixCache`), its first token chosen, and its cache joined to the batch
   (:meth:`~scaleformer.cache.TransformerCache.join` left-pads attention slots, which the model masks).

A request's row never reads another's, so each request gets the tokens it gets alone with
:func:`scaleformer.generate` (greedy; and sampling with a ``seed``, which gives it a generator of its own,
consumed as ``generate`` consumes one). The rounding of a batched product may differ from a single row's, so
in float32 a near-tie can go the other way; in float64 the tokens are the same (tests/test_engine.py).
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from scaleformer.cache import TransformerCache
from scaleformer.models.transformer import EncoderDecoder
from scaleformer.sampling import sample_next

__all__ = ["Engine", "PrefixCache", "Request", "SamplingOptions", "context_limit"]


@dataclass(frozen=True)
class SamplingOptions:
    """How one request is continued: as :func:`scaleformer.generate`'s arguments of these names. ``seed``
    gives the request a random generator of its own (reproducible sampling, whatever else runs beside it);
    None draws from torch's global one."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))


@dataclass(eq=False)
class Request:
    """One prompt's generation: its tokens so far, and why it ended (``finish_reason``: "stop" after a stop
    token, "length" at ``max_new_tokens`` or the model's context limit, "cancelled"; None while running)."""

    id: int
    prompt: tuple[int, ...]
    options: SamplingOptions
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    #: prompt tokens whose state came from the prefix cache instead of a forward pass
    cached_prompt_tokens: int = 0
    generator: torch.Generator | None = field(default=None, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def context_limit(model: nn.Module) -> int | None:
    """The most positions ``model`` can take (prompt and generated tokens together): its learned position
    table's size, or None when nothing bounds it."""
    stack = getattr(model, "decoder", None)
    table = getattr(stack, "embed_positions", None)
    return None if table is None else table.table.num_embeddings


class PrefixCache:
    """Decoding states after prompt prefixes, found by exact token match: a prompt's state is stored at every
    multiple of ``block`` tokens, and a later prompt starting with the same tokens resumes from the longest
    one stored (its remaining tokens prefilled from there: chunked prefill, equal to one call up to
    rounding). Least recently used states leave once their bytes pass ``max_bytes``."""

    def __init__(self, block: int = 32, max_bytes: int = 256 << 20):
        if block < 1 or max_bytes < 0:
            raise ValueError(f"a prefix cache needs block >= 1 and max_bytes >= 0, got {block}, {max_bytes}")
        self.block, self.max_bytes = block, max_bytes
        self._states: collections.OrderedDict[tuple[int, ...], tuple[TransformerCache, int]] = collections.OrderedDict()
        self.nbytes = 0
        self.lookups = self.hits = self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._states)

    def longest(self, tokens: Sequence[int]) -> tuple[int, TransformerCache | None]:
        """(n, a fork of the state after ``tokens[:n]``) for the longest stored prefix that leaves at least one
        token to run (its logits choose the next token); (0, None) when none is stored."""
        self.lookups += 1
        key = tuple(tokens)
        for length in range((len(key) - 1) // self.block * self.block, 0, -self.block):
            stored = self._states.get(key[:length])
            if stored is not None:
                self._states.move_to_end(key[:length])
                self.hits += 1
                self.tokens_reused += length
                return length, stored[0].fork()
        return 0, None

    def store(self, prefix: Sequence[int], cache: TransformerCache) -> None:
        """Keep a fork of ``cache``, the state after exactly ``prefix``."""
        key = tuple(prefix)
        if key in self._states:
            self._states.move_to_end(key)
            return
        state = cache.fork()
        size = state.nbytes()
        if size > self.max_bytes:
            return
        self._states[key] = (state, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, evicted) = self._states.popitem(last=False)
            self.nbytes -= evicted


class Engine:
    """Continuous batching over one decoder (see the module docstring). ``submit`` and ``cancel`` may be
    called from other threads while one thread runs ``step``."""

    def __init__(self, model: nn.Module, *, max_batch: int = 16, prefix_cache: PrefixCache | None = None):
        if isinstance(model, EncoderDecoder) or not hasattr(model, "new_cache"):
            raise ValueError("the engine serves decoder language models (GPT-like, RetNet, hybrids), "
                             f"not a {type(model).__name__}")
        if getattr(getattr(model, "decoder", None), "cfg", None) is not None and model.decoder.cfg.ways > 1:
            raise ValueError("the engine does not serve Multiway models (each call needs its modality split)")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.prefix_cache = model.eval(), max_batch, prefix_cache
        self.limit = context_limit(model)
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # the cache's rows, in order
        self.cache: TransformerCache | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def submit(self, prompt: Sequence[int], options: SamplingOptions = SamplingOptions()) -> Request:
        """Queue a prompt (token ids); it joins the batch at a later :meth:`step`."""
        prompt = tuple(int(t) for t in prompt)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. a BOS id)")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {min(prompt)}..{max(prompt)}")
        if self.limit is not None and len(prompt) >= self.limit:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this model takes at most {self.limit} positions")
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(options.seed)
        request = Request(id=next(self._ids), prompt=prompt, options=options, generator=generator)
        with self._lock:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """End ``request`` at the next step (its row leaves the batch); its tokens so far stay."""
        request._cancelled = True

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int | None]]:
        """One decoding step for every running request, then admission of waiting ones. Returns each new
        token as (request, token), and (request, None) for a request that ended without one (cancelled, or
        ``max_new_tokens=0``); ``request.done`` tells whether it has ended."""
        events: list[tuple[Request, int | None]] = []
        self._leave([r for r in self.running if r._cancelled], events)
        if self.running:
            last = torch.tensor([[r.tokens[-1]] for r in self.running], dtype=torch.long, device=self.device)
            out = self.model(last, use_cache=True, cache=self.cache)
            self.cache = out.cache
            self._advance(self.running, out.logits[:, -1], events)
            self._leave([r for r in self.running if r.done], events)
        self._admit(events)
        return events

    def run(self) -> None:
        """Step until every submitted request has ended."""
        while self.has_work:
            self.step()

    def _advance(self, requests: list[Request], logits: Tensor, events: list) -> None:
        """Choose each request's next token from its row of ``logits`` (R, V), with its own options."""
        greedy = logits.argmax(-1).tolist()  # one call for every row; sampled rows draw below
        for row, request in enumerate(requests):
            options = request.options
            token = greedy[row]
            if options.temperature:
                token = int(sample_next(logits[row:row + 1], temperature=options.temperature, top_k=options.top_k,
                                        top_p=options.top_p, generator=request.generator))
            request.tokens.append(token)
            events.append((request, token))
            if token in options.stop_tokens:
                request.finish_reason = "stop"
            elif len(request.tokens) == options.max_new_tokens or (
                    self.limit is not None and len(request.prompt) + len(request.tokens) >= self.limit):
                request.finish_reason = "length"

    def _leave(self, leaving: list[Request], events: list) -> None:
        """Take these requests' rows out of the batch."""
        if not leaving:
            return
        for request in leaving:
            if not request.done:
                request.finish_reason = "cancelled"
                events.append((request, None))
        kept = [row for row, r in enumerate(self.running) if r not in leaving]
        self.running = [self.running[row] for row in kept]
        if not kept:
            self.cache = None
            return
        assert self.cache is not None
        self.cache.reorder(torch.tensor(kept, device=self.device))
        self.cache.drop_padding()

    def _admit(self, events: list) -> None:
        joining: list[TransformerCache] = []
        while len(self.running) < self.max_batch:
            with self._lock:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            if request._cancelled or request.options.max_new_tokens == 0:
                request.finish_reason = "cancelled" if request._cancelled else "length"
                events.append((request, None))
                continue
            cache, logits = self._prefill(request)
            self._advance([request], logits, events)
            if not request.done:
                self.running.append(request)
                joining.append(cache)
        if joining:
            caches = ([self.cache] if self.cache is not None else []) + joining
            self.cache = caches[0] if len(caches) == 1 else TransformerCache.join(caches)

    def _prefill(self, request: Request) -> tuple[TransformerCache, Tensor]:
        """The request's cache after its prompt, and the (1, V) logits of its first new token. With a prefix
        cache: resume from the longest stored prefix, and store the state at each block boundary passed."""
        prompt, start, cache = request.prompt, 0, None
        ends = [len(prompt)]
        if self.prefix_cache is not None:
            start, cache = self.prefix_cache.longest(prompt)
            block = self.prefix_cache.block
            ends = list(range((start // block + 1) * block, len(prompt), block)) + ends
        request.cached_prompt_tokens = start
        for end in ends:
            ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=self.device)
            out = self.model(ids, use_cache=True, cache=cache, logits_to_keep=1)
            cache = out.cache
            if end < len(prompt):
                assert self.prefix_cache is not None
                self.prefix_cache.store(prompt[:end], cache)
            start = end
        return cache, out.logits[:, -1]
