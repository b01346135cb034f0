"""What a timing verdict rests on: repeated, interleaved rounds (never one measurement), their spread, and
intervals for ratios and slopes; and the progress a reproduction shows while it works. Fast, in the
default suite: the verdict logic is checked on synthetic timings, where the right answer is known."""

import math

import numpy as np
import pytest

from scaleformer.bench.common import Timing, ratio_interval, slope_interval, time_interleaved


def test_timing_reads_the_median_and_quartiles_of_its_rounds():
    timing = Timing((0.5, 0.1, 0.3, 0.2, 0.4))
    assert timing.median == 0.3 and timing.low == 0.2 and timing.high == 0.4
    assert str(timing) == "300 ms (IQR 200–400, 5 rounds)"
    assert timing.as_dict() == {"median_s": 0.3, "q25_s": 0.2, "q75_s": 0.4, "rounds_s": [0.5, 0.1, 0.3, 0.2, 0.4]}


def test_calls_take_turns_round_by_round_after_one_warm_up_each():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    timings = time_interleaved(calls, rounds=5, repeats=2)
    # warm-ups, then each round: a's two repeats, then b's
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 5
    assert set(timings) == {"a", "b"} and all(len(t.rounds) == 5 and min(t.rounds) >= 0 for t in timings.values())


@pytest.mark.parametrize("rounds, repeats", [(1, 5), (4, 1), (5, 0)])
def test_too_few_rounds_are_refused(rounds, repeats):
    with pytest.raises(ValueError, match="at least 5 rounds"):
        time_interleaved({"a": lambda: None}, rounds=rounds, repeats=repeats)


def test_a_ratio_carries_the_widest_interval_the_quartiles_allow():
    slow, fast = Timing((2.0, 2.0, 2.2, 2.4, 2.4)), Timing((1.0, 1.0, 1.1, 1.2, 1.2))
    ratio, low, high = ratio_interval(slow, fast)
    assert ratio == pytest.approx(2.0) and low == pytest.approx(2.0 / 1.2) and high == pytest.approx(2.4 / 1.0)


def test_slope_interval_is_exact_without_noise_and_covers_the_truth_with_it():
    xs = [256, 512, 1024, 2048]
    exact = slope_interval(xs, [Timing((1e-9 * x**2,) * 5) for x in xs])
    assert exact == pytest.approx((2.0, 2.0, 2.0))
    rng = np.random.default_rng(0)
    noisy = [Timing(tuple(1e-9 * x**2 * np.exp(rng.normal(0, 0.2, 7)))) for x in xs]
    slope, low, high = slope_interval(xs, noisy)
    assert low < slope < high and low < 2.0 < high and high - low > 0.05
    assert slope_interval([256], [Timing((1.0,) * 5)]) is None  # one point has no slope


def _decoding(medians_and_spread):
    return [{"context": context, "step_ms": median, "step_ms_q25": median - spread, "step_ms_q75": median + spread,
             "rounds": 5, "rounds_ms": [median - spread, median - spread, median, median + spread, median + spread]}
            for context, (median, spread) in zip((64, 256), medians_and_spread)]


@pytest.mark.parametrize("retnet, transformer, held", [
    ([(1.0, 0.01), (1.0, 0.01)], [(1.0, 0.01), (2.0, 0.01)], True),  # flat against doubling: held
    ([(1.0, 0.01), (1.0, 0.01)], [(1.0, 0.2), (1.1, 0.2)], None),  # the transformer's growth within the noise
    ([(1.0, 0.01), (3.0, 0.01)], [(1.0, 0.01), (1.5, 0.01)], False),  # RetNet slows down more: did not hold
    ([(1.0, 0.01), (0.7, 0.01)], [(1.0, 0.01), (0.9, 0.01)], None),  # neither slows down: nothing shown
])
def test_retnet_decode_time_verdict_needs_its_effect_beyond_the_noise(retnet, transformer, held):
    from scaleformer.reproduce.retnet import _decode_time_verdict

    verdict = _decode_time_verdict(_decoding(retnet), _decoding(transformer))
    assert verdict.held is held and "5 rounds" in verdict.measured and "IQR" in verdict.measured


def _timing_rows(lengths, dense_power, dilated_power, noise, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        row = {"length": n}
        for name, power in (("dense", dense_power), ("dilated", dilated_power)):
            rounds = [1e-8 * n**power * math.exp(rng.normal(0, noise)) for _ in range(5)]
            row[f"{name}_s"], row[f"{name}_rounds_s"] = float(np.median(rounds)), rounds
        rows.append(row)
    return rows


@pytest.mark.parametrize("dense_power, dilated_power, noise, held", [
    (2.0, 1.0, 0.02, True), (1.2, 1.0, 0.02, False), (2.0, 1.6, 0.02, False), (1.55, 1.0, 0.5, None)])
def test_longnet_cost_verdict_reads_the_slopes_intervals(dense_power, dilated_power, noise, held):
    from scaleformer.reproduce.longnet import _cost_verdict

    verdict = _cost_verdict(_timing_rows([256, 512, 1024, 2048], dense_power, dilated_power, noise))
    assert verdict.held is held and "95% CI" in verdict.measured


def test_longvit_speedup_verdict_reads_the_ratio_intervals():
    from scaleformer.reproduce.longvit_scaling import _speedup_verdict

    def rows(dense_over_dilated, spread):
        return [{"patches": patches, "dense_s": ratio, "dilated_s": 1.0,
                 "dense_rounds_s": [ratio * (1 + spread * d) for d in (-1, -1, 0, 1, 1)],
                 "dilated_rounds_s": [1 + spread * d for d in (-1, -1, 0, 1, 1)]}
                for patches, ratio in zip((1024, 4096), dense_over_dilated)]

    assert _speedup_verdict(rows((1.2, 4.0), 0.01)).held is True
    assert _speedup_verdict(rows((1.2, 2.0), 0.01)).held is False  # below 3× at the largest
    assert _speedup_verdict(rows((1.2, 3.2), 0.2)).held is None  # 3.2× but the noise reaches below 3×


def test_progress_plans_every_step_and_takes_an_early_stop_off_the_plan(capsys):
    import scaleformer as sf
    from scaleformer.reproduce.common import Progress, train

    cfg = sf.load_preset("gpt-tiny", vocab_size=259, layers=1, embed_dim=16, heads=2, ffn_dim=32)
    with Progress(2 * 10) as progress:
        train(cfg, steps=10, lr=1e-3, batch_size=2, seq_len=8, progress=progress, label="first")
        assert (progress.bar.n, progress.bar.total) == (10, 20)
        record = train(cfg, steps=10, lr=1e-3, batch_size=2, seq_len=8, progress=progress, label="stops early",
                       callback=lambda step, model: step == 3)
        assert record["steps"] == 3 and (progress.bar.n, progress.bar.total) == (13, 13)
        progress.write("  a result line")
    captured = capsys.readouterr()
    assert "a result line" in captured.out and "stops early" in captured.err and "13/13" in captured.err


# The smallest run of each reproduction: a few steps (too few to decide anything), every code path taken.
TINY = {"deepnet": ["steps=2", "depths=[2]"], "subln": ["steps=2", "lrs=[0.001]"], "xpos": ["steps=2"],
        "retnet": ["steps=2"], "xmoe": ["steps=4", "snapshots=2"], "longnet": ["steps=2", "passkey_steps=2"],
        "mqar": ["steps=2"], "s2": ["steps=2"], "icl": ["steps=2"], "longvit-scaling": ["sizes=[256,512]"],
        "ruler": ["steps=2"]}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_reproduction_shows_its_progress_and_finishes_its_plan(name, tmp_path, capsys):
    import json
    import re

    from scaleformer.cli import main
    from scaleformer.reproduce import REPRODUCTIONS

    assert set(TINY) == set(REPRODUCTIONS)
    assert main(["reproduce", name, "--quick", "--out", str(tmp_path), "--set", *TINY[name]]) == 0
    captured = capsys.readouterr()
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert payload["verdicts"] and all(v["held"] in (True, False, None) for v in payload["verdicts"])
    # Every bar ends complete: the plan counted the work that ran, no more, no less.
    finals = re.findall(r"([\d.]+[kMG]?)/([\d.]+[kMG]?) \[", captured.err)
    assert finals and finals[-1][0] == finals[-1][1]
    assert re.search(r"<\d\d:\d\d", captured.err)  # the time-left estimate
    assert re.search(r"done in \d+ s", captured.out)
