"""Multi-fidelity evaluation ("data pruning"): score a candidate on growing prefixes of
the validation batches and stop when it cannot reach the front.

After a prefix of n samples with metric m, a Hoeffding bound gives, with probability at
least 1 - error_rate, a full-data metric below m + range * sqrt(ln(1 / error_rate) / 2n)
(for a metric that averages per-sample scores in `metric_range`, as accuracy does). If
some front point is no larger and scores above that bound, the candidate would not
reach the front: it stops there, recorded PRUNED with the fidelity reached. So a
candidate that would have reached the front is stopped with probability at most
`error_rate` at each check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FidelitySettings:
    steps: tuple[float, ...] = (0.25, 0.5, 1.0)  # prefixes of the validation batches
    error_rate: float = 0.05
    metric_range: tuple[float, float] = (0.0, 1.0)


def upper_bound(metric: float, samples: int, settings: FidelitySettings) -> float:
    low, high = settings.metric_range
    if samples <= 0:
        return high
    return metric + (high - low) * math.sqrt(math.log(1 / settings.error_rate) / (2 * samples))


def dominated(size: int, bound: float, front: Sequence[tuple[int, float]]) -> bool:
    """Some front point is no larger and scores above the candidate's upper bound."""
    return any(front_size <= size and front_metric > bound for front_size, front_metric in front)


def prefix_lengths(batches: int, steps: Sequence[float]) -> list[int]:
    """Distinct prefix lengths in batches for the fractions, always ending with all."""
    lengths = sorted({max(1, min(batches, math.ceil(f * batches))) for f in steps} | {batches})
    return lengths
