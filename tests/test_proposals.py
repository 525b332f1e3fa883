"""Uniform baselines within a budget, loss-aware repair and fill, local moves, knapsack
seeds at the budget's edge (orchestrator.proposals): pure functions of a space, no Ray."""

from __future__ import annotations

import itertools
import random
import statistics

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.budget import Budget
from orchestrator.config import make_config
from orchestrator.prepare import build_space
from orchestrator.proposals import (
    LocalShare,
    LossModel,
    Mover,
    Pricing,
    _step,
    baselines,
    budget_seeds,
    knapsack_seed,
    uniform_values,
)
from orchestrator.sensitivity import probe_values
from search_spaces.config import FLOAT_BITS


@pytest.fixture(scope="module", params=["digits-cnn", "digits-resnet", "digits-lstm"])
def space(request):
    return build_space(make_config({"task": request.param}))[2]


def _uniform_size(space, bits, keep=1.0):
    return Pricing(space, Budget()).cost(uniform_values(space, bits, keep)).size_bytes


def _keeps(space):
    return sorted({c for k in space.searchable if k.kind == "keep" for c in k.choices} | {1.0})


def test_without_limits_the_baselines_are_uniform_float_8_4_2_bits(space):
    expected = [uniform_values(space, b) for b in (32, 8, 4, 2)]
    assert baselines(Pricing(space, Budget()), within_budget=True) == expected
    # the front's landmarks whatever the budget: float, 8, 4, 2 bits
    budget = Budget(size_bytes=_uniform_size(space, 3))
    assert baselines(Pricing(space, budget), within_budget=False) == expected


@pytest.mark.parametrize("bits", [3, 4])
def test_baselines_are_the_largest_uniform_keep_per_bits_that_fits(space, bits):
    budget = Budget(size_bytes=_uniform_size(space, bits))
    pricing = Pricing(space, budget)
    found = baselines(pricing, within_budget=True)
    assert uniform_values(space, bits) in found  # the uniform policy of the budget's own size
    assert all(pricing.excess(v) <= 0 for v in found)
    bits_choices = {c for k in space.searchable if k.kind == "bits" for c in k.choices}
    keeps = _keeps(space)
    for b in bits_choices:
        fitting = [k for k in keeps if pricing.excess(uniform_values(space, b, k)) <= 0]
        if fitting:  # the largest fitting uniform keep of these bits is a baseline
            assert uniform_values(space, b, max(fitting)) in found
    # larger uniform policies than the budget's own bits never fit at keep 1.0
    assert all(pricing.excess(uniform_values(space, b)) > 0 for b in bits_choices if b > bits)


def _budgets(space):
    low, high = _uniform_size(space, 2, _keeps(space)[0]), _uniform_size(space, FLOAT_BITS)
    return st.integers(min_value=low, max_value=high).map(lambda s: Budget(size_bytes=s))


def _values(space):
    return st.fixed_dictionaries({k.name: st.sampled_from(k.choices) for k in space.searchable})


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_repair_fits_and_fill_leaves_no_step_up_that_fits(space, data):
    budget = data.draw(_budgets(space))
    pricing = Pricing(space, budget)
    mover = Mover(pricing, LossModel.prior(space))
    values = data.draw(_values(space))
    repaired = mover.repair(values)
    assert repaired is not None and pricing.excess(repaired) <= 0
    for knob in space.searchable:  # at the budget's edge: no single step up still fits
        higher = [c for c in knob.choices if c > repaired[knob.name]]
        if higher:
            assert pricing.excess({**repaired, knob.name: min(higher)}) > 0
    if pricing.excess(values) > 0:  # a repair only steps down (then fills up to the edge)
        assert pricing.load(repaired) <= 1.0


def test_repair_prefers_cheap_metric_per_byte_over_the_largest_cut(space):
    """With a loss table that makes every bits knob's 2 bits ruinous, the repair of the
    float policy into the uniform 3-bit size never picks 2 bits where 3 fits (the old
    repair stepped the largest layers to 2 bits first)."""
    budget = Budget(size_bytes=_uniform_size(space, 3))
    pricing = Pricing(space, budget)
    losses = {k.name: {c: (1.0 if k.kind == "bits" and c == 2 else 0.01 * (32 - c))
                       if k.kind == "bits" else 5 * (1 - c) for c in k.choices}
              for k in space.searchable}  # fmt: skip
    mover = Mover(pricing, LossModel(losses))
    repaired = mover.repair(uniform_values(space, FLOAT_BITS))
    assert pricing.excess(repaired) <= 0
    assert not any(repaired[k.name] == 2 for k in space.searchable if k.kind == "bits")


def test_loss_model_from_table_is_monotone_and_interpolates(space):
    bits = next(k for k in space.searchable if k.kind == "bits" and len(k.choices) >= 3)
    low, mid_bits, high = sorted(bits.choices)[:3]
    rows = [
        {"knob": bits.name, "value": high, "metric": 0.85},
        {"knob": bits.name, "value": mid_bits, "metric": 0.88},  # noise: less loss, fewer bits
        {"knob": bits.name, "value": low, "metric": None},  # a failed probe
    ]
    keep = next((k for k in space.searchable if k.kind == "keep"), None)
    if keep is not None:
        rows += [{"knob": keep.name, "value": 1.0, "metric": 0.9},
                 {"knob": keep.name, "value": 0.5, "metric": 0.7}]  # fmt: skip
    loss = LossModel.from_table(space, pd.DataFrame(rows), base_metric=0.9)
    assert loss(bits, mid_bits) >= loss(bits, high) == pytest.approx(0.05, abs=1e-3)
    assert loss(bits, low) >= loss(bits, mid_bits)  # not probed: no less than the next up
    if keep is not None:
        values = sorted(keep.choices)
        assert all(loss(keep, a) >= loss(keep, b) for a, b in zip(values, values[1:], strict=False))
        mid = min(keep.choices, key=lambda c: abs(c - 0.75))
        assert loss(keep, mid) == pytest.approx(0.2 * (1 - mid) / 0.5, abs=1e-3)


def test_local_moves_fit_differ_from_the_incumbent_and_are_new(space):
    budget = Budget(size_bytes=_uniform_size(space, 4))
    pricing = Pricing(space, budget)
    mover = Mover(pricing, LossModel.prior(space))
    incumbent = uniform_values(space, 4)
    seen = {pricing.policy(incumbent).hash}
    rng = random.Random(0)
    for _ in range(15):
        moved = mover.local_move(incumbent, rng, seen.__contains__)
        if moved is None:
            break
        policy = pricing.policy(moved)
        assert pricing.excess(moved) <= 0 and policy.hash not in seen
        changed = [k for k in space.searchable if moved[k.name] != incumbent[k.name]]
        assert changed
        seen.add(policy.hash)
    assert len(seen) > 5  # it explores, it does not repeat itself


def test_some_local_moves_jump_a_knob_far_from_the_incumbent(space):
    """Steps of one grid point never reach "one layer pruned hard, its bytes spent on
    bits elsewhere": some draws set a knob two or more choices away (before the repair)."""
    budget = Budget(size_bytes=_uniform_size(space, 4))
    mover = Mover(Pricing(space, budget), LossModel.prior(space))
    incumbent = uniform_values(space, 4)
    rng, jumps = random.Random(1), 0
    for _ in range(60):
        drawn, held = mover._draw(dict(incumbent), rng)
        steps = [abs(k.choices.index(drawn[k.name]) - k.choices.index(incumbent[k.name]))
                 for k in space.searchable if k.name in held]  # fmt: skip
        jumps += any(s >= 2 for s in steps)
    assert 5 <= jumps <= 30  # a quarter of the draws, roughly


def test_local_moves_repeat_with_the_seed(space):
    budget = Budget(size_bytes=_uniform_size(space, 3))
    mover = Mover(Pricing(space, budget), LossModel.prior(space))
    incumbent = uniform_values(space, 3)
    runs = [[mover.local_move(incumbent, rng, lambda h: False) for _ in range(5)]
            for rng in (random.Random(7), random.Random(7))]  # fmt: skip
    assert runs[0] == runs[1]


@pytest.mark.parametrize("bits", [3, 4])
def test_knapsack_seeds_sit_at_the_budget_edge(space, bits):
    # 0.5% above the uniform policy's size: the knapsack's rounding of costs may miss the
    # edge by far less than that
    budget = Budget(size_bytes=int(_uniform_size(space, bits) * 1.005))
    pricing = Pricing(space, budget)
    mover = Mover(pricing, LossModel.prior(space))
    seeds = budget_seeds(mover)
    assert seeds and all(pricing.excess(s) <= 0 for s in seeds)
    bits_only = knapsack_seed(mover, ("bits",))
    assert all(bits_only[k.name] == max(k.choices) for k in space.searchable if k.kind == "keep")
    # under the prior (equal loss for every layer at equal bits) the bits-only seed is at
    # least as good, by the model's own estimate, as the uniform policy of the same size
    uniform = uniform_values(space, bits)

    def total(values):
        return sum(mover.loss(k, values[k.name]) for k in space.searchable)

    assert total(bits_only) <= total(uniform) + 1e-9


def test_a_resumed_study_steers_with_its_own_sensitivity_table(space, tmp_path):
    from types import SimpleNamespace

    from orchestrator.search import _resumed_guidance
    from orchestrator.sensitivity import write_table

    prepared = SimpleNamespace(study_dir=tmp_path, space=space, noise={})
    assert _resumed_guidance(prepared, 0.9).loss is None  # no table: the prior
    knob = next(k for k in space.searchable if k.kind == "bits")
    rows = [{"knob": knob.name, "value": float(c), "metric": 0.9 - 0.01 * i}
            for i, c in enumerate(sorted(knob.choices, reverse=True))]  # fmt: skip
    write_table(pd.DataFrame(rows), tmp_path / "sensitivity.parquet")
    loss = _resumed_guidance(prepared, 0.9).loss
    lowest = min(knob.choices)
    assert loss(knob, lowest) == pytest.approx(0.01 * (len(knob.choices) - 1), abs=1e-4)
    assert loss(knob, lowest) != LossModel.prior(space)(knob, lowest)


def test_auto_sampler_affords_tpe_when_evaluations_are_slow():
    from orchestrator.search import auto_sampler, tpe_ask_seconds

    assert auto_sampler(9, 60, 2) == "tpe"  # small: TPE whatever the evaluation costs
    assert auto_sampler(42, 100, 2) == "nsga2"  # large, evaluation time unknown
    assert auto_sampler(42, 100, 2, eval_seconds=0.01) == "nsga2"  # digits-fast evaluations
    assert auto_sampler(42, 100, 2, eval_seconds=1.7) == "tpe"  # MiniLM: 1.7 s each
    # the threshold: TPE's last asks at most 5% of a worker's evaluation time
    edge = tpe_ask_seconds(42, 300) * 2 / 0.05
    assert auto_sampler(42, 300, 2, eval_seconds=edge * 1.01) == "tpe"
    assert auto_sampler(42, 300, 2, eval_seconds=edge * 0.99) == "nsga2"


def test_local_moves_thin_out_while_they_do_not_pay_and_return_when_the_incumbent_improves():
    share = LocalShare(patience=3, sparsest=8)
    turns = [share.turn() for _ in range(60)]
    gaps = [b - a for a, b in itertools.pairwise(i for i, t in enumerate(turns) if t)]
    # every other ask for the first 3 local moves, then every 4th for 3, then every 8th
    assert gaps[:2] == [2, 2] and gaps[2:5] == [4, 4, 4] and set(gaps[5:]) == {8}
    share.improved()
    assert share.every == 2
    assert [share.turn() for _ in range(6)] == [True, False] * 3  # every other ask again


@given(st.lists(st.booleans(), max_size=200), st.integers(1, 10), st.sampled_from([2, 4, 8, 16]))
def test_local_share_never_falls_below_one_ask_in_sparsest(improvements, patience, sparsest):
    share = LocalShare(patience=patience, sparsest=sparsest)
    since = 0
    for improved in improvements:
        if improved:
            share.improved()
        since = 0 if share.turn() else since + 1
        assert since < sparsest and 2 <= share.every <= sparsest


def test_quantization_noise_falls_with_every_bit_and_is_zero_in_float():
    from orchestrator.noise import bits_noise

    _, model, space = build_space(make_config({"task": "digits-cnn"}))
    noise = bits_noise(model, space)
    assert set(noise) == {k.name for k in space.searchable if k.kind == "bits"}
    for knob in (k for k in space.searchable if k.kind == "bits"):
        curve = [noise[knob.name][c] for c in sorted(knob.choices)]
        assert curve[-1] == 0.0 and all(a > b for a, b in zip(curve, curve[1:], strict=False))
        assert 0 < curve[0] < 1  # relative error energy of the lowest bits


def test_row_sampling_estimates_the_noise_of_a_large_weight():
    import torch

    from orchestrator.noise import ROWS, _sample, relative_noise

    torch.manual_seed(0)
    weight = torch.randn(8 * ROWS, 64) * torch.linspace(0.1, 2.0, 8 * ROWS)[:, None]
    small = torch.randn(ROWS // 2, 64)
    exact = relative_noise([(weight, 1.0), (small, 1.0)], [3, 4, 32])
    sampled = relative_noise([_sample(weight), _sample(small)], [3, 4, 32])
    for b in (3, 4):
        assert sampled[b] == pytest.approx(exact[b], rel=0.05)
    assert sampled[32] == 0.0


def _bits_knobs(space):
    return [k for k in space.searchable if k.kind == "bits" and len(k.choices) >= 4]


def test_low_fidelity_probes_are_carried_to_every_choice_by_the_noise(space):
    """Probes on part of the data: each bits knob's drops become one fitted sensitivity
    times its noise (its lowest bits, with the largest drop, set it), so a noisy small drop
    at more bits cannot price that choice above a lower one; a knob never probed takes the
    median sensitivity of the others."""
    knobs = _bits_knobs(space)
    probed, unprobed = knobs[:-1], knobs[-1]
    noise = {k.name: {c: (0.0 if c >= FLOAT_BITS else 4.0 ** (2 - c) * (i + 1))
                      for c in k.choices} for i, k in enumerate(knobs)}  # fmt: skip
    rows = []
    for i, knob in enumerate(probed):
        low, mid = sorted(knob.choices)[:2]
        slope = 0.1 * (i + 1)  # drop = slope x noise at the lowest bits
        rows += [{"knob": knob.name, "value": low, "metric": 0.9 - slope * noise[knob.name][low],
                  "share": 0.25},
                 {"knob": knob.name, "value": mid, "metric": 0.9 - 0.05, "share": 0.25}]  # fmt: skip
    loss = LossModel.from_table(space, pd.DataFrame(rows), base_metric=0.9, noise=noise)
    slopes = []
    for i, knob in enumerate(probed):
        low, mid = sorted(knob.choices)[:2]
        fitted = (0.9 - rows[2 * i]["metric"]) * noise[knob.name][low] + 0.05 * noise[knob.name][
            mid
        ]
        slope = fitted / (noise[knob.name][low] ** 2 + noise[knob.name][mid] ** 2)
        slopes.append(slope)
        for c in knob.choices:
            assert loss(knob, c) == pytest.approx(slope * noise[knob.name][c], abs=1e-5)
    typical = statistics.median(slopes)
    for c in unprobed.choices:
        assert loss(unprobed, c) == pytest.approx(typical * noise[unprobed.name][c], abs=1e-5)
    # without the noise, the same table: measured drops as they are (the old model)
    plain = LossModel.from_table(space, pd.DataFrame(rows), base_metric=0.9)
    low, mid = sorted(probed[0].choices)[:2]
    assert plain(probed[0], mid) == pytest.approx(0.05, abs=1e-3)


def test_a_full_sweep_on_all_the_data_keeps_its_measured_drops(space):
    knob = _bits_knobs(space)[0]
    noise = {knob.name: {c: (0.0 if c >= FLOAT_BITS else 4.0 ** (2 - c)) for c in knob.choices}}
    rows = [{"knob": knob.name, "value": v, "metric": 0.9 - 0.01 * (FLOAT_BITS - v) / FLOAT_BITS,
             "share": 1.0} for v in probe_values(knob)]  # fmt: skip
    loss = LossModel.from_table(space, pd.DataFrame(rows), base_metric=0.9, noise=noise)
    for v in probe_values(knob):
        assert loss(knob, v) == pytest.approx(0.01 * (FLOAT_BITS - v) / FLOAT_BITS, abs=1e-5)


def _exhaustive_fill(mover, values):
    """The reference: every step prices every knob's next choice and takes the best."""
    load = mover.pricing.load(values)
    while True:
        best = None
        for knob in mover.knobs:
            higher = _step(knob, values[knob.name], +1)
            if higher is None:
                continue
            moved = {**values, knob.name: higher}
            if mover.pricing.excess(moved) > 0:
                continue
            gain = mover.loss(knob, values[knob.name]) - mover.loss(knob, higher)
            used = max(mover.pricing.load(moved) - load, 1e-12)
            if gain > 0 and (best is None or gain / used > best[0]):
                best = (gain / used, moved)
        if best is None:
            return values
        values, load = best[1], mover.pricing.load(best[1])


@pytest.mark.parametrize("task, budget", [("digits-resnet", 40_000), ("digits-cnn", 20_000)])
def test_lazy_fill_reaches_what_pricing_every_knob_each_step_reaches(task, budget):
    """fill prices a knob or two per step (lazy greedy), not all: the same estimated loss
    and budget use as the exhaustive greedy, from feasible starts."""
    _, _, space = build_space(make_config({"task": task}))
    pricing = Pricing(space=space, budget=Budget(size_bytes=budget))
    mover = Mover(pricing, LossModel.prior(space))
    rng = random.Random(0)
    compared = 0
    for _ in range(8):
        start = {k.name: min(k.choices) for k in space.knobs}
        for knob in rng.sample(space.searchable, 3):
            start[knob.name] = rng.choice(knob.choices)
        if pricing.excess(start) > 0:
            continue
        lazy, full = mover.fill(start), _exhaustive_fill(mover, mover._snap(start))
        loss = [sum(mover.loss(k, v[k.name]) for k in space.searchable) for v in (lazy, full)]
        assert loss[0] == pytest.approx(loss[1], abs=1e-12)
        assert pricing.load(lazy) == pytest.approx(pricing.load(full))
        assert pricing.excess(lazy) == 0
        compared += 1
    assert compared >= 4
