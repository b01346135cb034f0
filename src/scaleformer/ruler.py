"""RULER-style long-context tasks (Hsieh et al. 2024, NVIDIA/RULER), generated offline, deterministic for a seed.

Each sample is a prompt, the strings a correct answer contains, and how many tokens to generate; a model
is scored as RULER scores it (:func:`string_match_all`: the share of the reference strings found,
case-insensitively, in the greedy continuation, averaged over samples, ×100). The tasks:

* **NIAH** (needle in a haystack), RULER's eight configurations (:data:`NIAH`): needles "One of the
  special magic {numbers|uuids} for {key} is: {value}." hidden in a haystack — ``noise`` (the repeated
  sentences "The grass is green. …"), ``needle`` (decoy needles with other keys) or ``essay``; k needles
  of which q are asked, each with v values; single, multi-key, multi-value and multi-query.
* **vt** (variable tracking): a chain "VAR X0 = n", "VAR X1 = VAR X0", … (4 hops, 5-letter names) spread
  through the noise haystack; asked which variables hold n, the answer is all five names.
* **cwe** (common words extraction): a numbered list where 10 words occur 30 times each and the others 3
  times (6 and 1 when 300 entries would take more than a quarter of the length, RULER's switch at 4096
  BPE tokens); asked for the 10 most common.
* **fwe** (frequent words extraction): coded words drawn by a Zipf law (α = 2); asked for the 3 most
  frequent.

Where this departs from RULER, because nothing may be downloaded: the ``essay`` haystack is the built-in
corpus (text shipped with Python), not Paul Graham's essays; keys and common words come from word lists
written here (:data:`ADJECTIVES`, :data:`NOUNS`), not the wonderwords package; vt and cwe are given no
one-shot example. Lengths count the tokens of the tokenizer given (bytes by default): the haystack is
sized by binary search so that prompt + generated tokens fit the length, as RULER sizes it.
"""

from __future__ import annotations

import collections
import functools
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Sample", "NIAH", "TASKS", "generate", "string_match_all", "answer_text", "token_counter", "continuations",
           "training_batch", "ADJECTIVES", "NOUNS"]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "dusty", "eager", "early",
              "fancy", "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lonely",
              "lucky", "mellow", "misty", "narrow", "noble", "odd", "pale", "proud", "quiet", "rapid",
              "rustic", "shiny", "silent", "silver", "sleepy", "smooth", "sturdy", "swift", "tender", "vivid")
NOUNS = ("anchor", "badger", "basket", "beacon", "candle", "canyon", "castle", "comet", "cottage", "falcon",
         "feather", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern", "meadow",
         "mirror", "needle", "orchard", "otter", "paddle", "pebble", "pillow", "puzzle", "quarry", "rabbit",
         "saddle", "shovel", "spider", "teapot", "thistle", "tunnel", "violin", "walnut", "whistle", "window")


@dataclass(frozen=True)
class Sample:
    """One example: the prompt (ending where the answer begins), the strings a right answer contains, and
    the tokens to generate for it."""

    prompt: str
    answers: tuple[str, ...]
    generate: int


def answer_text(answers: Sequence[str]) -> str:
    """The continuation that answers a sample: its answers after a space, comma-separated, with a full stop.
    RULER scores any text containing the answers; this is what a model trained on a task is taught."""
    return " " + ", ".join(answers) + "."


def _room(ruler_tokens: int, answers: Sequence[str], count_tokens: Callable[[str], int]) -> int:
    """The tokens to generate: RULER's number (set for BPE tokens), or more where spelling the answers takes
    more in this tokenizer (a byte tokenizer needs 36 for one uuid, where RULER gives 32). ``count_tokens``
    counts a start token too, so one token is spare."""
    return max(ruler_tokens, count_tokens(answer_text(answers)))


@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "noise", "needle" or "essay"
    key: str  # "words" or "uuids"
    value: str  # "numbers" or "uuids"
    keys: int = 1  # k: needles with distinct keys
    values: int = 1  # v: values per key
    queries: int = 1  # q: keys asked


#: RULER's eight NIAH configurations (scripts/synthetic.yaml)
NIAH = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", queries=4),
}


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _value(kind: str, rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1)) if kind == "numbers" else _uuid(rng)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


@functools.lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    from scaleformer.data.corpus import builtin_corpus

    return tuple(builtin_corpus().text.split())


def _fit(build: Callable[[int], str], generate: int, length: int, count_tokens: Callable[[str], int],
         most: int) -> str:
    """The prompt of the largest haystack size in [0, most] whose tokens plus ``generate`` fit ``length``
    (binary search, as RULER sizes its haystacks); an error when even an empty haystack does not fit."""
    if count_tokens(build(0)) + generate > length:
        raise ValueError(f"length {length} cannot hold even the needles, the question and {generate} answer tokens")
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(build(middle)) + generate <= length:
            low = middle
        else:
            high = middle - 1
    return build(low)


def _insert(sentences: list[str], lines: list[str], rng: random.Random, depths: Sequence[float] | None) -> str:
    """``lines`` placed between ``sentences`` in order: at random distinct sentence indices, or at ``depths``
    (fractions of the text, at sentence boundaries)."""
    if depths is None:
        places = sorted(rng.sample(range(len(sentences) + 1), len(lines))) if len(sentences) + 1 >= len(lines) \
            else [len(sentences)] * len(lines)
    else:
        places = sorted(round(d * len(sentences)) for d in depths)
    out, previous = [], 0
    for place, line in zip(places, lines):
        out += sentences[previous:place] + [line]
        previous = place
    return " ".join(out + sentences[previous:])


def niah(config: NiahConfig, length: int, rng: random.Random, count_tokens: Callable[[str], int]) -> Sample:
    """One NIAH sample of ``config`` fitting ``length`` tokens."""
    keys: list[str] = []
    while len(keys) < max(config.keys, config.queries):
        key = _word_key(rng) if config.key == "words" else _uuid(rng)
        if key not in keys:
            keys.append(key)
    values = [[_value(config.value, rng) for _ in range(config.values)] for _ in keys]
    asked = rng.sample(range(len(keys)), config.queries)
    kind = config.value
    needles = [f"One of the special magic {kind} for {key} is: {value}." for key, vs in zip(keys, values) for value in vs]
    rng.shuffle(needles)
    queried = ", ".join(keys[i] for i in asked)
    question = (f"\nWhat are all the special magic {kind} for {queried} mentioned in the provided text?"
                f" The special magic {kind} for {queried} mentioned in the provided text are")
    answers = tuple(value for i in asked for value in values[i])
    state = rng.getstate()
    if config.haystack == "essay":  # sized in words (as RULER sizes its essays), cut into sentences
        words = _essay_words()
        start = rng.randrange(max(1, len(words) - 20000))
        depths = [rng.choice([i / 39 for i in range(40)]) for _ in needles]
        sentences = lambda size: _sentences(" ".join(words[start:start + size]))  # noqa: E731
    elif config.haystack == "noise":
        pool, depths = _sentences(NOISE), None
        sentences = lambda size: (pool * (size // len(pool) + 1))[:size]  # noqa: E731
    else:  # decoy needles: other keys, other values
        decoys = []
        while len(decoys) < 20000:
            key = _word_key(rng) if config.key == "words" else _uuid(rng)
            if key not in keys:
                decoys.append(f"One of the special magic {kind} for {key} is: {_value(kind, rng)}.")
        depths = None
        sentences = lambda size: decoys[:size]  # noqa: E731

    def build(size: int) -> str:
        rng.setstate(state)  # every size places the needles by the same draws
        return "Some special magic numbers are hidden within the following text. Make sure to memorize it. " \
               + _insert(sentences(size), needles, rng, depths) + question

    generate = _room(32 * len(answers) if kind == "uuids" else 12 * len(answers), answers, count_tokens)
    return Sample(_fit(build, generate, length, count_tokens, 20000), answers, generate)


def variable_tracking(length: int, rng: random.Random, count_tokens: Callable[[str], int],
                      hops: int = 4) -> Sample:
    """One vt sample: a chain of ``hops`` + 1 variables holding one 5-digit number, spread through noise."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99999)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(hops)]
    question = (f"\nFind all variables that are assigned the value {value} in the text above. Answer: According "
                f"to the chain of variable assignment in the text above, {hops + 1} variables are assigned the "
                f"value {value}, they are:")
    pool = _sentences(NOISE)
    state = rng.getstate()

    def build(size: int) -> str:
        rng.setstate(state)
        return _insert((pool * (size // len(pool) + 1))[:size], chain, rng, None) + question

    generate = _room(30, names, count_tokens)
    return Sample(_fit(build, generate, length, count_tokens, 20000), tuple(names), generate)


def common_words(length: int, rng: random.Random, count_tokens: Callable[[str], int], common: int = 10) -> Sample:
    """One cwe sample: ``common`` words repeated 30 times (6 below 4096 tokens), the rest 3 times (1)."""
    pool = [f"{a}{n}" for a in ADJECTIVES for n in NOUNS]  # 1600 words, none a substring of another's answer
    rng.shuffle(pool)
    # RULER repeats 30/3 from 4096 tokens and 6/1 below, when a list entry is two or three BPE tokens: there the
    # common words' 300 entries take at most about a quarter of the length. In any tokenizer's units, the same
    # share decides here (a byte tokenizer's entries are ~15 tokens each).
    entries = count_tokens(" ".join(f"{i + 1}. {w}" for i, w in enumerate(pool[:common] * 30)))
    often, rarely = (30, 3) if entries <= length / 4 else (6, 1)
    state = rng.getstate()

    def build(size: int) -> str:
        rng.setstate(state)
        words = pool[:common] * often + [w for w in pool[common:common + size] for _ in range(rarely)]
        rng.shuffle(words)
        listed = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return (f"Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                f"the ones that appear most often.\n{listed}\nQuestion: What are the {common} most common words in "
                f"the above list? Answer: The top {common} words that appear most often in the list are:")

    generate = _room(120, pool[:common], count_tokens)
    return Sample(_fit(build, generate, length, count_tokens, len(pool) - common), tuple(pool[:common]), generate)


def frequent_words(length: int, rng: random.Random, count_tokens: Callable[[str], int], alpha: float = 2.0,
                   top: int = 3) -> Sample:
    """One fwe sample: coded words drawn with P(rank r) ∝ r^−α; the answer is the ``top`` most frequent (the
    draw is repeated until they are strictly the most frequent, so the answer is unique)."""
    vocabulary: list[str] = []
    while len(vocabulary) < 200:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
        if word not in vocabulary:
            vocabulary.append(word)
    weights = [(rank + 1) ** -alpha for rank in range(len(vocabulary))]
    state = rng.getstate()
    answer: list[str] = []

    def build(size: int) -> str:
        nonlocal answer
        rng.setstate(state)
        while True:
            words = rng.choices(vocabulary, weights, k=max(size, top * 4))
            counts = sorted(((n, w) for w, n in collections.Counter(words).items()), reverse=True)
            if len(counts) > top and counts[top - 1][0] > counts[top][0]:
                break
        answer = [w for _, w in counts[:top]]
        return ("Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words.\n{' '.join(words)}\nQuestion: Do not provide any explanation. "
                "What are the three most frequently appeared words in the above coded text? Answer: According to "
                "the coded text above, the three most frequently appeared words are:")

    generate = _room(50, ["x" * 6] * top, count_tokens)  # every coded word is 6 letters
    prompt = _fit(build, generate, length, count_tokens, 20000)
    return Sample(prompt, tuple(answer), generate)


TASKS: dict[str, Callable[[int, random.Random, Callable[[str], int]], Sample]] = {
    **{name: (lambda config: lambda length, rng, count: niah(config, length, rng, count))(config)
       for name, config in NIAH.items()},
    "vt": variable_tracking,
    "cwe": common_words,
    "fwe": frequent_words,
}


def generate(task: str, count: int, length: int, *, seed: int = 0,
             count_tokens: Callable[[str], int] | None = None) -> list[Sample]:
    """``count`` samples of ``task`` (a name of :data:`TASKS`) of at most ``length`` tokens (bytes unless
    ``count_tokens`` counts another tokenizer's), the same for a seed."""
    from scaleformer.config import ConfigError, closest_match

    if task not in TASKS:
        raise ConfigError(f"unknown RULER task {task!r}{closest_match(task, TASKS)}; tasks: {', '.join(TASKS)}")
    count_tokens = count_tokens or (lambda text: len(text.encode("utf-8")) + 1)  # + BOS
    rng = random.Random(f"{task}/{length}/{seed}")
    return [TASKS[task](length, rng, count_tokens) for _ in range(count)]


def string_match_all(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's score: the mean over samples of the share of reference strings found (case-insensitive
    substrings) in the output, ×100."""
    if len(outputs) != len(references) or not outputs:
        raise ValueError("string_match_all needs one output per sample, and at least one sample")
    shares = [sum(r.lower() in out.lower() for r in refs) / len(refs) for out, refs in zip(outputs, references)]
    return 100 * sum(shares) / len(shares)


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """How many tokens a prompt takes in ``tokenizer``, as it is fed (with the byte tokenizer's start token)."""
    from scaleformer.serve import encode_prompt

    return lambda text: len(encode_prompt(tokenizer, text))


def continuations(model: Any, samples: Sequence[Sample], tokenizer: Any) -> list[str]:
    """Each sample's greedy continuation (``sample.generate`` tokens), decoded: what RULER scores."""
    import torch

    from scaleformer.generation import generate
    from scaleformer.serve import encode_prompt

    device = next(model.parameters()).device
    outputs = []
    for sample in samples:
        ids = torch.tensor([encode_prompt(tokenizer, sample.prompt)], device=device)
        outputs.append(tokenizer.decode(generate(model, ids, sample.generate)[0, ids.shape[1]:].tolist()))
    return outputs


def training_batch(samples: Sequence[Sample], tokenizer: Any, length: int, *,
                   answer_only: bool = True) -> tuple[Any, Any]:
    """Samples as a batch to train on (inputs, targets), rows of ``length`` tokens: each prompt followed by
    :func:`answer_text` and an end token. Only the answer and the end token are targets (-100 elsewhere, and
    over the padding), so a model learns the task, not its haystack; ``answer_only=False`` makes every
    token of the prompt a target too (language modelling on the haystack, whose repeats teach copying)."""
    import torch

    from scaleformer.serve import encode_prompt

    pad = getattr(tokenizer, "pad_id", tokenizer.eos_id)
    inputs = torch.full((len(samples), length), pad, dtype=torch.long)
    targets = torch.full((len(samples), length), -100, dtype=torch.long)
    for row, sample in enumerate(samples):
        prompt = encode_prompt(tokenizer, sample.prompt)
        ids = prompt + tokenizer.encode(answer_text(sample.answers)) + [tokenizer.eos_id]
        if len(ids) - 1 > length:
            raise ValueError(f"a sample takes {len(ids) - 1} tokens with its answer: more than the rows' {length}")
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        first = len(prompt) - 1 if answer_only else 0
        targets[row, first:len(ids) - 1] = torch.tensor(ids[first + 1:])
    return inputs, targets
