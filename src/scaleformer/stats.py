"""Intervals for results over seeds, and verdicts that respect them.

A comparison drawn from one seed cannot tell an architecture from an initialisation; with n seeds the mean's
95% interval is mean ± t₀.₉₇₅,ₙ₋₁ · s / √n (s the sample standard deviation), which assumes the runs'
results are roughly normal around their mean (final losses of small models are). Where normality is not
to be assumed, :func:`bootstrap_interval` resamples the runs instead. An accuracy counted over n test
examples gets Wilson's score interval (:func:`wilson_interval`), which stays inside [0, 1] and is honest at
0 and n successes, where the normal approximation collapses to a point.

:func:`verdict` says "held" only when the intervals of the two sides separate in the claimed direction,
"did not hold" when they separate the other way, and "undecided" otherwise — with the number of seeds that
would separate intervals as wide as these around means this far apart.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["MeanInterval", "mean_interval", "t_quantile_975", "wilson_interval", "bootstrap_interval", "Verdict",
           "verdict"]

# t₀.₉₇₅ for 1..30 degrees of freedom (standard tables, to three decimals)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(degrees: int) -> float:
    """The 97.5% quantile of Student's t with ``degrees`` degrees of freedom (≥ 1); past 30 by the
    Cornish–Fisher expansion around the normal's 1.95996 (within 1e-4 there)."""
    if degrees < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degrees}")
    if degrees <= len(_T975):
        return _T975[degrees - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * degrees) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * degrees**2)


@dataclass(frozen=True)
class MeanInterval:
    """The mean of ``n`` values and its 95% interval [low, high] (both the mean itself when n = 1)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_interval(values: list[float]) -> MeanInterval:
    """The mean of ``values`` and its 95% Student-t interval; one value has no spread (low = high = mean)."""
    if not values:
        raise ValueError("no values to average")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return MeanInterval(mean, mean, mean, 1)
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return MeanInterval(mean, mean - half, mean + half, len(values))


Z975 = 1.959964  # the normal's 97.5% quantile


def wilson_interval(successes: int, trials: int) -> MeanInterval:
    """The share ``successes / trials`` and Wilson's 95% score interval: centre (k + z²/2) / (n + z²),
    half width z / (n + z²) · √(k (n − k) / n + z² / 4). ``n`` of the result is ``trials``."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    z2 = Z975 * Z975
    centre = (successes + z2 / 2) / (trials + z2)
    half = Z975 / (trials + z2) * math.sqrt(successes * (trials - successes) / trials + z2 / 4)
    return MeanInterval(successes / trials, max(0.0, centre - half), min(1.0, centre + half), trials)


def bootstrap_interval(values: list[float], draws: int = 2000, seed: int = 0) -> MeanInterval:
    """The mean of ``values`` and its 95% percentile-bootstrap interval (``draws`` resamples with
    replacement, a seeded generator: the same interval every time)."""
    import random

    if not values:
        raise ValueError("no values to average")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return MeanInterval(mean, mean, mean, 1)
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(draws))
    low, high = means[int(0.025 * (draws - 1))], means[int(math.ceil(0.975 * (draws - 1)))]
    return MeanInterval(mean, min(low, mean), max(high, mean), len(values))


@dataclass(frozen=True)
class Verdict:
    """A claim's outcome: "held", "did not hold" or "undecided"; for an undecided one, ``seeds_to_decide``
    estimates how many seeds a side would need for its interval to separate from the other's (None: the
    means are equal, or more than ``limit`` seeds would be needed)."""

    outcome: str
    seeds_to_decide: int | None = None

    def __str__(self) -> str:
        if self.outcome != "undecided":
            return self.outcome
        if self.seeds_to_decide is None:
            return "undecided (no feasible number of seeds would separate these intervals)"
        return f"undecided (about {self.seeds_to_decide} seeds per side would decide it)"


def verdict(lower: MeanInterval, higher: MeanInterval, limit: int = 1000) -> Verdict:
    """The claim "``lower``'s mean is below ``higher``'s" (e.g. one model's loss below another's): held when
    lower.high < higher.low, did not hold when lower.low > higher.high, else undecided. For an undecided
    claim the estimate keeps each side's spread (its half width × √n / t) and finds the smallest n whose two
    t-intervals, around the observed means, no longer overlap."""
    if lower.high < higher.low:
        return Verdict("held")
    if lower.low > higher.high:
        return Verdict("did not hold")
    gap = abs(higher.mean - lower.mean)
    spreads = [side.half_width * math.sqrt(side.n) / t_quantile_975(side.n - 1) if side.n > 1 else None
               for side in (lower, higher)]
    if gap == 0 or None in spreads:
        return Verdict("undecided", None)
    for n in range(max(lower.n, higher.n, 2), limit + 1):
        if t_quantile_975(n - 1) * (spreads[0] + spreads[1]) / math.sqrt(n) < gap:
            return Verdict("undecided", n)
    return Verdict("undecided", None)

