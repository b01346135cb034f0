"""The synthetic tasks against their definitions, and the accuracy they are scored with."""

import math

import pytest
import torch

from scaleformer.data.tokenizer import ByteTokenizer
from scaleformer.tasks import (IGNORE, TaskBatch, accuracy, make_task, mqar, multi_needle, passkey, selective_copying,
                               wilson_interval)

BYTES = ByteTokenizer()


def test_mqar_is_zoologys_definition():
    vocab, length, pairs = 64, 48, 6
    batch = mqar(200, vocab_size=vocab, length=length, pairs=pairs, seed=3)
    assert batch.inputs.shape == batch.labels.shape == (200, length)
    for inputs, labels in zip(batch.inputs, batch.labels):
        keys, values = inputs[0:2 * pairs:2], inputs[1:2 * pairs:2]
        assert keys.unique().numel() == pairs and values.unique().numel() == pairs
        assert bool(((1 <= keys) & (keys < vocab // 2)).all()) and bool(((vocab // 2 <= values) & (values < vocab)).all())
        asked = (labels != IGNORE).nonzero()[:, 0]
        assert asked.numel() == pairs and bool((asked >= 2 * pairs).all()) and bool(((asked - 2 * pairs) % 2 == 0).all())
        for position in asked.tolist():  # the query is a key; its label that key's value
            key = inputs[position]
            assert labels[position] == values[(keys == key).nonzero()[0, 0]]
        assert bool(((0 <= inputs) & (inputs < vocab)).all())
    again = mqar(200, vocab_size=vocab, length=length, pairs=pairs, seed=3)
    assert torch.equal(again.inputs, batch.inputs) and torch.equal(again.labels, batch.labels)
    assert not torch.equal(mqar(200, vocab_size=vocab, length=length, pairs=pairs, seed=4).inputs, batch.inputs)


def test_mqar_gaps_follow_the_power_law():
    """With one pair each gap is a single draw: its frequencies are P(g) ∝ (g + 1)^(a - 1)."""
    length, a, n = 42, 0.01, 20000
    batch = mqar(n, vocab_size=64, length=length, pairs=1, power_a=a, seed=0)
    gaps = ((batch.labels != IGNORE).nonzero()[:, 1] - 2) // 2
    space = (length - 2) // 2
    law = torch.arange(1, space + 1, dtype=torch.float64) ** (a - 1)
    law /= law.sum()
    counts = torch.bincount(gaps, minlength=space).double()
    for g in (0, 1, 5, space - 1):
        sigma = math.sqrt(n * law[g] * (1 - law[g]))
        assert abs(counts[g] - n * law[g]) < 4 * sigma, (g, counts[g], n * law[g])
    assert gaps.double().mean() < 0.5 * (space - 1) * 0.8  # far nearer than uniform gaps would be


def test_selective_copying_is_mambas_definition():
    vocab, length, tokens = 10, 40, 5
    batch = selective_copying(50, vocab_size=vocab, length=length, tokens=tokens, seed=1)
    assert batch.inputs.shape == (50, length + tokens)
    for inputs, labels in zip(batch.inputs, batch.labels):
        region = inputs[:length]
        data = region[region != 0]
        assert data.numel() == tokens and bool(((1 <= data) & (data < vocab - 1)).all())
        assert bool((inputs[length:] == vocab - 1).all())
        assert torch.equal(labels[length:], data) and bool((labels[:length] == IGNORE).all())


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_hides_the_key_at_its_depth_and_asks_for_it(depth):
    batch = passkey(3, length=400, depth=depth, seed=2)
    assert batch.inputs.shape == (3, 400) and batch.exact
    for inputs, labels in zip(batch.inputs, batch.labels):
        text = BYTES.decode(inputs.tolist())
        answer = BYTES.decode(labels[labels != IGNORE].tolist())
        assert len(answer) == 5 and answer.isdigit()
        needle = text.index(f"The pass key is {answer}. Remember it.")
        question = text.index("\nWhat is the pass key? The pass key is ")
        assert text.endswith(f"The pass key is {answer}")
        filler = question - len(f"The pass key is {answer}. Remember it. {answer} is the pass key. ")
        assert abs(needle - depth * filler) <= 1
        # Each answer digit is the label of the position before it.
        asked = (labels != IGNORE).nonzero()[:, 0]
        assert torch.equal(labels[asked], inputs[asked + 1])


def test_multi_needle_hides_each_number_once_and_asks_for_every_one():
    haystack = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40
    batch = multi_needle(4, length=800, needles=3, seed=5, haystack=haystack)
    for inputs, labels in zip(batch.inputs, batch.labels):
        text = BYTES.decode(inputs.tolist())
        facts = [sentence for sentence in text.split(" The secret number of ")[1:]]
        told = {f.split(" is ")[0]: f.split(" is ")[1][:5] for f in facts}
        assert len(told) == 3 and len(facts) == 6  # three hidden, three asked
        asked = BYTES.decode(labels[labels != IGNORE].tolist())
        assert sorted(asked[i:i + 5] for i in range(0, 15, 5)) == sorted(told.values())


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the label (or on a wrong token for the first `wrong` examples)."""

    def __init__(self, batch: TaskBatch, wrong: int = 0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batch, self.wrong = batch, wrong

    def forward(self, inputs):
        index = next(i for i in range(self.batch.inputs.shape[0] - inputs.shape[0] + 1)
                     if torch.equal(self.batch.inputs[i:i + inputs.shape[0]], inputs))
        labels = self.batch.labels[index:index + inputs.shape[0]].clamp(min=0).clone()
        spoil = max(0, min(self.wrong - index, inputs.shape[0]))
        labels[:spoil] = (labels[:spoil] + 1) % self.batch.vocab_size
        logits = torch.nn.functional.one_hot(labels, self.batch.vocab_size).float()
        return type("Out", (), {"logits": logits})()


def test_accuracy_counts_tokens_or_whole_examples():
    batch = mqar(10, vocab_size=32, length=24, pairs=3, seed=0)
    assert accuracy(_Oracle(batch), batch, batch_size=4).value == 1.0
    result = accuracy(_Oracle(batch, wrong=2), batch, batch_size=4)
    assert (result.correct, result.total) == (24, 30)  # per labelled token
    exact = passkey(6, length=200, seed=0)
    result = accuracy(_Oracle(exact, wrong=1), exact, batch_size=4)
    assert (result.correct, result.total) == (5, 6)  # per example
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_bad_task_options_are_one_clear_line():
    with pytest.raises(ValueError, match="did you mean `mqar`"):
        make_task("mqr", 2, seed=0)
    with pytest.raises(ValueError, match="need length >= 4·pairs"):
        mqar(2, length=16, pairs=8)
    with pytest.raises(ValueError, match="cannot hold the needles"):
        passkey(1, length=40)
