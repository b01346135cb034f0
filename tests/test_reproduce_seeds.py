"""``scaleformer reproduce NAME --seeds N --lrs ...``: every claim decided over seeds by the intervals of the two
numbers it compares (:func:`scaleformer.reproduce.common.combine_seeds`), and learning-rate sweeps that keep
each model's best rate."""

import json

from scaleformer.cli import main
from scaleformer.reproduce.common import combine_seeds


def _record(claim, held, evidence=None):
    return {"claim": claim, "measured": "…", "held": held, "evidence": evidence}


def test_a_claim_holds_over_seeds_only_when_its_intervals_separate():
    # lower side 1.0, 1.1, 0.9 (mean 1.0, s 0.1: 95% CI 1.0 ± 4.303·0.1/√3 = 0.752 to 1.248)
    separated = [[_record("a", True, (low, high))] for low, high in ((1.0, 2.0), (1.1, 2.1), (0.9, 1.9))]
    (verdict,) = combine_seeds(separated)
    assert verdict.held is True and "over 3 seeds" in verdict.measured and "0.7516 to 1.248" in verdict.measured
    (verdict,) = combine_seeds([[_record("a", True, (high, low))] for low, high in ((1.0, 2.0), (1.1, 2.1), (0.9, 1.9))])
    assert verdict.held is False and "did not hold" in verdict.measured
    # Each single run says "held" (its margin rule), but the intervals overlap: undecided, with a seed count.
    overlapping = [[_record("a", True, pair)] for pair in ((1.0, 1.2), (1.3, 1.1), (0.9, 1.15))]
    (verdict,) = combine_seeds(overlapping)
    assert verdict.held is None and "undecided (about" in verdict.measured and "seeds per side would decide" in verdict.measured
    # the per-seed differences 0.2, -0.2, 0.25: mean 0.08333, beside the verdict (which does not use them)
    assert "paired by seed, the second exceeds the first by 0.08333" in verdict.measured


def test_a_claim_without_numbers_counts_the_seeds_that_held_it():
    (held,) = combine_seeds([[_record("b", True)], [_record("b", True)]])
    (mixed,) = combine_seeds([[_record("b", True)], [_record("b", False)]])
    (refuted,) = combine_seeds([[_record("b", False)], [_record("b", False)]])
    assert (held.held, mixed.held, refuted.held) == (True, None, False)
    assert "held in 1, did not hold in 1, undecided in 0 of 2 seeds" in mixed.measured
    # A claim one seed's run did not make (e.g. it depends on what trained) is never called held.
    partial = combine_seeds([[_record("b", True), _record("c", True)], [_record("b", True)]])
    assert [v.claim for v in partial] == ["b", "c"] and partial[1].held is None
    assert "measured in 1 of 2 runs" in partial[1].measured


def test_reproduce_over_seeds_and_rates_writes_each_run_and_the_combined_verdicts(tmp_path, capsys):
    assert main(["reproduce", "retnet", "--quick", "--out", str(tmp_path), "--seeds", "2", "--lrs", "0.001", "0.003",
                 "--set", "steps=3", "contexts=[16,32]", "decode_steps=2", "rounds=5"]) == 0
    out = capsys.readouterr().out
    per_seed = [json.loads((tmp_path / f"seed-{seed}" / "retnet.json").read_text()) for seed in (0, 1)]
    for payload in per_seed:
        assert payload["settings"]["lrs"] == [0.001, 0.003]
        for run in payload["runs"].values():  # each model at its best rate of the two
            assert set(run["final_loss_by_lr"]) == {"0.001", "0.003"}
            assert run["final_loss"] == min(run["final_loss_by_lr"].values()) and run["lr"] in (0.001, 0.003)
    # different seeds train differently
    assert per_seed[0]["runs"]["RetNet"]["final_loss"] != per_seed[1]["runs"]["RetNet"]["final_loss"]
    combined = json.loads((tmp_path / "retnet-seeds.json").read_text())
    assert combined["seeds"] == [0, 1] and set(combined["per_seed"]) == {"0", "1"}
    verdicts = {v["claim"]: v for v in combined["verdicts"]}
    matches = verdicts["RetNet's loss matches a Transformer of the same size"]
    assert matches["measured"].startswith("over 2 seeds") and matches["held"] in (True, False, None)
    gaps = [next(v for v in run if v["claim"] == matches["claim"])["evidence"][0] for run in combined["per_seed"].values()]
    assert f"{sum(gaps) / 2:.4g}" in matches["measured"]  # the mean of the seeds' gaps
    assert "== over 2 seeds ==" in out


def test_bad_seed_and_rate_options_are_refused_before_anything_trains(tmp_path, capsys):
    def error(args):
        assert main(["reproduce", *args, "--quick", "--out", str(tmp_path)]) == 2
        return capsys.readouterr().err

    assert "--seeds takes a count >= 1" in error(["retnet", "--seeds", "0"])
    assert "reproduce xpos trains at one learning rate (--set lr=RATE); --lrs sweeps in: mqar, retnet" in error(
        ["xpos", "--lrs", "0.001"])
    assert "lrs takes a list of positive learning rates" in error(["retnet", "--lrs", "-0.001"])
    assert not any(tmp_path.iterdir())


def test_the_best_rate_is_the_best_value_and_a_diverged_run_never_wins():
    from scaleformer.reproduce.common import best_rate

    tried = {0.001: {"final_loss": 2.5}, 0.003: {"final_loss": float("nan")}, 0.01: {"final_loss": 2.1}}
    rate, record, by_lr = best_rate(tried, "final_loss", higher=False)
    assert rate == 0.01 and record is tried[0.01] and by_lr["0.001"] == 2.5 and len(by_lr) == 3
    accuracies = {0.001: {"accuracy": 0.4}, 0.003: {"accuracy": float("nan")}, 0.01: {"accuracy": 0.9}}
    assert best_rate(accuracies, "accuracy", higher=True)[0] == 0.01
    assert best_rate({0.001: {"accuracy": float("nan")}}, "accuracy", higher=True)[0] == 0.001
