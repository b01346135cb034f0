"""Synthetic recall and long-context tasks, generated offline, deterministic for a seed.

Every task returns a :class:`TaskBatch`: ``inputs`` (N, T) token ids and ``labels`` (N, T), where
``labels[n, t]`` is the token a causal model must predict from ``inputs[n, :t + 1]`` (what its logits at
position t are scored against) and ``IGNORE`` (-100) where nothing is asked. Training puts the loss only on
labelled positions; :func:`accuracy` counts them (per labelled token, or per example when every answer
token must be right), with a 95% Wilson interval.

* :func:`mqar` — multi-query associative recall (Zoology, arXiv 2312.04927).
* :func:`selective_copying` — Mamba §4.1 (arXiv 2312.00752).
* :func:`passkey` — a 5-digit key hidden at a chosen depth in filler text (Landmark Attention).
* :func:`multi_needle` — several keyed numbers hidden in the built-in corpus, each asked for at the end.

The text tasks are built in bytes (the byte tokenizer), so they need no trained tokenizer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from scaleformer.data.tokenizer import ByteTokenizer

__all__ = ["IGNORE", "TaskBatch", "Accuracy", "mqar", "selective_copying", "passkey", "multi_needle", "TASKS",
           "make_task", "accuracy", "wilson_interval"]

IGNORE = -100


@dataclass(frozen=True)
class TaskBatch:
    inputs: Tensor  # (N, T) long
    labels: Tensor  # (N, T) long: the token to predict at each position, IGNORE where nothing is asked
    exact: bool = False  # accuracy per example (all its answer tokens right) rather than per answer token
    vocab_size: int = 0  # the smallest vocabulary that holds every id of the task


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct(count: int, low: int, high: int, size: int, generator: torch.Generator) -> Tensor:
    """(count, size) ids drawn without replacement from [low, high) per row."""
    weights = torch.ones(count, high - low)
    return torch.multinomial(weights, size, replacement=False, generator=generator) + low


def mqar(count: int, *, vocab_size: int = 8192, length: int = 64, pairs: int = 8, power_a: float = 0.01,
         seed: int = 0, random_filler: bool = True) -> TaskBatch:
    """Multi-query associative recall, as Zoology defines it.

    ``pairs`` keys (distinct, from [1, V/2)) each followed by its value (distinct, from [V/2, V)) fill the
    first 2·pairs positions. Each key is asked again at position 2·pairs + 2·g, where the gaps g are drawn
    without replacement from [0, (T - 2·pairs) / 2) with P(g) ∝ (g + 1)^(power_a - 1) — a power law: most
    queries come soon after the pairs, some much later. The label at a query is its key's value; every
    other position holds a random token in [0, V) and no label (``random_filler`` False: token 0, as in
    Zoology's Figure 2, whose configs set ``random_non_queries=False``).
    """
    space = (length - 2 * pairs) // 2
    if pairs < 1 or space < pairs:
        raise ValueError(f"mqar: {pairs} pairs and their queries need length >= 4·pairs, got length {length}")
    if vocab_size // 2 - 1 < pairs:
        raise ValueError(f"mqar: vocab_size {vocab_size} holds fewer than {pairs} distinct keys in [1, V/2)")
    if not 0 < power_a <= 1:
        raise ValueError(f"mqar: power_a must be in (0, 1], got {power_a}")
    generator = _generator(seed)
    keys = _distinct(count, 1, vocab_size // 2, pairs, generator)
    values = _distinct(count, vocab_size // 2, vocab_size, pairs, generator)
    law = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(law.expand(count, space), pairs, replacement=False, generator=generator)
    inputs = (torch.randint(0, vocab_size, (count, length), generator=generator) if random_filler
              else torch.zeros(count, length, dtype=torch.long))
    inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2] = keys, values
    queries = 2 * pairs + 2 * gaps
    inputs.scatter_(1, queries, keys)
    labels = torch.full_like(inputs, IGNORE).scatter_(1, queries, values)
    return TaskBatch(inputs, labels, vocab_size=vocab_size)


def selective_copying(count: int, *, vocab_size: int = 18, length: int = 256, tokens: int = 16,
                      seed: int = 0) -> TaskBatch:
    """Selective copying, as Mamba §4.1 defines it: ``tokens`` data tokens at random positions of a
    ``length``-long region of noise, then ``tokens`` markers; at the i-th marker the model must output the
    i-th data token (in order of position). Id 0 is noise, ``vocab_size - 1`` the marker, data tokens are
    [1, vocab_size - 1). The inputs are ``length + tokens`` long."""
    if vocab_size < 3:
        raise ValueError("selective_copying: vocab_size needs noise, a marker and at least one data token (>= 3)")
    if not 1 <= tokens <= length:
        raise ValueError(f"selective_copying: {tokens} tokens do not fit a region of {length}")
    generator = _generator(seed)
    data = torch.randint(1, vocab_size - 1, (count, tokens), generator=generator)
    where = torch.multinomial(torch.ones(count, length), tokens, replacement=False, generator=generator).sort(1).values
    region = torch.zeros(count, length, dtype=torch.long).scatter_(1, where, data)
    inputs = torch.cat([region, torch.full((count, tokens), vocab_size - 1)], 1)
    labels = torch.full_like(inputs, IGNORE)
    labels[:, length:] = data
    return TaskBatch(inputs, labels, vocab_size=vocab_size)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_BYTES = ByteTokenizer()


def _text_example(haystack: list[int], inserts: list[tuple[float, list[int]]], tail: list[int],
                  answers: list[tuple[int, int]], length: int) -> tuple[list[int], list[int]]:
    """Inputs and labels of one text example of ``length`` tokens: the haystack cut to fit, each insert
    placed at its depth (a fraction of the haystack), then ``tail``; ``answers`` (start, end) spans of the
    tail are labelled (each token predicted from the one before it)."""
    room = length - len(tail) - sum(len(ids) for _, ids in inserts)
    if room < 0:
        raise ValueError(f"length {length} cannot hold the needles and the question ({length - room} tokens)")
    ids = list(haystack[:room])
    for depth, insert in sorted(inserts, key=lambda item: -item[0]):  # deepest first: earlier cuts stay valid
        cut = round(depth * room)
        ids[cut:cut] = insert
    start = len(ids)
    ids += tail
    labels = [IGNORE] * length
    for first, end in answers:
        for t in range(start + first, start + end):
            labels[t - 1] = ids[t]
    return ids, labels


def passkey(count: int, *, length: int = 512, depth: float | None = None, seed: int = 0) -> TaskBatch:
    """Passkey retrieval: "The pass key is NNNNN. Remember it. NNNNN is the pass key." hidden at ``depth``
    (0 = the start, 1 = the end; None: uniform per example) in repeated filler sentences, then "What is the
    pass key? The pass key is NNNNN". The five digits of the answer are labelled; an example counts as
    right only when all five are. Byte ids (vocabulary 259); ``length`` tokens per example."""
    generator = _generator(seed)
    keys = torch.randint(10000, 100000, (count,), generator=generator).tolist()
    depths = torch.rand(count, generator=generator).tolist() if depth is None else [float(depth)] * count
    if not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"passkey: depth must be in [0, 1], got {depth}")
    haystack = _BYTES.encode(FILLER * (length // len(FILLER) + 1))
    rows = []
    for key, where in zip(keys, depths):
        needle = _BYTES.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
        question = _BYTES.encode("\nWhat is the pass key? The pass key is ")
        rows.append(_text_example(haystack, [(where, needle)], question + _BYTES.encode(str(key)),
                                  [(len(question), len(question) + 5)], length))
    return _stack(rows, exact=True, vocab_size=_BYTES.vocab_size)


NAMES = ("apple", "river", "stone", "cloud", "tiger", "maple", "ember", "coral", "lemon", "orbit", "cedar", "frost")


def multi_needle(count: int, *, length: int = 1024, needles: int = 4, seed: int = 0,
                 haystack: str | None = None) -> TaskBatch:
    """Multi-needle retrieval: ``needles`` sentences "The secret number of NAME is NNNNN." at random depths
    of a window of the built-in corpus (or ``haystack``), then each asked for in a random order: "The
    secret number of NAME is NNNNN." Every answer's digits are labelled; an example counts as right only
    when every needle is retrieved. Byte ids (vocabulary 259)."""
    if not 1 <= needles <= len(NAMES):
        raise ValueError(f"multi_needle: needles must be in [1, {len(NAMES)}], got {needles}")
    if haystack is None:
        from scaleformer.data.corpus import builtin_corpus

        haystack = builtin_corpus().text
    corpus = _BYTES.encode(haystack)
    if len(corpus) < length:
        raise ValueError(f"multi_needle: the haystack has {len(corpus)} bytes, fewer than length {length}")
    generator = _generator(seed)
    rows = []
    for _ in range(count):
        start = int(torch.randint(0, len(corpus) - length + 1, (1,), generator=generator))
        names = [NAMES[i] for i in torch.randperm(len(NAMES), generator=generator)[:needles].tolist()]
        numbers = torch.randint(10000, 100000, (needles,), generator=generator).tolist()
        depths = torch.rand(needles, generator=generator).tolist()
        inserts = [(d, _BYTES.encode(f" The secret number of {n} is {x}. ")) for d, n, x in zip(depths, names, numbers)]
        tail, answers = [], []
        for i in torch.randperm(needles, generator=generator).tolist():
            question = _BYTES.encode(f" The secret number of {names[i]} is ")
            answers.append((len(tail) + len(question), len(tail) + len(question) + 5))
            tail += question + _BYTES.encode(f"{numbers[i]}.")
        rows.append(_text_example(corpus[start:start + length], inserts, tail, answers, length))
    return _stack(rows, exact=True, vocab_size=_BYTES.vocab_size)


def _stack(rows: list[tuple[list[int], list[int]]], *, exact: bool, vocab_size: int) -> TaskBatch:
    return TaskBatch(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]), exact=exact,
                     vocab_size=vocab_size)


TASKS: dict[str, Callable[..., TaskBatch]] = {"mqar": mqar, "selective_copying": selective_copying,
                                              "passkey": passkey, "multi_needle": multi_needle}


def make_task(name: str, count: int, *, seed: int, **options: Any) -> TaskBatch:
    """``count`` examples of task ``name`` (see TASKS) with its ``options``; a one-line error otherwise."""
    from scaleformer.config import ConfigError, closest_match

    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}{closest_match(name, TASKS)}; tasks: {', '.join(TASKS)}")
    for key, value in options.items():  # sizes are bounded before anything is drawn (some draw count x V)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= MAX_TASK_SIZE:
            raise ConfigError(f"task {name}: {key}={value} is beyond {MAX_TASK_SIZE:,}, the bound on any task option")
    return TASKS[name](count, seed=seed, **options)


#: the largest value any task option (a vocabulary, a length, a count) may take: 2^20
MAX_TASK_SIZE = 1 << 20


def null_accuracy(name: str, options: dict[str, Any]) -> tuple[float, str]:
    """(accuracy, why): what a model reaches on task ``name`` without having learned it, so that a result
    inside this level is no finding. MQAR: answering with any value of the context is right once in
    ``pairs`` (the plateau models sit on before they learn recall); selective copying: any data token of
    the row, once in ``tokens``; passkey and multi-needle score whole examples, guessed at 10^-5 or less."""
    defaults = {key: param.default for key, param in inspect.signature(TASKS[name]).parameters.items()
                if param.default is not inspect.Parameter.empty}
    value = {**defaults, **options}
    if name == "mqar":
        return max(1 / value["pairs"], 2 / value["vocab_size"]), f"1/{value['pairs']}: any value from the context"
    if name == "selective_copying":
        return max(1 / value["tokens"], 1 / (value["vocab_size"] - 2)), f"1/{value['tokens']}: any data token of the row"
    return 1e-5, "a guessed five-digit number"



@dataclass(frozen=True)
class Accuracy:
    correct: int
    total: int
    low: float  # 95% Wilson interval
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{self.value:.3f} ({self.correct}/{self.total}; 95% CI {self.low:.3f}–{self.high:.3f})"


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sound at 0 and at 1, unlike the normal one;
    :func:`scaleformer.stats.wilson_interval`); (0, 1) when nothing was counted."""
    from scaleformer.stats import wilson_interval as interval

    if total == 0:
        return 0.0, 1.0
    found = interval(correct, total)
    return found.low, found.high


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: TaskBatch, *, batch_size: int = 32) -> Accuracy:
    """Greedy accuracy of a causal model on ``batch``: per labelled token, or per example when exact."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for start in range(0, batch.inputs.shape[0], batch_size):
        inputs = batch.inputs[start:start + batch_size].to(device)
        labels = batch.labels[start:start + batch_size].to(device)
        asked = labels != IGNORE
        right = (model(inputs).logits.argmax(-1) == labels) | ~asked
        if batch.exact:
            correct, total = correct + int(right.all(1).sum()), total + inputs.shape[0]
        else:
            correct, total = correct + int((right & asked).sum()), total + int(asked.sum())
    model.train(was_training)
    return Accuracy(correct, total, *wilson_interval(correct, total))
