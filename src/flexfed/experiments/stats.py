"""Summary statistics over seeds: mean, sample standard deviation, paired differences with a t interval.

Pure functions over lists of floats. The Student t quantile is computed here rather than taken
from scipy (not a dependency): the t CDF of an integer number of degrees of freedom has a finite
closed form (Abramowitz & Stegun 26.7.3/26.7.4), and the quantile is found by bisection on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def mean(xs: list[float]) -> float:
    if not xs:
        raise ValueError("mean of no values")
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float | None:
    """Standard deviation with n - 1 in the denominator; None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's T with ``df`` degrees of freedom (A&S 26.7.3 odd df, 26.7.4 even df)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    # The series' terms: each is the previous times cos^2(theta) * (k - 1) / k over k = 2, 4, ...
    # (even df) or k = 3, 5, ... (odd df), up to df - 2.
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(2, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term = math.cos(theta)
    total = term
    for k in range(3, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom, e.g. t(0.975, 2) = 4.303."""
    if not 0 < p < 1:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    target = abs(2 * p - 1)  # P(|T| <= q) for the upper quantile q
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):  # bisection to float precision; the CDF is monotone in t
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < target else (lo, mid)
    q = (lo + hi) / 2
    return q if p > 0.5 else -q


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences with its ``level`` t confidence interval (None bounds for n < 2)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)


def mean_interval(xs: list[float], level: float = 0.95) -> Interval:
    """Mean ± t((1 + level) / 2, n - 1) · s / √n."""
    n, m, s = len(xs), mean(xs), sample_std(xs)
    if s is None:
        return Interval(n, m, None, None, None, level)
    half = t_quantile((1 + level) / 2, n - 1) * s / math.sqrt(n)
    return Interval(n, m, s, m - half, m + half, level)


def paired_difference(treatment: dict, baseline: dict, level: float = 0.95) -> Interval | None:
    """Interval of ``treatment[k] - baseline[k]`` over the keys (seeds) both have; None if none."""
    common = sorted(set(treatment) & set(baseline))
    if not common:
        return None
    return mean_interval([treatment[k] - baseline[k] for k in common], level)
