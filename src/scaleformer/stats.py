"""Intervals for results over seeds: the mean of a few runs and its Student-t confidence interval.

A comparison drawn from one seed cannot tell an architecture from an initialisation; with n seeds the mean's
95% interval is mean ± t₀.₉₇₅,ₙ₋₁ · s / √n (s the sample standard deviation), which assumes the runs'
results are roughly normal around their mean (final losses of small models are).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["MeanInterval", "mean_interval", "t_quantile_975"]

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
