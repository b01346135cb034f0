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
    assert "comparison (same data" in capsys.readouterr().out


def test_compare_refuses_bad_models_before_training(tmp_path, capsys):
    assert main(["compare", "gpt-tiny", "no-such-preset", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "gpt-tiny").exists()
