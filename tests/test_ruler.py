"""RULER-style tasks (scaleformer.ruler) against their definitions: what each prompt holds, its answers, its
length, determinism for a seed; RULER's scoring; and `scaleformer eval --task ruler` on a checkpoint."""

from __future__ import annotations

import collections
import re
import uuid

import pytest
import torch

import scaleformer as sf
from scaleformer import ruler
from scaleformer.cli import main
from scaleformer.data.tokenizer import ByteTokenizer


def tokens(text: str) -> int:
    return len(text.encode("utf-8")) + 1  # bytes and BOS, as the default counts them


@pytest.mark.parametrize("task", list(ruler.TASKS))
@pytest.mark.parametrize("length", [1024, 4096])
def test_every_sample_fits_its_length_and_fills_most_of_it(task, length):
    if task == "cwe" and length < 2048:  # 10 words × 6 repeats of ~13 bytes and the question need more
        with pytest.raises(ValueError, match="cannot hold"):
            ruler.generate(task, 1, length)
        return
    samples = ruler.generate(task, 3, length, seed=7)
    for sample in samples:
        used = tokens(sample.prompt) + sample.generate
        assert used <= length and used > 0.9 * length, (task, used)
        assert sample.answers and all(answer not in "" for answer in sample.answers)
    assert ruler.generate(task, 3, length, seed=7) == samples  # the same for a seed
    assert ruler.generate(task, 3, length, seed=8) != samples


@pytest.mark.parametrize("name", list(ruler.NIAH))
def test_niah_needles_keys_and_answers_follow_the_configuration(name):
    config = ruler.NIAH[name]
    for sample in ruler.generate(name, 4, 2048, seed=3):
        kind = config.value
        question = re.search(rf"What are all the special magic {kind} for (.+) mentioned in the provided text\?",
                             sample.prompt)
        asked = question.group(1).split(", ")
        assert len(asked) == config.queries and len(set(asked)) == config.queries
        found = {key: re.findall(rf"One of the special magic {kind} for {re.escape(key)} is: (\S+)\.", sample.prompt)
                 for key in asked}
        assert all(len(values) == config.values for values in found.values())
        assert sorted(sample.answers) == sorted(value for key in asked for value in found[key])
        for value in sample.answers:
            if kind == "numbers":
                assert value.isdigit() and 10**6 <= int(value) < 10**7
            else:
                assert uuid.UUID(value).version == 4
        for key in asked:
            if config.key == "words":
                adjective, noun = key.split("-")
                assert adjective in ruler.ADJECTIVES and noun in ruler.NOUNS
            else:
                assert uuid.UUID(key).version == 4
        needles = re.findall(rf"One of the special magic {kind} for (\S+) is:", sample.prompt)
        if config.haystack == "needle":  # decoys: needles of other keys, many of them
            assert len(needles) > 10 * config.keys and len(set(needles) - set(asked)) > 10
        else:  # exactly k keys' needles, v each
            assert len(needles) == max(config.keys, config.queries) * config.values
        if config.haystack == "noise":
            assert "The grass is green. The sky is blue." in sample.prompt


def test_variable_tracking_holds_one_chain_in_order():
    for sample in ruler.generate("vt", 4, 2048, seed=5):
        value = re.search(r"assigned the value (\d{5}) in the text above", sample.prompt).group(1)
        names = sample.answers
        assert len(names) == 5 and len(set(names)) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(4)]
        places = [sample.prompt.index(line) for line in chain]
        assert places == sorted(places)  # in order through the text
        assert sample.prompt.count("VAR ") == 5 + 4  # nothing else assigned


@pytest.mark.parametrize("length, often, rarely", [(2048, 6, 1), (32768, 30, 3)])  # in bytes: 300 entries ≈ 5 kB
def test_common_words_repeat_as_ruler_repeats_them(length, often, rarely):
    sample = ruler.generate("cwe", 1, length, seed=2)[0]
    listed = re.findall(r"\d+\. (\w+)", sample.prompt.split("\n")[1])
    counts = collections.Counter(listed)
    assert len(sample.answers) == 10 and all(counts[word] == often for word in sample.answers)
    assert set(counts.values()) == {often, rarely}
    assert [int(n) for n in re.findall(r"(\d+)\. \w+", sample.prompt.split("\n")[1])] == list(range(1, len(listed) + 1))


def test_frequent_words_answer_is_the_strict_top_three():
    for sample in ruler.generate("fwe", 3, 2048, seed=4):
        words = sample.prompt.split("\n")[1].split()
        counts = collections.Counter(words).most_common()
        assert tuple(w for w, _ in counts[:3]) == sample.answers and counts[2][1] > counts[3][1]


def test_string_match_all_scores_as_ruler_does():
    assert ruler.string_match_all(["The values are 12 and ab", "nothing"], [["12", "AB", "c"], ["x"]]) == pytest.approx(
        100 * (2 / 3 + 0) / 2)
    assert ruler.string_match_all(["x y z"], [["X", "y", "z"]]) == 100.0
    with pytest.raises(ValueError, match="one output per sample"):
        ruler.string_match_all(["a"], [["a"], ["b"]])


def test_sizes_that_cannot_hold_the_question_and_unknown_tasks_are_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        ruler.generate("niah_multiquery", 1, 200)
    with pytest.raises(ValueError, match="unknown RULER task 'niah_singel_1'.*niah_single_1"):
        ruler.generate("niah_singel_1", 1, 1024)


def test_eval_scores_a_checkpoint_on_every_task(tmp_path, capsys):
    torch.manual_seed(0)
    directory = tmp_path / "model"
    sf.save(sf.build(sf.retnet(vocab_size=259, embed_dim=16, value_dim=16, layers=1, heads=2, ffn_dim=32)), directory)
    ByteTokenizer().save(directory)
    assert main(["eval", "--checkpoint", str(directory), "--task", "ruler", "--lengths", "1024", "--count", "1"]) == 0
    out = capsys.readouterr().out
    for task in ["niah_single_1", "niah_multiquery", "vt", "fwe", "mean"]:
        assert re.search(rf"1024\s+{task}\s+\d+\.\d", out), task
    assert re.search(r"1024\s+cwe\s+skipped: length 1024 cannot hold", out)
    assert main(["eval", "--checkpoint", str(directory), "--task", "ruler-nope", "--lengths", "512"]) == 2
    assert "unknown RULER task 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_every_answer_fits_the_tokens_generated_for_it(task):
    # RULER's budgets count BPE tokens; in bytes a uuid alone is 36, so the budget grows to what the answer
    # text takes (and never shrinks below RULER's).
    ruler_tokens = {"vt": 30, "cwe": 120, "fwe": 50}
    for sample in ruler.generate(task, 3, 4096, seed=1):
        assert tokens(ruler.answer_text(sample.answers)) <= sample.generate
        if task in ruler.NIAH:
            per_answer = 32 if ruler.NIAH[task].value == "uuids" else 12
            assert sample.generate >= per_answer * len(sample.answers)
        else:
            assert sample.generate >= ruler_tokens[task]
    uuid_sample = ruler.generate("niah_single_3", 1, 1024)[0]
    assert uuid_sample.generate == tokens(" " + uuid_sample.answers[0] + ".") == 39  # 36 + space, stop, start


def test_answer_text_holds_every_answer_and_scores_full_marks():
    answers = ("1234567", "7654321")
    assert ruler.answer_text(answers) == " 1234567, 7654321."
    assert ruler.string_match_all([ruler.answer_text(answers)], [answers]) == 100.0


def test_training_batch_teaches_the_answer_alone():
    tokenizer = ByteTokenizer()
    samples = ruler.generate("niah_multivalue", 3, 700, seed=2) + ruler.generate("niah_single_1", 1, 512, seed=2)
    inputs, targets = ruler.training_batch(samples, tokenizer, 700)
    assert inputs.shape == targets.shape == (4, 700)
    for row, sample in enumerate(samples):
        prompt = [tokenizer.bos_id] + list(sample.prompt.encode())
        asked = (targets[row] != -100).nonzero().flatten().tolist()
        # targets at the prompt's last position onwards: the answer text, then the end token, and nothing else
        assert asked == list(range(len(prompt) - 1, len(prompt) - 1 + len(ruler.answer_text(sample.answers)) + 1))
        assert tokenizer.decode(targets[row, asked].tolist()) == ruler.answer_text(sample.answers)
        assert targets[row, asked[-1]] == tokenizer.eos_id
        assert inputs[row, :len(prompt)].tolist() == prompt  # teacher forcing: the target of i is input i + 1
        assert inputs[row, asked[1:]].tolist() == targets[row, asked[:-1]].tolist()
        assert (inputs[row, asked[-1] + 1:] == tokenizer.pad_id).all()
    with pytest.raises(ValueError, match="more than the rows' 600"):
        ruler.training_batch(samples, tokenizer, 600)
    # the whole prompt as targets too: every next token of the row up to the end token, padding excluded
    whole_inputs, whole = ruler.training_batch(samples, tokenizer, 700, answer_only=False)
    assert torch.equal(whole_inputs, inputs)
    for row in range(len(samples)):
        last = (targets[row] != -100).nonzero().max()
        assert torch.equal(whole[row, :last], inputs[row, 1:last + 1]) and whole[row, last] == tokenizer.eos_id
        assert (whole[row, last + 1:] == -100).all() and torch.equal(whole[row, targets[row] != -100],
                                                                     targets[row, targets[row] != -100])


def test_continuations_are_the_greedy_tokens_scored(monkeypatch):
    # A model that always predicts the byte after the one it reads: its continuation of each prompt is known.
    class Successor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, **_):
            logits = torch.nn.functional.one_hot((ids + 1) % 256, 259).float()
            return type("Out", (), {"logits": logits, "cache": None})()

    import scaleformer.generation as generation

    def generate(model, ids, steps):  # greedy decoding without a cache, as the library's generate does it
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return ids

    monkeypatch.setattr(generation, "generate", generate)
    sample = ruler.Sample("ab", ("cd",), 3)  # prompt "ab" then b+1, +2, +3: "cde"
    assert ruler.continuations(Successor(), [sample], ByteTokenizer()) == ["cde"]
