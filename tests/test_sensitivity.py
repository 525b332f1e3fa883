"""Sensitivity probes and knapsack seeding (pure parts; the search test runs them on Ray)."""

from __future__ import annotations

import pandas as pd
import pytest

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

    def map(self, policies, done=None, context=None, deadline=None):
        results = []
        for i, policy in enumerate(policies):
            moved = [k for k, v in policy.items() if v not in (32, 1.0)]
            failed = self.failing in moved and not self.calls
            results.append({"metric": None, "error": "RuntimeError: shapes differ"} if failed
                           else {"metric": 0.9, "error": None})  # fmt: skip
            if done is not None:
                done(i, results[-1])
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
    # (the reference value of each knob is the unchanged model: known, never probed)
    again = table_for("digits-cnn", space, {}, pool, 0.99)
    assert pool.calls == [len(probes(space)) - len(space.searchable), n_failing]
    assert again["metric"].notna().all()
    assert list(zip(again["knob"], again["value"], strict=True)) == [
        (k, float(v)) for k, v, _ in probes(space)]  # fmt: skip
    assert "failed" not in capsys.readouterr().err


def test_the_schedule_fits_the_budget_and_probes_the_largest_knobs_first():
    from orchestrator.sensitivity import schedule

    space = _space()
    full = schedule(space)  # no budget: every probe but the reference values, on all the data
    assert full.share == 1.0 and len(full.probes) == full.total
    assert full.total == len(probes(space)) - len(space.searchable)
    assert schedule(space, budget=full.total).share == 1.0  # fits: unchanged
    weight = {k.name: space.profile.layer(k.layers[0]).numel for k in space.searchable}
    for budget, batches in [(10, 6), (3, 6), (5, None), (1, 3)]:
        plan = schedule(space, budget=budget, batches=batches)
        assert plan.evaluations <= budget  # the reference probe included
        if batches:  # whole batches, at least one
            assert plan.share * batches == round(plan.share * batches) >= 1
        picked = {}
        for knob, value, _ in plan.probes:
            picked.setdefault(knob, []).append(value)
        # round by round: a knob gets a second value only once every knob has one, the
        # heaviest knobs first; each knob's first probe is its smallest value
        by_weight = sorted(weight, key=lambda k: -weight[k])
        assert list(picked) == [k for k in probes_order(plan) if k in picked]
        assert set(picked) == set(by_weight[: len(picked)])
        if len(picked) < len(weight):
            assert all(len(v) == 1 for v in picked.values())
        for knob, values in picked.items():
            assert min(values) == min(space.by_name[knob].choices)


def probes_order(plan):
    return list(dict.fromkeys(k for k, _, _ in plan.probes))


def test_a_partly_probed_knob_follows_its_kinds_prior_between_probes():
    from orchestrator.proposals import LossModel
    from search_spaces.kinds import kind_of

    space = _space()
    knob = next(k for k in space.searchable if k.kind == "bits")
    # probed at its smallest value only (a 0.2 drop); the reference row is the base metric
    table = pd.DataFrame([{"knob": knob.name, "value": 2.0, "metric": 0.79},
                          {"knob": knob.name, "value": 32.0, "metric": 0.99}])  # fmt: skip
    loss = LossModel.from_table(space, table, 0.99)
    prior = kind_of(knob).prior_loss
    for bits in (3, 4, 8):  # 4x less per bit, as the prior says, not a line from 2 to 32
        assert loss(knob, bits) == pytest.approx(0.2 * prior(bits) / prior(2), rel=1e-3, abs=1e-5)
    assert loss(knob, 2) == pytest.approx(0.2, abs=1e-5)
