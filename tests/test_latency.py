"""The driver's latency predictor and latency budgets (issue 15)."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from orchestrator.config import make_config
from orchestrator.evaluate import Evaluator, RecoverySettings
from orchestrator.latency import MIN_MARGIN, LatencyModel
from orchestrator.prepare import build_space
from orchestrator.search import run_search
from search_spaces.cost import layer_macs
from search_spaces.kinds import reference_values
from search_spaces.policy import Policy


@pytest.fixture(scope="module")
def space():
    return build_space(make_config({"task": "digits-resnet"}))[2]


def _policies(space, count, seed=0):
    rng = random.Random(seed)
    return [Policy.from_values(space, {k.name: rng.choice(k.choices) for k in space.knobs})
            for _ in range(count)]  # fmt: skip


def test_one_measurement_prices_candidates_in_proportion_to_their_macs(space):
    model = LatencyModel(space)
    assert model.predict(_policies(space, 1)[0]) is None  # nothing measured yet
    base = Policy.from_values(space, reference_values(space.knobs))
    model.observe(base, 2.0)
    base_macs = sum(layer_macs(space, base).values())
    for policy in _policies(space, 10):
        share = sum(layer_macs(space, policy).values()) / base_macs
        assert model.predict(policy) == pytest.approx(2.0 * share)


def test_the_fit_learns_what_aligned_and_odd_channel_counts_cost(space):
    """Overhead + ms per MAC in layers of channels in multiples of ALIGN + a higher one in
    the others + a cost per such layer: after enough measurements the predictions are
    within 1% of such a truth."""
    model = LatencyModel(space)

    def truth(policy):
        x = model.features(policy)
        return 0.005 + 2e-7 * x[1] + 4e-7 * x[2] + 0.002 * x[3]

    for policy in _policies(space, 30, seed=1):
        model.observe(policy, truth(policy), model.predict(policy))
    for policy in _policies(space, 10, seed=2):
        assert model.predict(policy) == pytest.approx(truth(policy), rel=0.01)
    assert model.margin == pytest.approx(MIN_MARGIN)  # its errors fell below 10%


def test_noisy_timings_never_make_the_prediction_ignore_the_work(space):
    """Timings that do not grow with MACs (a loaded machine) give no flat predictor: a
    candidate keeping less work is never predicted slower."""
    model = LatencyModel(space)
    rng = random.Random(3)
    for policy in _policies(space, 8, seed=4):
        model.observe(policy, rng.uniform(0.5, 1.5))
    small, large = sorted(_policies(space, 20, seed=5),
                          key=lambda p: sum(layer_macs(space, p).values()))[::19]  # fmt: skip
    assert model.predict(small) < model.predict(large)


def test_the_margin_widens_with_the_predictors_own_error(space):
    model = LatencyModel(space)
    policy = _policies(space, 1)[0]
    for _ in range(5):
        model.observe(policy, 1.0, predicted=1.5)
    assert model.margin == pytest.approx(0.5)


def test_a_latency_budget_is_kept_by_measurement(ray_cluster, tmp_path):
    """Over-budget candidates by prediction are INFEASIBLE without worker time; the rest
    are measured, and only a measured latency within the limit is feasible."""
    config = {"task": "digits-cnn", "target": "onnxruntime", "pruning": "structured",
              "latency": {"repeats": 20, "warmup": 3}}  # fmt: skip
    task, _, space = build_space(make_config(config))
    base = Evaluator(task, space, recovery=RecoverySettings(),
                     target=make_config(config).target_settings()).base_latency()  # fmt: skip
    limit = float(f"{0.7 * base:.6f}")
    cfg = make_config({**config, "out": str(tmp_path), "study": "s", "trials": 14,
                       "objective": "budget", "budget": f"latency<={limit}ms",
                       "workers": {"count": 2}})  # fmt: skip
    run_search(cfg)
    trials = pd.read_parquet(tmp_path / "s" / "trials")
    assert trials["latency_predicted_ms"].notna().all()  # the base latency was measured first
    infeasible = trials[trials["state"] == "INFEASIBLE"]
    assert infeasible["eval_seconds"].isna().all() and infeasible["latency_ms"].isna().all()
    cost_fits = infeasible["size_bytes"] > 0  # no size limit: over by prediction alone
    assert (infeasible[cost_fits]["latency_predicted_ms"] > limit * (1 + MIN_MARGIN)).all()
    done = trials[trials["state"] == "COMPLETE"]
    assert done["latency_ms"].notna().all()
    assert (done["feasible"] == (done["latency_ms"] <= limit)).all()
    record = json.loads((tmp_path / "s" / "run.json").read_text())
    assert record["budget"]["latency_ms"] == pytest.approx(limit, rel=1e-6)


def test_a_latency_front_is_over_measured_latency(ray_cluster, tmp_path):
    """`front: latency`: the study's first objective is each trial's measured latency,
    and pareto.parquet is the non-dominated set over (latency_ms, metric)."""
    import optuna

    cfg = make_config({"task": "digits-cnn", "target": "onnxruntime", "front": "latency",
                       "out": str(tmp_path), "study": "s", "trials": 12, "workers": {"count": 2},
                       "latency": {"repeats": 10, "warmup": 2}})  # fmt: skip
    run_search(cfg)
    trials = pd.read_parquet(tmp_path / "s" / "trials").set_index("trial")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s/study.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 6
    for t in done:
        assert t.values[0] == pytest.approx(trials.loc[t.number, "latency_ms"])
    front = pd.read_parquet(tmp_path / "s" / "pareto.parquet")
    points = list(zip(front["latency_ms"], front["metric"], strict=True))
    candidates = trials[(trials["state"] == "COMPLETE") & trials["feasible"]]
    for latency, metric in zip(candidates["latency_ms"], candidates["metric"], strict=True):
        beaten = any(lat <= latency and m >= metric and (lat, m) != (latency, metric)
                     for lat, m in points)  # fmt: skip
        assert beaten or (latency, metric) in points
    for i, (latency, metric) in enumerate(points):  # nothing on it is dominated
        assert not any(lat <= latency and m >= metric and j != i and (lat, m) != (latency, metric)
                       for j, (lat, m) in enumerate(points))  # fmt: skip
