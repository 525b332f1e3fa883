"""The early-stopping rule: replaying full evaluations, candidates that would have reached
the front are stopped no more often than the configured error rate."""

from __future__ import annotations

import numpy as np

from orchestrator.fidelity import FidelitySettings, dominated, prefix_lengths, upper_bound


def _replay(rng, settings, candidates=400, samples=360, batch=60):
    """Candidates with true accuracies around a fixed front; each scored per sample."""
    front = [(1000, 0.90), (2000, 0.95), (4000, 0.98)]
    stopped_front_reachers = reachers = stopped = 0
    lengths = prefix_lengths(samples // batch, settings.steps)
    for _ in range(candidates):
        size = int(rng.integers(500, 5000))
        accuracy = float(rng.uniform(0.5, 1.0))
        outcomes = rng.random(samples) < accuracy  # per-sample correctness, in batch order
        full = outcomes.mean()
        reaches = not any(s <= size and m > full for s, m in front)
        reachers += reaches
        for length in lengths[:-1]:
            n = length * batch
            if dominated(size, upper_bound(outcomes[:n].mean(), n, settings), front):
                stopped += 1
                stopped_front_reachers += reaches
                break
    return stopped_front_reachers, reachers, stopped


def test_candidates_that_reach_the_front_are_rarely_stopped():
    settings = FidelitySettings()  # error rate 5%
    rng = np.random.default_rng(0)
    bad, reachers, stopped = _replay(rng, settings)
    assert reachers > 50 and stopped > 50  # the test exercises both sides
    assert bad / reachers <= settings.error_rate


def test_bound_and_dominance():
    settings = FidelitySettings(error_rate=0.05)
    bound = upper_bound(0.5, 100, settings)
    assert 0.5 < bound < 0.7
    assert upper_bound(0.5, 10_000, settings) < bound  # more data, tighter bound
    assert dominated(2000, bound, [(1000, 0.9)])
    assert not dominated(500, bound, [(1000, 0.9)])  # smaller than every front point
    assert not dominated(2000, 0.95, [(1000, 0.9)])
    assert prefix_lengths(6, (0.25, 0.5, 1.0)) == [2, 3, 6]
    assert prefix_lengths(1, (0.25, 1.0)) == [1]
