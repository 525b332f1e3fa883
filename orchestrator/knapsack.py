"""Multiple-choice knapsack: pick one option per item, maximizing total value within a
total cost budget. Exact dynamic programming over integer costs (numpy, O(items x
options x budget)); used to seed the search from the sensitivity table, in the spirit of
HAWQ-V3's integer program for bit allocation (Yao et al., 2021).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Option = tuple[int, float]  # (cost, value)


def solve(items: Sequence[Sequence[Option]], budget: int) -> list[int] | None:
    """Indices of the chosen option per item, maximizing the summed value with summed cost
    <= budget; None when even the cheapest choices exceed it. Ties go to lower cost, then
    to the earlier option. Costs must be non-negative integers."""
    if budget < 0:
        return None
    width = budget + 1
    best = np.zeros(width)  # best value using the items so far, at exactly <= b cost
    choices = []
    for options in items:
        new = np.full(width, -np.inf)
        pick = np.full(width, -1, dtype=np.int64)
        for j, (cost, value) in enumerate(options):
            if cost < 0:
                raise ValueError("knapsack costs must be non-negative")
            if cost > budget:
                continue
            shifted = np.full(width, -np.inf)
            shifted[cost:] = best[: width - cost] + value
            better = shifted > new
            new[better], pick[better] = shifted[better], j
        best = new
        choices.append(pick)
    end = int(np.argmax(best))  # the first maximum: the lowest cost reaching the best value
    if not np.isfinite(best[end]):
        return None
    chosen = []
    for options, pick in zip(reversed(items), reversed(choices), strict=True):
        j = int(pick[end])
        chosen.append(j)
        end -= options[j][0]
    return chosen[::-1]
