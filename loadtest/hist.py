"""A small mergeable latency histogram (HdrHistogram-like, ~1% relative precision).

Values are recorded in microseconds into logarithmic buckets, so a histogram is a
fixed-size list of counters: cheap to update in the hot receive path, cheap to
ship between processes (sparse dict) and exact to merge (bucket-wise sum).
"""

from __future__ import annotations

import math
from typing import Any

#: bucket growth factor: each bucket is 1% wider than the previous one
_GROWTH = 1.01
_SCALE = 1.0 / math.log(_GROWTH)
#: 1 us .. ~1000 s
NBUCKETS = int(math.log(1e9) * _SCALE) + 2


class Histogram:
    """Counts of latencies (microseconds) in ~1%-wide logarithmic buckets."""

    __slots__ = ("counts", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def record(self, us: float) -> None:
        """Add one value in microseconds (values below 1 us land in the first bucket)."""
        idx = int(math.log(us) * _SCALE) + 1 if us >= 1.0 else 0
        if idx >= NBUCKETS:
            idx = NBUCKETS - 1
        self.counts[idx] += 1
        self.count += 1
        self.total += us
        if us > self.max:
            self.max = us
        if us < self.min:
            self.min = us

    def merge(self, other: "Histogram") -> "Histogram":
        """Add ``other``'s counts into this histogram; returns self."""
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)
        return self

    def percentile(self, p: float) -> float:
        """Value (us) at percentile ``p`` (0..100): the upper edge of its bucket, capped at max."""
        if not self.count:
            return math.nan
        rank = max(1, math.ceil(self.count * p / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                upper = 1.0 if i == 0 else math.exp(i / _SCALE)
                return min(upper, self.max)
        return self.max

    def summary_ms(self) -> dict[str, Any]:
        """p50/p90/p99/p999/max/mean in milliseconds, plus the sample count."""
        if not self.count:
            return {"count": 0}
        ms = lambda us: round(us / 1000.0, 3)  # noqa: E731
        return {
            "count": self.count,
            "p50_ms": ms(self.percentile(50)),
            "p90_ms": ms(self.percentile(90)),
            "p99_ms": ms(self.percentile(99)),
            "p999_ms": ms(self.percentile(99.9)),
            "max_ms": ms(self.max),
            "mean_ms": ms(self.total / self.count),
        }

    def to_wire(self) -> dict[str, Any]:
        """A compact picklable/JSON form (sparse buckets)."""
        return {
            "b": {i: c for i, c in enumerate(self.counts) if c},
            "n": self.count,
            "t": self.total,
            "lo": self.min if self.count else None,
            "hi": self.max,
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Histogram":
        h = cls()
        for i, c in data["b"].items():
            h.counts[int(i)] = c
        h.count = data["n"]
        h.total = data["t"]
        h.min = data["lo"] if data["lo"] is not None else math.inf
        h.max = data["hi"]
        return h
