"""``scaleformer reproduce mqar --protocol zoology``: Zoology's Figure 2 protocol, checked against its
definition (zero filler, models without MLPs, one-head attention with dropout and learned positions, the
state each mixer keeps, best-of-rates points, the leaderboard table and verdicts by Wilson intervals)."""

import json

import torch

from scaleformer.cli import main
from scaleformer.reproduce import zoology
from scaleformer.tasks import IGNORE, mqar


def test_zoology_mqar_fills_with_token_zero():
    batch = mqar(50, vocab_size=64, length=64, pairs=4, seed=1, random_filler=False)
    asked = batch.labels != IGNORE
    context = torch.zeros_like(asked)
    context[:, :8] = True
    queries = torch.zeros_like(asked)
    queries[:, 8:] = asked[:, 8:]  # a query's input is its key; its label the value
    filler = ~(context | queries)
    assert (batch.inputs[filler] == 0).all() and (batch.inputs[context] > 0).all()
    assert (batch.inputs[queries] < 32).all() and (batch.labels[asked] >= 32).all()
    # the same keys, values and gaps as the random-filler task of the same seed: only the filler differs
    other = mqar(50, vocab_size=64, length=64, pairs=4, seed=1)
    assert torch.equal(other.labels, batch.labels) and torch.equal(other.inputs[~filler], batch.inputs[~filler])


def test_zoology_models_have_no_mlp_and_its_attention():
    s = zoology.settings(quick=True)
    attention = zoology.model("attention", 32, 64, s)
    assert all(layer.ffn is None for layer in attention.layers)
    mixer = attention.layers[0].mixer
    assert (mixer.heads, mixer.dropout) == (1, 0.1)
    assert type(attention.position).__name__ == "LearnedPosition" and attention.position.max_positions == 64
    for name in ("retnet", "gated_deltanet", "mamba2", "samba", "jamba"):
        assert all(layer.ffn is None for layer in zoology.model(name, 32, 64, {**s, "vocab_size": 64}).layers), name


def test_the_state_a_mixer_keeps_grows_with_the_length_only_for_attention():
    s = zoology.settings(quick=True)
    # attention: keys and values, 2 · width numbers per token and layer, for 2 layers
    assert zoology.state_floats(zoology.model("attention", 32, 128, s), 64) == 2 * 2 * 32 * 64
    assert zoology.state_floats(zoology.model("attention", 32, 128, s), 128) == 2 * 2 * 32 * 128
    retnet = zoology.model("retnet", 32, 128, s)
    assert zoology.state_floats(retnet, 64) == zoology.state_floats(retnet, 128) > 0


def _run(mixer, width, accuracy, asked=1000, length=64, pairs=4):
    from scaleformer.stats import wilson_interval

    interval = wilson_interval(round(accuracy * asked), asked)
    return {"mixer": mixer, "width": width, "length": length, "pairs": pairs, "accuracy": interval.mean,
            "low": interval.low, "high": interval.high, "state_floats": 100 * width if mixer == "retnet" else 4096}


def test_the_leaderboard_table_and_the_verdicts_follow_the_intervals():
    s = {"mixers": ["attention", "retnet"], "points": [[64, 4]], "widths": [32, 64]}
    runs = [_run("attention", 32, 1.0), _run("attention", 64, 1.0), _run("retnet", 32, 0.5), _run("retnet", 64, 0.9)]
    table = zoology.leaderboard_table(runs, s)
    assert table.splitlines()[0] == ("| mixer | T 64, 4 pairs: width 32 | T 64, 4 pairs: width 64 | "
                                     "state at width 32, T 64 (floats) | state at width 64, T 64 (floats) |")
    assert "| retnet | 0.500 | 0.900 | 3,200 (fixed) | 6,400 (fixed) |" in table
    assert "| attention | 1.000 | 1.000 | 4,096 | 4,096 |" in table
    solved, short = zoology._verdicts(runs, s)
    assert solved.held is True and short.held is True and short.evidence == (0.5, 1.0)
    # 0.97 of 100 against 1.0 of 100: the Wilson intervals (0.915–0.990 and 0.963–1) overlap: undecided
    close = [_run("attention", w, 1.0, asked=100) for w in (32, 64)] + [_run("retnet", w, 0.97, asked=100) for w in (32, 64)]
    assert zoology._verdicts(close, s)[1].held is None
    # attention failing at a point fails the first claim
    assert zoology._verdicts([_run("attention", 32, 0.5), *runs[1:]], s)[0].held is False


def test_a_tiny_zoology_grid_runs_every_point_at_its_best_rate(tmp_path):
    assert main(["reproduce", "mqar", "--protocol", "zoology", "--quick", "--out", str(tmp_path), "--set",
                 "lrs=[0.001,0.003]", "train_examples=128", "test_examples=32", "epochs=2", "widths=[16]"]) == 0
    payload = json.loads((tmp_path / "mqar-zoology.json").read_text())
    assert payload["settings"]["lrs"] == [0.001, 0.003]
    assert {(r["mixer"], r["width"], r["length"]) for r in payload["runs"]} == {("attention", 16, 64), ("retnet", 16, 64)}
    for run in payload["runs"]:
        assert run["accuracy"] == max(run["accuracy_by_lr"].values()) and 0 <= run["low"] <= run["accuracy"] <= run["high"]
        assert run["epochs"] <= 2 and run["state_floats"] > 0
    assert (tmp_path / "mqar-zoology.md").read_text().startswith("| mixer |")
    assert (tmp_path / "mqar-zoology.png").read_bytes()[:4] == b"\x89PNG"


def test_protocol_options_are_refused_where_they_do_not_apply(tmp_path, capsys):
    def error(args):
        assert main(["reproduce", *args, "--out", str(tmp_path)]) == 2
        return capsys.readouterr().err

    assert "--protocol zoology is a protocol of `reproduce mqar`, not of deepnet" in error(["deepnet", "--protocol",
                                                                                          "zoology"])
    assert "--full runs the whole grid of a protocol" in error(["mqar", "--full"])
    assert "batch_sizes needs one batch size per point" in error(["mqar", "--protocol", "zoology", "--quick", "--set",
                                                                  "points=[[64,4],[128,8]]"])
    assert not (tmp_path / "mqar-zoology.json").exists()
