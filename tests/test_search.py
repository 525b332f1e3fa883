"""End-to-end searches with real Ray workers, real SQLite and Parquet read back with pandas."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest

from orchestrator.budget import parse_budget
from orchestrator.config import make_config
from orchestrator.prepare import build_space
from orchestrator.results import compute_front, nondominated
from orchestrator.search import run_search
from search_spaces.cost import policy_cost
from search_spaces.policy import Policy


def _search(tmp_path, **config):
    cfg = make_config({"out": str(tmp_path), "study": "s", "workers": {"count": 2}, **config})
    return cfg, run_search(cfg)


def _dominated(point, others):
    size, metric = point
    return any(s <= size and m >= metric and (s, m) != (size, metric) for s, m in others)


@pytest.mark.parametrize("task", ["digits-cnn", "digits-lstm"])
def test_search_records_every_trial_and_a_true_front(ray_cluster, tmp_path, task):
    cfg, result = _search(tmp_path, task=task, trials=24, seed=1)
    study_dir = tmp_path / "s"

    trials = pd.read_parquet(study_dir / "trials")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{study_dir}/study.db")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) == len(finished) == 24
    assert sorted(trials["trial"]) == sorted(t.number for t in finished)
    for t in finished:  # the Parquet row and the study agree trial by trial
        row = trials.set_index("trial").loc[t.number]
        assert row["state"] == t.state.name
        if t.state.name == "COMPLETE":
            assert row["size_bytes"] == t.values[0]
            assert row["metric"] == pytest.approx(t.values[1])

    # every row's cost is the cost model's price of its canonical policy
    _, _, space = build_space(cfg)
    for row in trials.itertuples():
        policy = Policy.from_json(space, row.policy)
        assert policy.hash == row.policy_hash
        assert policy_cost(space, policy).size_bytes == row.size_bytes

    front = pd.read_parquet(study_dir / "pareto.parquet")
    done = trials[trials["state"] == "COMPLETE"]
    points = list(zip(done["size_bytes"], done["metric"], strict=True))
    front_points = list(zip(front["size_bytes"], front["metric"], strict=True))
    assert front_points and all(not _dominated(p, points) for p in front_points)
    nondom = {done.iloc[i]["policy_hash"] for i in nondominated(points)}
    assert nondom == set(front["policy_hash"])

    # the first trials are the uniform baselines, float first: its metric is the base metric
    run = json.loads((study_dir / "run.json").read_text())
    float_row = trials.set_index("trial").loc[0]
    assert float_row["size_bytes"] == run["base"]["size_bytes"] == result.base_size
    assert float_row["metric"] == pytest.approx(run["base"]["metric"])
    assert run["config"]["task"] == task and run["space"]["knobs"]
    assert set(trials["worker"].dropna()) <= {"w1", "w2"}
    # multi-fidelity: complete trials saw all the validation data, stopped ones a prefix
    assert (trials.loc[trials["state"] == "COMPLETE", "fidelity"] == 1.0).all()
    assert (trials.loc[trials["state"] == "PRUNED", "fidelity"] < 1.0).all()


def test_budget_infeasible_candidates_never_reach_a_worker(ray_cluster, tmp_path):
    _, result = _search(tmp_path, trials=30, budget="size=14KB", seed=3)
    trials = result.trials
    infeasible = trials[trials["state"] == "INFEASIBLE"]
    assert len(infeasible) > 0, "the float/8-bit baselines alone exceed 14 KB"
    assert infeasible["worker"].isna().all() and infeasible["eval_seconds"].isna().all()
    assert (infeasible["size_bytes"] > 14_000).all() and not infeasible["feasible"].any()
    evaluated = trials[trials["worker"].notna()]
    assert (evaluated["size_bytes"] <= 14_000).all()
    assert (result.front["size_bytes"] <= 14_000).all()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s/study.db")
    over = [t for t in study.trials if t.constraints and t.constraints["size_bytes"] > 0]
    assert {t.number for t in over} == set(infeasible["trial"])
    run = json.loads((tmp_path / "s" / "run.json").read_text())["runs"][-1]
    assert run["asks"] == 30 and run["infeasible_asks"] == len(infeasible)
    assert run["infeasible_share"] == pytest.approx(len(infeasible) / 30)
    assert run["worker_seconds"] > 0 and run["worker_seconds_feasible_share"] == 1.0
    # each over-budget ask is followed by its repair: the nearest policy that fits
    repairs = trials[trials["origin"] == "repair"]
    assert len(repairs) > 0 and (repairs["size_bytes"] <= 14_000).all()
    assert set(repairs["trial"] - 1) <= set(infeasible["trial"])


def test_duplicate_policies_are_evaluated_once(ray_cluster, tmp_path):
    # two bits choices on two layers and nothing else searchable: at most 4 distinct policies
    space = {"preset": "none", "bits": [4, 8], "keep": [1.0],
             "rules": [{"layers": ["features.0", "features.3", "features.7"], "skip": True}]}  # fmt: skip
    _, result = _search(tmp_path, trials=12, space=space, baselines=False, sampler="random")
    trials = result.trials
    assert trials["policy_hash"].nunique() <= 4
    evaluated = trials[trials["cached_from"].isna()]
    assert evaluated["policy_hash"].is_unique
    for row in trials[trials["cached_from"].notna()].itertuples():
        source = trials.set_index("trial").loc[int(row.cached_from)]
        assert source["policy_hash"] == row.policy_hash
        assert source["metric"] == row.metric
        assert row.eval_seconds == 0.0


def test_front_recomputed_from_parquet_matches_pareto_file(ray_cluster, tmp_path):
    _, result = _search(tmp_path, trials=16, sampler="random", seed=5)
    on_disk = pd.read_parquet(tmp_path / "s" / "pareto.parquet")
    again = compute_front(pd.read_parquet(tmp_path / "s" / "trials"))
    assert list(on_disk["trial"]) == list(again["trial"]) == list(result.front["trial"])


def test_a_task_that_always_fails_stops_early(ray_cluster, tmp_path):
    class Broken:
        def __init__(self, device):
            pass

        def base_metric(self):
            return 1.0

        def evaluate(self, policy):
            raise RuntimeError("metric exploded")

    cfg = make_config({"out": str(tmp_path), "study": "s", "workers": {"count": 2},
                       "trials": 40, "baselines": False})  # fmt: skip
    result = run_search(cfg, evaluator_factory=lambda device: Broken(device))
    assert result.error and "metric exploded" in result.error
    assert len(result.trials) < 40
    assert (result.trials["state"] == "FAIL").all()
    assert result.trials["error"].str.contains("RuntimeError: metric exploded").all()


def test_a_worker_that_cannot_load_the_task_is_one_clear_error(ray_cluster, tmp_path):
    from orchestrator.errors import WorkerStartError

    def factory(device):
        raise OSError("weights file missing on this node")

    cfg = make_config({"out": str(tmp_path), "study": "s", "workers": {"count": 2}, "trials": 4})
    with pytest.raises(WorkerStartError, match="weights file missing on this node"):
        run_search(cfg, evaluator_factory=factory)


def test_importing_orchestrator_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, orchestrator, orchestrator.cli; assert 'ray' not in sys.modules, 'ray'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("task", ["digits-lstm", "digits-resnet"])
def test_structured_search_through_the_cli(ray_cluster, tmp_path, capsys, task):
    from orchestrator.cli import main

    config = tmp_path / "search.yaml"
    config.write_text(f"task: {task}\npruning: structured\n")
    code = main(["run", str(config), "--trials", "16", "--workers", "2", "--out", str(tmp_path),
                 "--study", "s", "--quiet", "--seed", "2"])  # fmt: skip
    assert code == 0
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["space"]["pruning"] == "structured" and run["space"]["groups"]
    assert "output shape" in " ".join(run["space"]["unpruned"].values())  # reasons recorded
    trials = pd.read_parquet(tmp_path / "s" / "trials")
    assert len(trials) == 16 and trials["state"].isin(["COMPLETE", "PRUNED"]).all()
    front = pd.read_parquet(tmp_path / "s" / "pareto.parquet")
    assert not front.empty and (front["params"] > 0).all()
    # structured keep knobs are per coupling group, and really shrink the model
    keep_knobs = [k["name"] for k in run["space"]["knobs"] if k["kind"] == "keep"]
    assert {f"keep:{g['name']}" for g in run["space"]["groups"]} >= set(keep_knobs)
    assert trials["params"].min() < run["base"]["params"]
    assert main(["front", str(tmp_path / "s")]) == 0
    assert "trial" in capsys.readouterr().out


def test_seeded_search_records_sensitivity_and_evaluates_seeds_first(
    ray_cluster, tmp_path, monkeypatch
):
    from orchestrator.sensitivity import probes

    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / "cache"))
    cfg, result = _search(tmp_path, trials=20, budget="size=20KB", seed=4)
    table = pd.read_parquet(tmp_path / "s" / "sensitivity.parquet")
    _, _, space = build_space(cfg)
    assert table["metric"].notna().all()
    # within sensitivity.share (0.25) of the 20 trials: 5 whole-data evaluations, probes on
    # part of the data counting by that part (one more scores the unchanged model there)
    measured = table[table["metric"] != result.base_metric]
    share = float(measured["share"].iloc[0])
    assert share < 1 and (len(measured) + 1) * share <= 0.25 * 20
    known = {(k, float(v)) for k, v, _ in probes(space)}
    assert set(zip(table["knob"], table["value"], strict=True)) <= known
    # every knob's reference value is the unchanged model (a row, no probe); the largest
    # layers' knobs are probed first, each at its smallest value first
    assert {k.name for k in space.searchable} <= set(table["knob"])
    biggest = max(space.searchable, key=lambda k: space.profile.layer(k.layers[0]).numel)
    assert min(biggest.choices) in set(table.loc[table["knob"] == biggest.name, "value"])
    trials = result.trials.sort_values("trial")
    seeds = trials[trials["origin"] == "seed"]
    assert len(seeds) >= 1 and (seeds["size_bytes"] <= 20_000).all()
    # baselines (each over-budget one followed by its repair), then seeds, before sampling
    firsts = trials[trials["origin"] != "repair"].head(len(seeds) + 4)["origin"]
    assert set(firsts) <= {"baseline", "seed"}
    cached = list((tmp_path / "cache" / "sensitivity").glob("*.parquet"))
    assert len(cached) == 1
    first = pd.read_parquet(cached[0])
    run_search(make_config({"out": str(tmp_path), "study": "t", "workers": {"count": 2},
                            "trials": 20, "budget": "size=20KB"}))  # fmt: skip
    # the same task and space reuse the table: every probe measured before is kept as it
    # was (the second study measures only probes the first had no time for)
    again = pd.read_parquet(cached[0])
    kept = first.merge(again, on=["knob", "value"], suffixes=("", "_again"))
    assert len(kept) == len(first) and (kept["metric"] == kept["metric_again"]).all()


def test_sensitivity_verb_prints_every_knob(ray_cluster, tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    config = tmp_path / "lstm.yaml"
    config.write_text("task: digits-lstm\n")
    assert main(["sensitivity", str(config), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    _, _, space = build_space(make_config({"task": "digits-lstm"}))
    for knob in space.searchable:
        assert knob.name in out
    assert len(list((tmp_path / "sensitivity").glob("*.parquet"))) == 1


@pytest.mark.parametrize(
    ("budget", "directions"),
    [("size=15KB", ["maximize"]), ("metric>=0.97", ["minimize"])],
)
def test_budget_objective(ray_cluster, tmp_path, budget, directions):
    cfg, result = _search(tmp_path, trials=20, objective="budget", budget=budget, seed=6)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s/study.db")
    assert [d.name.lower() for d in study.directions] == directions
    trials = result.trials
    best = result.best_within_budget()
    feasible = trials[(trials["state"] == "COMPLETE") & trials["feasible"]]
    assert best is not None and not feasible.empty
    pruned = trials[trials["state"] == "PRUNED"]  # stopped early: could not beat the best
    for t in (t for t in study.trials if t.state.name == "PRUNED"):
        assert t.intermediate_values  # the prefix it was stopped on, reported to Optuna
    assert (pruned["fidelity"] < 1).all()
    if "size" in budget:  # the best metric within the size budget
        assert (feasible["size_bytes"] <= 15_000).all()
        assert best["metric"] == feasible["metric"].max()
    else:  # the smallest model that keeps the metric
        complete = trials[trials["state"] == "COMPLETE"]
        assert ((complete["metric"] >= 0.97) == complete["feasible"]).all()
        assert best["size_bytes"] == feasible["size_bytes"].min()
        assert (result.front["metric"] >= 0.97).all()


def test_resume_without_config_continues_the_study_as_configured(ray_cluster, tmp_path):
    from orchestrator.cli import main

    config = tmp_path / "lstm.yaml"
    config.write_text("task: digits-lstm\nseeding: false\nsampler: random\n")
    base = ["--out", str(tmp_path), "--study", "s", "--workers", "2", "--quiet"]
    assert main(["run", str(config), "--trials", "6", *base]) == 0
    # no CONFIG: the recorded config (task digits-lstm, sampler random) is used
    assert main(["run", "--resume", "--trials", "9", *base]) == 0
    trials = pd.read_parquet(tmp_path / "s" / "trials")
    assert len(trials) == 9 and trials["trial"].is_unique
    run = json.loads((tmp_path / "s" / "run.json").read_text())
    assert run["config"]["task"] == "digits-lstm" and run["config"]["trials"] == 9
    assert [r["resume"] for r in run["runs"]] == [False, True]


def test_multi_fidelity_stops_candidates_that_cannot_reach_the_front(ray_cluster, tmp_path):
    _, result = _search(tmp_path, trials=40, seed=8, sampler="random", seeding=False)
    trials = result.trials
    pruned = trials[trials["state"] == "PRUNED"]
    assert len(pruned) > 0  # random 2-bit / keep-0.1 candidates are far below the front
    assert (pruned["fidelity"] < 1).all() and pruned["metric"].notna().all()
    assert not set(pruned["trial"]) & set(result.front["trial"])
    run = json.loads((tmp_path / "s" / "run.json").read_text())["runs"][-1]
    assert run["multi_fidelity"] and 0 < run["validation_share_saved"] < 1
    # off: every evaluation sees all the validation data
    off = make_config({"out": str(tmp_path), "study": "off", "workers": {"count": 2},
                       "trials": 12, "fidelity": {"enabled": False}})  # fmt: skip
    assert (run_search(off).trials["fidelity"].dropna() == 1.0).all()


@pytest.mark.parametrize("bits", [3, 4])
def test_budget_search_records_the_best_uniform_policies_within_it_and_never_loses(
    ray_cluster, tmp_path, bits
):
    """Issue 12: under a budget of the uniform `bits` policy's size, the first trials are
    the best uniform policy of every bits choice within the budget (the largest uniform
    keep that fits), each scored in full, and the reported best is never below them."""
    from orchestrator.proposals import Pricing, baselines, uniform_values

    _, _, space = build_space(make_config({"task": "digits-cnn"}))
    size = Pricing(space, parse_budget(None)).cost(uniform_values(space, bits)).size_bytes
    cfg, result = _search(tmp_path, task="digits-cnn", trials=24, seed=3, objective="budget",
                          budget=f"size={size}B")  # fmt: skip
    expected = baselines(Pricing(space, parse_budget(f"size={size}B")), within_budget=True)
    expected_hashes = [Pricing(space, parse_budget(None)).policy(v).hash for v in expected]
    trials = result.trials.sort_values("trial")
    first = trials.head(len(expected))
    assert list(first["origin"]) == ["baseline"] * len(expected)
    assert list(first["policy_hash"]) == expected_hashes
    assert (first["state"] == "COMPLETE").all() and (first["fidelity"] == 1.0).all()
    assert (first["size_bytes"] <= size).all()
    assert uniform_values(space, bits) in expected
    best = result.best_within_budget()
    assert best["size_bytes"] <= size and best["metric"] >= first["metric"].max()
    assert "local" in set(trials["origin"])  # the search exploits the incumbent
    local = trials[trials["origin"] == "local"]
    assert (local["size_bytes"] <= size).all()
