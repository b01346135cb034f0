"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes ``lookahead``
tokens, the target scores them all in one call, and a rejection rule keeps the target's distribution exactly.

Per round, with q_i the draft's and p_i the target's next-token distributions (after the same temperature,
top-k and top-p), draft token d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first
rejection a token is drawn from the residual norm(max(0, p_i − q_i)) and the round ends; if every draft is
accepted, one more token comes from p_(k+1). Greedy decoding (temperature 0) accepts d_i exactly when it is
the target's argmax, so the output is the target's own greedy output. Each sample follows the target's
distribution exactly, whatever the draft.

State: both models keep an invariant — their cache holds every token emitted so far except the last — and
after a round each is rolled back past the first rejection: attention caches by ``truncate`` (exact, no
recomputation), any other state (retention, the delta rule, Mamba-2, hybrids, S2) by restoring the snapshot
taken before the round and feeding the accepted tokens again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from scaleformer.sampling import filter_top_k, filter_top_p

__all__ = ["SpeculativeStats", "speculative_generate", "next_token_probs"]


@dataclass
class SpeculativeStats:
    """What a speculative run did: tokens drafted and accepted, rounds, and the target's forward calls."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_calls: int = 0
    draft_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per target verification: accepted drafts plus the round's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def next_token_probs(logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """(…, V) logits -> the distribution ``sample_next`` draws from (float64; one-hot argmax when greedy)."""
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    logits = logits.double() / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    return torch.softmax(logits, dim=-1)


class _Decoder:
    """One model's side: its cache (holding every emitted token but the last), how many emitted tokens it
    holds, and the rollback to a snapshot."""

    def __init__(self, model: nn.Module, stats: SpeculativeStats, counter: str):
        self.model, self.cache, self.fed, self.stats, self.counter = model, None, 0, stats, counter

    def feed(self, ids: Tensor) -> Tensor:
        """Append ``ids`` (1, T) to the cache; the (T, V) logits after each."""
        out = self.model(ids, cache=self.cache, use_cache=True)
        self.cache = out.cache
        setattr(self.stats, self.counter, getattr(self.stats, self.counter) + 1)
        return out.logits[0]

    def rewind(self, snapshot: Any, keep: Tensor) -> None:
        """Back to ``snapshot`` (None: an empty cache) plus the tokens ``keep`` (1, n) fed after it."""
        length = 0 if snapshot is None else snapshot.length
        try:  # attention: drop the rejected slots, nothing recomputed
            self.cache.truncate(length + keep.shape[1])
            return
        except ValueError:
            pass
        if snapshot is None:
            self.cache = None
        else:
            self.cache.restore(snapshot)
        if keep.shape[1]:
            self.feed(keep)


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: Tensor, max_new_tokens: int, *,
                         lookahead: int = 4, temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, stop_tokens: int | Sequence[int] | None = None,
                         generator: torch.Generator | None = None,
                         stats: SpeculativeStats | None = None) -> tuple[Tensor, SpeculativeStats]:
    """Continue one prompt ``input_ids`` (1, T) by up to ``max_new_tokens`` tokens drawn from ``target``'s
    distribution, ``draft`` proposing ``lookahead`` tokens a round. Returns the (1, T + n) ids and the run's
    :class:`SpeculativeStats` (``stats``, when given, is filled and returned)."""
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate takes one prompt (1, T), got {tuple(input_ids.shape)}")
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) is not the target's ({vocab}): "
                         "speculative decoding needs one tokenizer")
    stops = set([stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens or []))
    stats = stats if stats is not None else SpeculativeStats()
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    big, small = _Decoder(target, stats, "target_calls"), _Decoder(draft, stats, "draft_calls")
    emitted = input_ids[0].tolist()
    new = 0

    def draw(probs: Tensor) -> int:
        return int(torch.multinomial(probs.float(), 1, generator=generator)) if temperature else int(probs.argmax())

    def uniform() -> float:
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    while new < max_new_tokens:
        k = min(lookahead, max_new_tokens - new)  # never draft past the budget
        device = input_ids.device
        as_ids = lambda tokens: torch.tensor([tokens], dtype=torch.long, device=device)  # noqa: E731
        # the draft proposes k tokens, starting from what it has not seen yet (the last emitted token at least)
        draft_snapshot = None if small.cache is None else small.cache.snapshot()
        draft_base = small.fed
        logits = small.feed(as_ids(emitted[small.fed:]))[-1]
        proposals, q = [], []
        for i in range(k):
            q.append(next_token_probs(logits, **options))
            proposals.append(draw(q[-1]))
            if i + 1 < k:
                logits = small.feed(as_ids(proposals[-1:]))[-1]
        # the target scores them in one call: p_1 … p_(k+1)
        target_snapshot = None if big.cache is None else big.cache.snapshot()
        target_base = big.fed
        unseen = emitted[big.fed:]
        scores = big.feed(as_ids(unseen + proposals))[len(unseen) - 1:]
        p = next_token_probs(scores, **options)
        accepted = 0
        for i, token in enumerate(proposals):
            if temperature == 0.0:
                keep = bool(p[i, token] == 1.0)
            else:
                keep = uniform() < float(p[i, token] / q[i][token])
            if not keep:
                break
            accepted += 1
        if accepted < k:  # the first rejection: the residual distribution (the target's argmax when greedy)
            residual = (p[accepted] - q[accepted]).clamp(min=0)
            final = draw(residual / residual.sum() if float(residual.sum()) > 0 else p[accepted])
        else:
            final = draw(p[k])
        stats.drafted, stats.accepted, stats.rounds = stats.drafted + k, stats.accepted + accepted, stats.rounds + 1
        round_tokens = proposals[:accepted] + [final]
        # roll both caches back to every emitted token but the last (the round's final token stays unseen)
        big.rewind(target_snapshot, as_ids(unseen + proposals[:accepted]))
        big.fed = target_base + len(unseen) + accepted
        drafted_seen = emitted[draft_base:] + proposals[:k - 1]  # what the draft was fed this round
        keep_draft = len(emitted) - draft_base + min(accepted, k - 1)
        small.rewind(draft_snapshot, as_ids(drafted_seen[:keep_draft]))
        small.fed = draft_base + keep_draft
        for token in round_tokens:
            emitted.append(token)
            new += 1
            if token in stops or new == max_new_tokens:
                return torch.tensor([emitted], dtype=torch.long, device=input_ids.device), stats
    return torch.tensor([emitted], dtype=torch.long, device=input_ids.device), stats
