"""How stale what a module consumed was, summarised for the epoch records."""

from __future__ import annotations

import collections


def staleness_summary(counts: collections.Counter) -> dict:
    """Mean, max and the histogram {staleness: count} of everything consumed so far."""
    n = sum(counts.values())
    if not n:
        return {"mean": None, "max": None, "histogram": {}}
    return {
        "mean": sum(s * c for s, c in counts.items()) / n,
        "max": max(counts),
        "histogram": {str(s): c for s, c in sorted(counts.items())},
    }
