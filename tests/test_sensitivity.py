"""Sensitivity probes and knapsack seeding (pure parts; the search test runs them on Ray)."""

from __future__ import annotations

import pandas as pd

from orchestrator.config import make_config
from orchestrator.prepare import build_space
from orchestrator.sensitivity import KEEP_GRID, probe_values, probes, reference, seed_policies
from search_spaces.cost import policy_cost
from search_spaces.policy import Policy


def _space():
    return build_space(make_config({"task": "digits-cnn"}))[2]


def test_each_probe_moves_exactly_one_knob():
    space = _space()
    base = Policy.from_values(space, reference(space))
    found = probes(space)
    for knob, _value, policy in found:
        changed = [k for k in policy if policy[k] != base[k]]
        assert changed in ([], [knob])  # [] when the value is the reference itself
    for knob in space.searchable:
        values = probe_values(knob)
        assert min(knob.choices) in values and max(knob.choices) in values
        assert len(values) <= max(KEEP_GRID, len(knob.choices) if knob.kind == "bits" else 0)


def test_seeds_trade_size_for_the_least_metric_drop():
    space = _space()
    rows = []
    for knob, value, policy in probes(space):
        # a synthetic table: lower values cost metric in proportion to how small they are
        drop = 0.0 if value >= max(space.by_name[knob].choices) else 0.05 / value
        rows.append({"knob": knob, "value": value, "metric": 0.99 - drop,
                     **policy_cost(space, policy).as_dict()})  # fmt: skip
    seeds = seed_policies(space, pd.DataFrame(rows), 0.99)
    assert len(seeds) >= 3
    sizes = []
    for params in seeds:
        assert set(params) == {k.name for k in space.searchable}
        for name, value in params.items():
            assert value in space.by_name[name].choices  # the sampler can enqueue it as is
        sizes.append(policy_cost(space, Policy.from_values(space, params)).size_bytes)
    assert len(set(sizes)) == len(sizes)  # distinct models across the budget sweep


class _Pool:
    """A stand-in for the worker pool (this module's unit test): fails the probes of one
    knob on its first pass, scores the rest by the policy's bits."""

    def __init__(self, failing: str) -> None:
        self.failing, self.calls = failing, []

    def map(self, policies, done=None):
        results = []
        for policy in policies:
            moved = [k for k, v in policy.items() if v not in (32, 1.0)]
            failed = self.failing in moved and not self.calls
            results.append({"metric": None, "error": "RuntimeError: shapes differ"} if failed
                           else {"metric": 0.9, "error": None})  # fmt: skip
            if done is not None:
                done(results[-1])
        self.calls.append(len(policies))
        return results


def test_failed_probes_are_reported_cached_around_and_measured_again(tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    from orchestrator.sensitivity import table_for

    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    space = _space()
    failing = space.searchable[0].name
    pool = _Pool(failing)
    table = table_for("digits-cnn", space, {}, pool, 0.99)
    # every probe moving that knob failed (its reference value moves nothing)
    n_failing = sum(1 for v in probe_values(space.searchable[0]) if v not in (32, 1.0))
    assert table["metric"].isna().sum() == n_failing
    err = capsys.readouterr().err
    assert f"{n_failing} of {len(probes(space))} probes failed" in err
    assert f"first: {failing}" in err and "shapes differ" in err
    # a later study: only the failed probes run again; the table is whole and in order
    again = table_for("digits-cnn", space, {}, pool, 0.99)
    assert pool.calls == [len(probes(space)), n_failing]
    assert again["metric"].notna().all()
    assert list(zip(again["knob"], again["value"], strict=True)) == [
        (k, float(v)) for k, v, _ in probes(space)]  # fmt: skip
    assert "failed" not in capsys.readouterr().err
