"""Interval arithmetic against known values, and the verdict logic on constructed cases (scaleformer.stats)."""

import math

import pytest

from scaleformer.stats import MeanInterval, bootstrap_interval, mean_interval, verdict, wilson_interval


@pytest.mark.parametrize("k, n, low, high", [
    (7, 10, 0.3968, 0.8922),     # the textbook case (Wilson 1927; Newcombe 1998, table I: 0.3968-0.8922)
    (0, 10, 0.0, 0.2775),        # no successes: still an interval, not the point 0
    (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),   # Newcombe 1998, table I, example (e)
])
def test_wilson_interval_matches_published_values(k, n, low, high):
    interval = wilson_interval(k, n)
    assert interval.mean == k / n and interval.n == n
    assert math.isclose(interval.low, low, abs_tol=1e-4) and math.isclose(interval.high, high, abs_tol=1e-4)


def test_wilson_interval_refuses_impossible_counts():
    for k, n in ((3, 2), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(k, n)


def test_bootstrap_interval_is_seeded_holds_the_mean_and_narrows_with_more_runs():
    values = [1.0, 1.4, 0.9, 1.2, 1.1]
    first, again = bootstrap_interval(values), bootstrap_interval(values)
    assert first == again and first.low <= first.mean <= first.high
    assert first.low >= min(values) and first.high <= max(values)
    wider = bootstrap_interval(values * 4)  # the same spread, four times the runs: about half as wide
    assert wider.half_width < 0.7 * first.half_width
    assert bootstrap_interval([2.0]) == MeanInterval(2.0, 2.0, 2.0, 1)


def test_verdicts_need_separated_intervals():
    low, high = MeanInterval(1.0, 0.9, 1.1, 5), MeanInterval(1.5, 1.4, 1.6, 5)
    assert verdict(low, high).outcome == "held"
    assert verdict(high, low).outcome == "did not hold"
    overlapping = verdict(MeanInterval(1.0, 0.8, 1.2, 3), MeanInterval(1.1, 0.9, 1.3, 3))
    assert overlapping.outcome == "undecided" and overlapping.seeds_to_decide is not None


def test_seeds_to_decide_is_the_first_count_whose_intervals_separate():
    # Each side: 3 runs with standard deviation 0.1 (half width t(2) · 0.1 / √3); means 0.1 apart.
    a, b = mean_interval([0.9, 1.0, 1.1]), mean_interval([1.0, 1.1, 1.2])
    found = verdict(a, b)
    assert found.outcome == "undecided"
    n = found.seeds_to_decide
    from scaleformer.stats import t_quantile_975
    separated = lambda m: 2 * t_quantile_975(m - 1) * 0.1 / math.sqrt(m) < 0.1 - 1e-12  # noqa: E731
    assert separated(n) and not separated(n - 1)  # n = 18: t(17) = 2.110, 2·2.110·0.1/√18 = 0.0995
    assert n == 18
    # equal means: no number of seeds separates them; nor does a single run, whose spread is unknown
    assert verdict(mean_interval([1.0, 1.2]), mean_interval([1.2, 1.0])).seeds_to_decide is None
    assert verdict(mean_interval([1.0]), mean_interval([1.0, 1.2])).seeds_to_decide is None
    assert "about 18 seeds" in str(found)


def test_the_fixed_state_verdict_reports_accuracies_as_they_moved():
    """At 4 pairs 0.27 and at 16 pairs 0.99 (a rise, not a fall): the text says so, and the claim (a fall with
    pairs and a gain with width) is not held."""
    from scaleformer.reproduce.mqar import _fixed_state_verdict

    points = {(32, 4): 0.27, (64, 4): 0.27, (32, 16): 0.99, (64, 16): 0.99}
    found = _fixed_state_verdict("mamba2", lambda mixer, width, pairs: points[width, pairs],
                                 {"widths": [32, 64], "pairs": [4, 16]})
    assert "accuracy goes 0.27 → 0.99 from 4 to 16 pairs" in found.measured
    assert "takes it 0.99 → 0.99" in found.measured and found.held is not True
