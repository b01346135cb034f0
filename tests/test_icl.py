"""Structured prompting: the rescaled joined cache against the duplicated-keys formulation (M identical groups
must give exactly what one group gives, which holds only with the test's keys counted M times), group order,
continuing decoding, scoring, and one-line errors."""

import json
import math

import pytest
import torch

import scaleformer as sf
from scaleformer.icl import group_demonstrations, score_answers, structured_generate, structured_prompt
from tests.conftest import assert_close, make_model, tiny


@pytest.mark.parametrize("options", [{"position": "rope"}, {"position": "absolute", "kv_heads": 2},
                                     {"position": "xpos"}, {"position": "relative"}])
def test_identical_groups_equal_one_group_because_test_keys_count_m_times(options):
    model = make_model(tiny(**options), torch.float64)
    group, test = torch.randint(0, 97, (9,)), torch.randint(0, 97, (5,))
    expected = model(torch.cat([group, test])[None]).logits[:, 9:]
    for m in (1, 2, 3):
        out = structured_prompt(model, group.repeat(m, 1), test, groups=m)
        assert_close(out.logits, expected, torch.float64)
        step = torch.randint(0, 97, (1, 1))  # decoding continues with the same rescaling
        assert_close(model(step, cache=out.cache).logits[:, -1],
                     model(torch.cat([group, test, step[0]])[None]).logits[:, -1], torch.float64)
    cache = structured_prompt(model, group.repeat(3, 1), test, groups=3).cache
    assert cache.key_bias[0, :27].abs().sum() == 0 and cache.key_bias[0, 27:].tolist() == [math.log(3)] * 5


def test_the_bias_is_the_duplicated_keys_formulation():
    """One attention call: scores +log M on the test keys == the test keys and values held M times."""
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    k, v = torch.randn(1, 4, 10, 8, dtype=torch.float64), torch.randn(1, 4, 10, 8, dtype=torch.float64)
    groups, m = slice(0, 7), 3
    bias = torch.zeros(10, dtype=torch.float64)
    bias[7:] = math.log(m)
    weights = (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1)
    k_dup = torch.cat([k[:, :, groups]] + [k[:, :, 7:]] * m, dim=2)
    v_dup = torch.cat([v[:, :, groups]] + [v[:, :, 7:]] * m, dim=2)
    assert_close(weights @ v, (q @ k_dup.transpose(-1, -2) / 8**0.5).softmax(-1) @ v_dup, torch.float64)


def test_group_order_does_not_matter_and_grouping():
    model = make_model(tiny(position="rope"), torch.float64)
    demos = [torch.randint(0, 97, (n,)) for n in (4, 6, 5, 3, 7)]
    grouped = group_demonstrations(demos, 2)
    # dealt to the shorter group: [4, 5, 7] -> 16 tokens and [6, 3] -> 9; both cut to 9, keeping the ends
    assert grouped.shape == (2, 9) and torch.equal(grouped[1], torch.cat([demos[1], demos[3]]))
    assert torch.equal(grouped[0], torch.cat([demos[0], demos[2], demos[4]])[-9:])
    test = torch.randint(0, 97, (4,))
    assert_close(structured_prompt(model, grouped, test, groups=2).logits,
                 structured_prompt(model, grouped.flip(0), test, groups=2).logits, torch.float64)


def test_generation_continues_the_joined_cache():
    """Greedy structured generation = argmax decoding step by step over structured_prompt's logits; with M
    identical groups it is plain greedy generation after one group (the duplicated-keys equivalence)."""
    model = make_model(tiny(position="rope"), torch.float64)
    group, prompt = torch.randint(0, 97, (9,)), torch.randint(0, 97, (4,))
    new = structured_generate(model, group.repeat(3, 1), prompt, 6, groups=3)
    plain = sf.generate(model, torch.cat([group, prompt])[None], 6)[0, 13:]
    assert torch.equal(new, plain)
    demos = [torch.randint(0, 97, (n,)) for n in (5, 7, 6, 4)]
    new = structured_generate(model, demos, prompt, 5, groups=2)
    ids = prompt
    for token in new:  # each generated token is the argmax after everything before it
        logits = structured_prompt(model, demos, ids, groups=2).logits[0, -1]
        assert int(logits.argmax()) == int(token)
        ids = torch.cat([ids, token[None]])
    stopped = structured_generate(model, demos, prompt, 5, groups=2, stop_tokens=int(new[1]))
    assert stopped.tolist() == new[:2].tolist()  # stops after emitting a stop token
    with pytest.raises(ValueError, match="prompt_ids must be a non-empty 1-D tensor"):
        structured_generate(model, demos, prompt[None], 5, groups=2)


def test_scoring_chooses_the_likeliest_answer():
    model = make_model(tiny(position="rope"))
    demos = [torch.randint(0, 97, (6,)) for _ in range(4)]
    prompt, answers = torch.randint(0, 97, (3,)), [torch.randint(0, 97, (2,)) for _ in range(3)]
    scores = score_answers(model, demos, prompt, answers, groups=2)
    for answer, score in zip(answers, scores):
        out = structured_prompt(model, demos, torch.cat([prompt, answer]), groups=2)
        logprobs = out.logits[0, 2:-1].log_softmax(-1)
        assert_close(score, logprobs.gather(-1, answer[:, None]).sum())


def test_bad_input_is_one_clear_error():
    model = make_model(tiny(position="rope"))
    with pytest.raises(ValueError, match="cannot fill 3 groups"):
        structured_prompt(model, [torch.tensor([1, 2])], torch.tensor([3]), groups=3)
    with pytest.raises(ValueError, match="test_ids must be a non-empty 1-D"):
        structured_prompt(model, [torch.tensor([1, 2])], torch.tensor([[3]]), groups=1)
    with pytest.raises(ValueError, match="every layer must be dense softmax attention"):
        structured_prompt(sf.build(sf.load_preset("retnet-tiny")), [torch.tensor([1, 2])], torch.tensor([3]), groups=1)
    with pytest.raises(ValueError, match="every layer must be dense softmax attention"):
        structured_prompt(make_model(tiny(window=4)), [torch.tensor([1, 2])], torch.tensor([3]), groups=1)


def test_cli_scores_each_test_example_and_reports_bad_files(tmp_path, capsys):
    from scaleformer.cli import main
    from scaleformer.data.tokenizer import ByteTokenizer

    demos, tests = tmp_path / "demos.jsonl", tmp_path / "tests.jsonl"
    demos.write_text("".join(f'{{"input": "{a}+{a}", "output": "{2 * a}"}}\n' for a in range(1, 6)))
    tests.write_text('{"input": "4+4", "options": ["8", "9", "7"], "answer": 0}\n'
                     '{"input": "6+6", "options": ["13", "12"], "answer": 1}\n')
    assert main(["icl", "--demos", str(demos), "--tests", str(tests), "--groups", "2", "--preset", "gpt-tiny"]) == 0
    out = capsys.readouterr().out
    torch.manual_seed(0)  # the command's model: gpt-tiny at seed 0
    model = sf.build(sf.load_preset("gpt-tiny")).eval()
    encode = lambda text: torch.tensor(ByteTokenizer().encode(text, add_bos=False))  # noqa: E731
    demo_ids = [encode(f"{a}+{a} {2 * a}\n") for a in range(1, 6)]
    right = 0
    for text, options, answer in (("4+4 ", ["8", "9", "7"], 0), ("6+6 ", ["13", "12"], 1)):
        right += int(score_answers(model, demo_ids, encode(text), [encode(o) for o in options], groups=2).argmax()) == answer
    assert f"accuracy {right / 2:.3f} ({right}/2)" in out and "5 demonstrations in 2 groups" in out
    bad = tmp_path / "bad.jsonl"
    for line, message in (('{"input": "x", "options": ["a", "b"], "answer": 2}', "answer"),
                          ("not json", "not valid JSON"), ('{"input": "x", "options": ["a"], "answer": 0}', "options")):
        bad.write_text(line + "\n")
        assert main(["icl", "--demos", str(demos), "--tests", str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"{bad}:1:" in err and message in err and err.count("\n") == 1


def test_cli_generation_tests_are_scored_by_exact_match(tmp_path, capsys):
    from scaleformer.cli import main
    from scaleformer.data.tokenizer import ByteTokenizer

    demos, tests = tmp_path / "demos.jsonl", tmp_path / "tests.jsonl"
    demos.write_text("".join(f'{{"input": "{a}+{a}", "output": "{2 * a}"}}\n' for a in range(1, 5)))
    torch.manual_seed(0)  # the command's model: gpt-tiny at seed 0
    model = sf.build(sf.load_preset("gpt-tiny")).eval()
    tokenizer = ByteTokenizer()
    encode = lambda text: torch.tensor(tokenizer.encode(text, add_bos=False))  # noqa: E731
    demo_ids = [encode(f"{a}+{a} {2 * a}\n") for a in range(1, 5)]
    # the untrained model's own greedy output is "right" for the first test; the second asks for another
    produced = tokenizer.decode(structured_generate(model, demo_ids, encode("5+5 "), 4, groups=2,
                                                    stop_tokens=10).tolist()).split("\n")[0].strip()
    assert produced  # a non-empty first line to ask for
    tests.write_text(f'{{"input": "5+5", "output": {json.dumps(produced[:3])}}}\n'
                     '{"input": "5+5", "output": "\\u2603"}\n')
    assert main(["icl", "--demos", str(demos), "--tests", str(tests), "--groups", "2"]) == 0
    right = int(produced == produced[:3])
    assert f"accuracy {right / 2:.3f} ({right}/2)" in capsys.readouterr().out
    tests.write_text('{"input": "5+5", "output": " "}\n')
    assert main(["icl", "--demos", str(demos), "--tests", str(tests)]) == 2
    assert '"output" (generation)' in capsys.readouterr().err
