"""Verdicts that survive noise: a method "wins" against another only when the
95 % interval of their paired difference excludes zero.

Runs are paired by seed (the same seed gives both methods the same data
order, calibration images and fine-tuning), so what varies with the seed
cancels in each difference.  With n paired seeds the interval is the mean
difference ± t(0.975, n - 1) · sd / √n; with one seed there is no interval
and every verdict is a tie.

A test top-1 moves in steps of one test image (``resolution``: 100 / test
images, in points), so a few seeds' differences often coincide on that grid —
two seeds that each differ by one image of 360 have a sample deviation of 0 and
an interval of width 0, which would call a one-image difference a win.  The
deviation is therefore never taken below what rounding to the grid alone
gives a difference of two such values, resolution / √6 (two uniform rounding
errors of variance resolution² / 12 each).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    """``ours`` minus ``other`` (points of test top-1), paired over ``seeds``."""

    mean: float
    low: float  # the 95 % interval; ±inf with fewer than 2 pairs
    high: float
    seeds: tuple[int, ...]

    @property
    def verdict(self) -> str:
        """"wins" or "loses" when the interval excludes 0, else "tie"."""
        if self.low > 0:
            return "wins"
        if self.high < 0:
            return "loses"
        return "tie"

    def text(self) -> str:
        if len(self.seeds) < 2:
            return f"{self.mean:+.2f} points (one seed: no interval)"
        return (f"{self.mean:+.2f} points (paired over {len(self.seeds)} seeds, {100 * CONFIDENCE:.0f} % interval "
                f"{self.low:+.2f} to {self.high:+.2f})")


def paired_difference(ours: list[dict], other: list[dict], key: str = "top1", resolution: float = 0.0) -> Difference:
    """The paired difference of ``key`` between two methods' runs (dicts with
    ``seed`` and ``key``), over the seeds both have; ``resolution``: the step
    ``key`` moves in (one test image's points), the floor of the deviation."""
    theirs = {r["seed"]: r[key] for r in other}
    pairs = sorted((r["seed"], r[key] - theirs[r["seed"]]) for r in ours if r["seed"] in theirs)
    if not pairs:
        raise ValueError("the two methods have no seed in common")
    seeds = tuple(s for s, _ in pairs)
    diffs = [d for _, d in pairs]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Difference(mean, -math.inf, math.inf, seeds)
    deviation = max(statistics.stdev(diffs), resolution / math.sqrt(6))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1)) * deviation / math.sqrt(len(diffs))
    return Difference(mean, mean - half, mean + half, seeds)
