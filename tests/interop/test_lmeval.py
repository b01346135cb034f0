"""lm-eval-harness: our adapter scores a local task offline, with numbers we can recompute by hand."""

import json

import pytest
import torch
import torch.nn.functional as F

import scaleformer as sf
from scaleformer.data.tokenizer import ByteTokenizer
from tests.conftest import tiny

lm_eval = pytest.importorskip("lm_eval")
sflm = pytest.importorskip("scaleformer.lmeval")

DOCS = [
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
    {"question": "The sky is", "choices": [" blue", " green"], "answer": 0},
    {"question": "def f(x): return", "choices": [" x", " pass", " None"], "answer": 1},
    {"question": "Paris is in", "choices": [" France", " Peru"], "answer": 1},
    {"question": "import", "choices": [" os", " sys"], "answer": 0},
]
TASK = """task: sf_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(params=["retnet", "decoder", "gdn-hybrid"])
def checkpoint(request, tmp_path):
    tokenizer = ByteTokenizer()
    if request.param == "retnet":
        cfg = sf.RetNetConfig(vocab_size=tokenizer.vocab_size, embed_dim=32, value_dim=48, heads=2, ffn_dim=48, layers=2)
    elif request.param == "gdn-hybrid":  # Gated DeltaNet layers and a gated attention layer, 3:1
        cfg = sf.load_preset("gdn-hybrid-tiny").replace(vocab_size=tokenizer.vocab_size)
    else:
        cfg = tiny(vocab_size=tokenizer.vocab_size, position="absolute", max_positions=128)
    torch.manual_seed(0)
    model = sf.build(cfg).eval()
    path = tmp_path / "ckpt"
    sf.save(model, path)
    tokenizer.save(path)
    return path, model, tokenizer


def _logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Σ log p(ids[t] | ids[:t]) for t >= start, computed on the unbatched sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, start - 1:].float()
    target = torch.tensor(ids[start:])
    logprobs = F.log_softmax(logits, -1)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


@pytest.fixture
def tasks(tmp_path):
    """A directory holding the tiny multiple-choice task (YAML) and its local data file."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "sf_tiny_mc.yaml").write_text(TASK.format(data=data))
    return folder


def _our_accuracy(model, tokenizer) -> float:
    """The task's accuracy recomputed by scoring every choice with the model directly."""
    correct = 0
    for doc in DOCS:
        context = tokenizer.encode(doc["question"])
        scores = [_logprob(model, context + tokenizer.encode(choice), len(context))[0] for choice in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


def test_multiple_choice_task_accuracy_matches_our_own_scoring(checkpoint, tasks):
    path, model, tokenizer = checkpoint

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = sflm.ScaleformerLM(str(path), batch_size=3)
    results = simple_evaluate(model=lm, tasks=["sf_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)))
    assert results["results"]["sf_tiny_mc"]["acc,none"] == pytest.approx(_our_accuracy(model, tokenizer))


def test_loglikelihood_rolling_and_batched_scores_equal_unbatched_sums(checkpoint):
    path, model, tokenizer = checkpoint
    lm = sflm.ScaleformerLM(str(path), batch_size=4, max_length=16)
    requests = [((c, x), tokenizer.encode(c), tokenizer.encode(x)) for c, x in
                [("a", "bc"), ("hello there", " world"), ("xy", "z" * 5), ("long context " * 3, "!")]]
    for (_, context, continuation), (score, greedy) in zip(requests, lm._loglikelihood_tokens(requests)):
        whole = (context + continuation)[-17:]
        expected, expected_greedy = _logprob(model, whole, len(whole) - len(continuation))
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy

    text = "rolling windows cover every token once"  # 38 bytes: three windows of 16
    ids = tokenizer.encode(text)

    class Request:
        args = (text,)

    (total,) = lm.loglikelihood_rolling([Request()])
    # lm_eval's disjoint windows (its own logic): every token predicted exactly once, from <= 16 tokens.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tokenizer.bos_id, 16, 1)]
    assert [t for _, predicted in windows for t in predicted] == ids and len(windows) == 3
    expected = sum(_logprob(model, context + predicted, len(context))[0] for context, predicted in windows)
    assert total == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_generation_cut_at_the_stop_string(checkpoint):
    path, model, tokenizer = checkpoint
    lm = sflm.ScaleformerLM(str(path))

    class Request:
        args = ("Once upon", {"until": ["\n"], "max_gen_toks": 12})

    (text,) = lm.generate_until([Request()])
    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("Once upon")]])
    new = sf.generate(model, prompt, 12, stop_tokens=[tokenizer.eos_id])[0, prompt.shape[1]:].tolist()
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    assert text == tokenizer.decode(new).split("\n")[0]


def test_cli_runs_lm_eval_with_our_model_registered(checkpoint, tasks, tmp_path):
    from scaleformer.cli import main

    path, model, tokenizer = checkpoint
    assert main(["lm-eval", "run", "--model", "scaleformer", "--model_args", f"pretrained={path}",
                 "--tasks", "sf_tiny_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").rglob("results*.json")
    accuracy = json.loads(written.read_text())["results"]["sf_tiny_mc"]["acc,none"]
    assert accuracy == pytest.approx(_our_accuracy(model, tokenizer))


def test_the_shipped_demo_task_runs_offline_with_no_task_file_of_ours(checkpoint, tmp_path):
    """`scaleformer lm-eval run ... --tasks scaleformer_demo`: the task ships with the package (no download, no
    --include_path), and its accuracy is the one our own scoring gives."""
    from scaleformer.cli import main
    from scaleformer.lmeval_tasks.demo import DOCUMENTS

    path, model, tokenizer = checkpoint
    assert main(["lm-eval", "run", "--model", "scaleformer", "--model_args", f"pretrained={path}",
                 "--tasks", "scaleformer_demo", "--output_path", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").rglob("results*.json")
    accuracy = json.loads(written.read_text())["results"]["scaleformer_demo"]["acc,none"]
    correct = 0
    for doc in DOCUMENTS:
        context = tokenizer.encode(doc["question"])
        scores = [_logprob(model, context + tokenizer.encode(choice), len(context))[0] for choice in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert len(DOCUMENTS) == 20 and accuracy == pytest.approx(correct / len(DOCUMENTS))
