"""The knapsack solver is optimal: checked against brute force on small random instances."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.knapsack import solve

options = st.lists(st.tuples(st.integers(0, 12), st.floats(-5, 5, allow_nan=False)),
                   min_size=1, max_size=4)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(items=st.lists(options, min_size=1, max_size=4), budget=st.integers(0, 40))
def test_matches_brute_force(items, budget):
    feasible = [
        combo for combo in itertools.product(*(range(len(o)) for o in items))
        if sum(items[i][j][0] for i, j in enumerate(combo)) <= budget
    ]  # fmt: skip
    chosen = solve(items, budget)
    if not feasible:
        assert chosen is None
        return
    assert chosen is not None
    cost = sum(items[i][j][0] for i, j in enumerate(chosen))
    value = sum(items[i][j][1] for i, j in enumerate(chosen))
    best = max(sum(items[i][j][1] for i, j in enumerate(c)) for c in feasible)
    assert cost <= budget
    assert abs(value - best) <= 1e-9 * max(1.0, abs(best))


def test_prefers_the_valuable_option_that_fits():
    items = [[(0, 0.0), (5, 3.0)], [(0, 0.0), (5, 2.0)]]
    assert solve(items, 5) == [1, 0]
    assert solve(items, 10) == [1, 1]
    assert solve(items, 4) == [0, 0]
    assert solve([[(3, 1.0)]], 2) is None
