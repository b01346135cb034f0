"""`scaleformer compare`: the same budget for every model, the promised fields, plots redrawn from JSON."""

import json

from scaleformer.cli import main


def test_compare_on_a_task_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "gpt-tiny+position=rope", "retnet-tiny", "--task", "mqar", "--task-options",
                 "vocab_size=64", "pairs=4", "--seq-len", "32", "--steps", "6", "--batch-size", "8",
                 "--eval-every", "3", "--contexts", "16", "48", "--decode-steps", "2", "--out", str(out)]) == 0
    payload = json.loads((out / "compare.json").read_text())
    rows = {r["model"]: r for r in payload["models"]}
    assert list(rows) == ["gpt-tiny+position=rope", "retnet-tiny"]
    for row in rows.values():
        assert row["parameters"] > 0 and row["tokens_per_s"] > 0 and row["curve"][-1]["step"] == 6
        assert 0 <= row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"] <= 1
        assert [c["context"] for c in row["decoding"]] == [16, 48] and all(c["step_ms"] > 0 for c in row["decoding"])
    # float32 by default, whatever train's "auto" would pick on this machine: the same numbers everywhere
    from scaleformer.train.checkpoint import latest_checkpoint, trainer_state

    runs = [path for path in out.iterdir() if path.is_dir()]
    assert len(runs) == 2 and all(trainer_state(latest_checkpoint(run))["train"]["precision"] == "float32"
                                  for run in runs)
    # The Transformer's cache grows with the prompt; RetNet's does not.
    grows = [c["cache_mb"] for c in rows["gpt-tiny+position=rope"]["decoding"]]
    fixed = [c["cache_mb"] for c in rows["retnet-tiny"]["decoding"]]
    assert grows[1] > grows[0] and fixed[0] == fixed[1]
    names = ("compare_loss.png", "compare_decoding.png", "compare_accuracy.png")
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in names)
    for name in names:
        (out / name).unlink()
    assert main(["compare", "--replot", str(out / "compare.json")]) == 0  # from the JSON alone
    assert all((out / name).is_file() for name in names)
    captured = capsys.readouterr()
    assert "comparison (same data" in captured.out
    # six steps learn nothing: each model whose interval reaches the 1/pairs plateau is called out
    assert payload["null_accuracy"] == {"accuracy": 0.25, "why": "1/4: any value from the context"}
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    expected = [name for name, row in rows.items() if row["accuracy_low"] <= 0.25]
    assert expected and [line.split(":")[1].strip() for line in warned] == expected
    assert all("nothing was learned here" in line for line in warned)


def test_null_results_are_called_out_and_findings_are_not():
    from scaleformer.compare import null_results

    payload = {"null_accuracy": {"accuracy": 0.125, "why": "1/8: any value from the context"}, "models": [
        {"model": "plateau", "accuracy": 0.13, "accuracy_low": 0.11, "accuracy_high": 0.15},
        {"model": "learned", "accuracy": 0.97, "accuracy_low": 0.95, "accuracy_high": 0.98},
        {"model": "unigram-level", "val_loss": 6.7, "unigram_loss": 6.6},
        {"model": "language", "val_loss": 4.2, "unigram_loss": 6.6}]}
    lines = null_results(payload)
    assert [line.split(":")[1].strip() for line in lines] == ["plateau", "unigram-level"]
    assert "(0.125, 1/8: any value from the context)" in lines[0] and "no better than the unigram" in lines[1]


def test_compare_refuses_bad_models_before_training(tmp_path, capsys):
    assert main(["compare", "gpt-tiny", "no-such-preset", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "gpt-tiny").exists()


NEWER = ["gret-tiny", "diff-tiny", "bitnet-tiny", "yoco-tiny"]  # issue 16's models


def test_compare_runs_the_newer_models_on_passkey_and_yocos_cache_grows_by_one_layer(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "gpt-tiny+position=rope", *NEWER, "--task", "passkey", "--seq-len", "128",
                 "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--contexts", "64", "256",
                 "--decode-steps", "1", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads((out / "compare.json").read_text())["models"]}
    assert list(rows) == ["gpt-tiny+position=rope", *NEWER]
    assert all(0 <= row["accuracy"] <= 1 and row["curve"][-1]["step"] == 2 for row in rows.values())
    growth = {name: row["decoding"][1]["cache_mb"] - row["decoding"][0]["cache_mb"] for name, row in rows.items()}
    # per token: gpt-tiny keeps 2 layers x 4 heads of keys and values, yoco-tiny one set of 2 key/value heads
    assert abs(growth["gpt-tiny+position=rope"] / growth["yoco-tiny"] - 4) < 1e-6
    assert growth["gret-tiny"] == 0 and growth["diff-tiny"] == growth["bitnet-tiny"] == growth["gpt-tiny+position=rope"]


def test_compare_runs_the_newer_models_and_transnormer_on_mqar(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", *NEWER, "tnl-tiny", "--task", "mqar", "--task-options", "vocab_size=64", "pairs=4", "--seq-len",
                 "32", "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--contexts", "16", "48",
                 "--decode-steps", "1", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads((out / "compare.json").read_text())["models"]}
    assert list(rows) == [*NEWER, "tnl-tiny"] and all(0 <= r["accuracy"] <= 1 for r in rows.values())
    growth = {name: (r["decoding"][1]["cache_mb"] - r["decoding"][0]["cache_mb"]) * 2**20 for name, r in rows.items()}
    # 32 more tokens: the fixed-state mixers hold the same bytes; yoco-tiny one set of 2 key/value heads of 16
    # (K and V, fp32), diff-tiny and bitnet-tiny 2 layers of 4 heads of 16
    assert growth["gret-tiny"] == growth["tnl-tiny"] == 0
    assert growth["yoco-tiny"] == 32 * 2 * 16 * 2 * 4 and growth["diff-tiny"] == growth["bitnet-tiny"] == 32 * 2 * 4 * 16 * 2 * 4


def test_seeds_give_every_run_and_the_mean_with_its_t_interval(tmp_path, capsys):
    """--seeds 3: three runs per model in seed-<s> folders; the row's loss is their mean and its 95% Student-t
    interval (t₀.₉₇₅,₂ = 4.303), written out here from the runs' own losses."""
    import statistics

    out = tmp_path / "cmp"
    assert main(["compare", "gpt-tiny+position=rope", "samba-tiny", "--seeds", "3", "--seed", "5", "--seq-len", "32",
                 "--steps", "3", "--batch-size", "2", "--eval-every", "3", "--contexts", "8", "--decode-steps", "1",
                 "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads((out / "compare.json").read_text())["models"]}
    for name, row in rows.items():
        losses = [run["val_loss"] for run in row["runs"]]
        assert [run["seed"] for run in row["runs"]] == [5, 6, 7] and len(set(losses)) == 3  # seeds differ
        half = 4.303 * statistics.stdev(losses) / 3 ** 0.5
        assert abs(row["val_loss"] - statistics.fmean(losses)) < 1e-12
        assert abs(row["val_loss_low"] - (row["val_loss"] - half)) < 1e-12
        assert abs(row["val_loss_high"] - (row["val_loss"] + half)) < 1e-12
        assert row["tokens_per_s_low"] <= row["tokens_per_s_mean"] <= row["tokens_per_s_high"]
        folder = out / name.replace("+", "_")
        assert sorted(path.name for path in folder.iterdir()) == ["seed-5", "seed-6", "seed-7"]
    assert (out / "compare_val_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "over 3 seeds" in capsys.readouterr().out
    assert main(["compare", "gpt-tiny", "--seeds", "0", "--out", str(tmp_path / "y")]) == 2
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err


def test_the_t_quantiles_and_intervals():
    from scaleformer.stats import mean_interval, t_quantile_975

    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert abs(t_quantile_975(31) - 2.0395) < 2e-4 and abs(t_quantile_975(120) - 1.9799) < 2e-4
    single = mean_interval([2.5])
    assert (single.mean, single.low, single.high, single.n) == (2.5, 2.5, 2.5, 1)
    pair = mean_interval([1.0, 3.0])  # s = √2, half width = 12.706 · √2 / √2
    assert pair.mean == 2.0 and abs(pair.half_width - 12.706) < 1e-12


def test_a_learning_rate_sweep_keeps_the_best_rate_and_every_run(tmp_path, capsys):
    """--lrs: each model at each rate (lr-<rate> folders, seeds inside), the row the best rate's mean (lowest
    validation loss), its ``sweep`` every rate's mean and interval with its runs."""
    import statistics

    out = tmp_path / "cmp"
    assert main(["compare", "gpt-tiny", "--lrs", "1e-4", "3e-3", "--seeds", "2", "--seq-len", "32", "--steps", "4",
                 "--batch-size", "2", "--warmup", "1", "--eval-every", "4", "--contexts", "8", "--decode-steps", "1",
                 "--out", str(out)]) == 0
    row = json.loads((out / "compare.json").read_text())["models"][0]
    means = {entry["lr"]: entry["val_loss"] for entry in row["sweep"]}
    assert sorted(means) == [1e-4, 3e-3] and row["lr"] == min(means, key=means.get)
    for entry in row["sweep"]:
        assert [run["seed"] for run in entry["runs"]] == [0, 1]
        assert abs(entry["val_loss"] - statistics.fmean(run["val_loss"] for run in entry["runs"])) < 1e-12
        assert entry["val_loss_low"] < entry["val_loss"] < entry["val_loss_high"]
    assert row["val_loss"] == means[row["lr"]] and row["decoding"]
    assert sorted(p.name for p in (out / "gpt-tiny").iterdir()) == ["lr-0.0001", "lr-0.003"]
    assert sorted(p.name for p in (out / "gpt-tiny" / "lr-0.003").iterdir()) == ["seed-0", "seed-1"]
    assert "best lr" in capsys.readouterr().out
    assert main(["compare", "gpt-tiny", "--lrs", "1e-3", "1e-3", "--out", str(tmp_path / "y")]) == 2
    assert "--lrs must be distinct rates > 0" in capsys.readouterr().err


def test_pairwise_verdicts_need_the_seeds_intervals_to_separate():
    from scaleformer.compare import pairwise_verdicts

    runs = [{}, {}, {}]
    rows = [{"model": "a", "val_loss": 1.0, "val_loss_low": 0.9, "val_loss_high": 1.1, "runs": runs},
            {"model": "b", "val_loss": 1.5, "val_loss_low": 1.4, "val_loss_high": 1.6, "runs": runs},
            {"model": "c", "val_loss": 1.05, "val_loss_low": 0.8, "val_loss_high": 1.3, "runs": runs},
            {"model": "one seed", "val_loss": 0.5}]
    lines = pairwise_verdicts(rows)
    assert lines[0] == "verdict: a's validation loss below b's: held"
    assert lines[1].startswith("verdict: a's validation loss below c's: undecided (about ")
    assert lines[2] == "verdict: c's validation loss below b's: held"
    assert len(lines) == 3  # a model of one run has no interval: no verdict
    accuracy = [{"model": "x", "accuracy": 0.4, "accuracy_low": 0.35, "accuracy_high": 0.45, "runs": runs},
                {"model": "y", "accuracy": 0.9, "accuracy_low": 0.85, "accuracy_high": 0.95, "runs": runs}]
    assert pairwise_verdicts(accuracy) == ["verdict: y's accuracy above x's: held"]
