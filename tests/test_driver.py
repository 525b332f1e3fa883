"""The driver's parts without Ray (issue 13): the proposer, dispatcher and ledger run
over the built-in digits task with an in-process pool (jobs end in the order they were
sent, with a made-up metric that falls with fewer bits and channels) and an in-memory
recorder. Real Ray, storage and Parquet are in tests/test_search.py and test_faults.py."""

from __future__ import annotations

import time
from collections import namedtuple
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from orchestrator.budget import Budget, parse_budget
from orchestrator.config import make_config
from orchestrator.dispatcher import Dispatcher
from orchestrator.export import choose_trial
from orchestrator.fidelity import FidelitySettings
from orchestrator.ledger import Ledger, trial_row
from orchestrator.prepare import prepare
from orchestrator.progress import Progress
from orchestrator.proposals import LossModel, Mover, Pricing, baselines, uniform_values
from orchestrator.proposer import Candidate, Guidance, Proposer
from orchestrator.results import COLUMNS, compute_front, make_row, to_table
from orchestrator.search import SAMPLERS, Driver, SearchResult
from orchestrator.store import ROW_ATTR
from orchestrator.timing import DriverStats

optuna.logging.set_verbosity(optuna.logging.WARNING)
BUDGET = "size=3KB"  # digits-cnn is 191 KB in float: most asks are over it


def _metric(policy: dict) -> float:
    loss = sum(0.01 * 4.0 ** (1 - v) for k, v in policy.items() if k.startswith("bits") and v < 32)
    return 0.9 - loss - sum(0.05 * (1 - v) for k, v in policy.items() if k.startswith("keep"))


class FakePool:
    """orchestrator.workers.WorkerPool's interface, in-process. `held`: nothing ends."""

    def __init__(self, size: int = 2, *, fail: bool = False) -> None:
        self.size, self.fail, self.held = size, fail, False
        self.running: list = []
        self.jobs: list = []  # every job submitted, in order

    @property
    def free(self) -> int:
        return self.size - len(self.running)

    @property
    def busy(self) -> int:
        return len(self.running)

    def submit(self, job) -> None:
        self.running.append(job)
        self.jobs.append(job)

    def wait(self, timeout: float) -> list:
        if self.held or not self.running:
            return []
        job = self.running.pop(0)
        if self.fail:
            return [(job, {"error": "ValueError: no metric (task.py:1)", "seconds": 0.0})]
        return [(job, {"metric": _metric(job.policy), "eval_seconds": 0.001, "worker": "w1",
                       "node": "n1", "seconds": 0.0})]  # fmt: skip


class FakeRecorder:
    """orchestrator.recorder.Recorder's interface: rows kept in order, foreign trials fed."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.feed: list = []  # trials "other drivers" finished, handed out once
        self.drain_seconds = 0.0
        self.closed = False

    def created(self, trial) -> None:
        pass

    def finished(self, trial, row: dict) -> None:
        self.rows.append(row)

    def foreign(self, local: int, number: int) -> None:
        pass

    def adopted(self) -> list:
        trials, self.feed = self.feed, []
        return trials

    def close(self) -> None:
        self.closed = True


def _prepared(tmp_path, **config):
    base = {"task": "digits-cnn", "out": str(tmp_path), "study": "s", "sampler": "random",
            "seed": 3, "trials": 20}  # fmt: skip
    return prepare(make_config({**base, **config}))


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory):
    return _prepared(tmp_path_factory.mktemp("b"), objective="budget", budget=BUDGET)


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    return _prepared(tmp_path_factory.mktemp("f"), baselines=False)


def _driver(prepared, pool, *, guidance=None, recorder=None):
    stats, recorder = DriverStats(), recorder or FakeRecorder()
    sampler = SAMPLERS[prepared.config.sampler](prepared.config.seed, prepared.config.trials)
    study = optuna.create_study(directions=prepared.config.directions, sampler=sampler)
    ledger = Ledger(prepared, study, recorder, [], stats=stats)
    dispatcher = Dispatcher(pool, stats=stats, front=ledger.to_beat)
    proposer = Proposer(prepared, study, record=ledger, flight=dispatcher,
                        guidance=guidance or Guidance())  # fmt: skip
    driver = Driver(proposer, dispatcher, ledger, target=prepared.config.trials, quiet=True,
                    stats=stats, driver_id="test")  # fmt: skip
    return driver, recorder


def _rows(recorder: FakeRecorder) -> pd.DataFrame:
    return pd.DataFrame(recorder.rows).sort_values("trial").reset_index(drop=True)


def _hash(prepared, values: dict) -> str:
    return Pricing(prepared.space, prepared.budget).policy(values).hash


def test_under_a_budget_the_baselines_then_the_seeds_are_evaluated_first(budgeted):
    pricing = Pricing(budgeted.space, budgeted.budget)
    seeds = [uniform_values(budgeted.space, 2, 0.25), uniform_values(budgeted.space, 3, 0.25)]
    driver, recorder = _driver(budgeted, FakePool(2), guidance=Guidance(seeds=tuple(seeds)))
    driver.run()
    rows = _rows(recorder)
    assert list(rows["trial"]) == list(range(20)) and recorder.closed
    first = [pricing.policy(v).hash for v in baselines(pricing, within_budget=True)]
    assert len(first) >= 2  # one per bits choice that fits at some keep
    expected = first + [pricing.policy(v).hash for v in seeds]
    head = rows.iloc[: len(expected)]
    assert list(head["policy_hash"]) == expected
    assert list(head["origin"]) == ["baseline"] * len(first) + ["seed"] * len(seeds)
    assert head["feasible"].all() and (head["state"] == "COMPLETE").all()  # all fit
    assert [job.trial for job in driver.dispatcher.pool.jobs[: len(expected)]] == list(
        range(len(expected))
    )


def test_an_over_budget_ask_is_told_infeasible_and_repaired_next(tmp_path):
    prepared = _prepared(tmp_path, objective="budget", budget=BUDGET, baselines=False,
                         local_search=False, trials=24)  # fmt: skip
    pool = FakePool(2)
    driver, recorder = _driver(prepared, pool)
    driver.run()
    rows = _rows(recorder).set_index("trial")
    over = list(rows.index[rows["state"] == "INFEASIBLE"])
    assert len(over) >= 3 and not rows.loc[over, "feasible"].any()
    mover = Mover(Pricing(prepared.space, prepared.budget), LossModel.prior(prepared.space))
    study = driver.ledger.study
    for number in over:
        if number + 1 not in rows.index:
            continue  # the last ask of the run
        repaired = rows.loc[number + 1]
        assert repaired["origin"] == "repair" and repaired["feasible"]
        expected = mover.repair(study.trials[number].params)
        assert repaired["policy_hash"] == _hash(prepared, expected)
    sent = {job.trial for job in pool.jobs}
    assert sent.isdisjoint(over)  # an over-budget candidate never reaches a worker
    assert driver.summary()["infeasible_asks"] == len(over)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_repeated_policy_is_evaluated_once(front, workers):
    """One worker: the second ask finds the first's result in the cache; two: it rides
    along with the first, still running."""
    a, b = uniform_values(front.space, 8), uniform_values(front.space, 4)
    pool = FakePool(workers)
    driver, recorder = _driver(front, pool, guidance=Guidance(seeds=(a, a, b)))
    driver.run()
    rows = _rows(recorder)
    assert list(rows["policy_hash"][:3]) == [_hash(front, v) for v in (a, a, b)]
    assert rows.loc[1, "cached_from"] == 0 and rows.loc[1, "metric"] == rows.loc[0, "metric"]
    assert rows.loc[1, "eval_seconds"] == 0.0 and rows.loc[0, "eval_seconds"] == 0.001
    sent = [job.policy for job in pool.jobs]
    assert sum(_hash(front, p) == _hash(front, a) for p in sent) == 1
    evaluated = rows[rows["cached_from"].isna()]
    assert len(sent) == len(evaluated) == evaluated["policy_hash"].nunique()


def test_every_busy_worker_gets_a_candidate_asked_ahead_and_takes_it_when_freed(front):
    pool = FakePool(2)
    driver, _ = _driver(front, pool)
    pool.held = True  # every evaluation runs on
    with Progress(total=20, initial=0, quiet=True) as bar:
        for _ in range(4):
            assert driver._turn(bar)
        assert (pool.busy, len(driver.dispatcher.ready), driver.proposer.asks) == (2, 2, 4)
        pool.held = False
        driver._turn(bar)
    assert driver.proposer.asks == 4  # the freed workers took the ones asked ahead
    assert [job.trial for job in pool.jobs] == [0, 1, 2, 3]


def test_ask_ahead_timing(front):
    record = SimpleNamespace(loaded=0, adopted=0, improvements=0)
    proposer = Proposer(front, optuna.create_study(directions=front.config.directions),
                        record=record, flight=SimpleNamespace())  # fmt: skip
    proposer.ask_estimate = 0.1
    now = time.monotonic()
    assert proposer.ahead_in(ready=0, ends=[]) == float("inf")  # nothing running
    assert proposer.ahead_in(ready=0, ends=[now + 10]) == 0.0  # one is always ready
    assert proposer.ahead_in(ready=1, ends=[now + 10]) == float("inf")  # enough ready
    # the 2nd evaluation to end needs a 2nd ready one: asked two asks' time before it
    assert proposer.ahead_in(ready=1, ends=[now + 10, now + 10]) == pytest.approx(9.6, abs=0.05)
    proposer.asks = front.config.trials
    assert proposer.ahead_in(ready=0, ends=[now]) == float("inf")  # nothing left to ask


Row = namedtuple("Row", "trial size_bytes macs bops metric")


def test_best_within_budget_is_one_rule():
    rows = [Row(0, 100, 1, 1, 0.8), Row(1, 50, 1, 1, 0.8), Row(2, 50, 1, 1, 0.9),
            Row(3, 200, 1, 1, 0.95), Row(4, 50, 1, 1, 0.9)]  # fmt: skip
    assert Budget().best(rows).trial == 3  # the best metric
    limited = Budget(size_bytes=100)
    assert limited.best([r for r in rows if limited.within(r)]).trial == 2  # ties: first
    floor = parse_budget("metric>=0.85")
    assert [r.trial for r in rows if floor.within(r)] == [2, 3, 4]
    assert floor.best([r for r in rows if floor.within(r)]).trial == 2  # smallest keeping it
    assert floor.best([]) is None


def test_the_driver_the_result_and_export_agree_on_the_best(budgeted):
    driver, recorder = _driver(budgeted, FakePool(2))
    driver.run()
    rows = pd.DataFrame(recorder.rows)  # in the order they were told
    done = rows[(rows["state"] == "COMPLETE") & rows["feasible"] & rows["cached_from"].isna()]
    best = budgeted.budget.best(done.itertuples())
    assert driver.ledger.best_row["trial"] == best.trial
    assert driver.ledger.best() == (best.metric, best.size_bytes)
    trials = to_table(recorder.rows).to_pandas()
    result = SearchResult(study="s", study_dir=budgeted.study_dir, trials=trials,
                          front=compute_front(trials), base_metric=0.9, base_size=1,
                          sampler="random", interrupted=False, seconds=0.0,
                          budget=budgeted.budget)  # fmt: skip
    assert result.best_within_budget()["trial"] == best.trial
    assert choose_trial(trials, budgeted.budget, trial=None, study="s").trial == best.trial


def test_a_task_failing_every_evaluation_stops_the_run(front):
    driver, recorder = _driver(front, FakePool(2, fail=True))
    driver.run()
    rows = _rows(recorder)
    assert driver.error.startswith("stopped early: the first ") and "no metric" in driver.error
    assert 5 <= len(rows) < front.config.trials and (rows["state"] == "FAIL").all()
    assert driver.summary()["error"] == driver.error and recorder.closed


def test_rows_have_exactly_the_schema_columns(front):
    driver, recorder = _driver(front, FakePool(2))
    driver.run()
    assert all(tuple(row) == COLUMNS for row in recorder.rows)
    assert to_table(recorder.rows).num_rows == front.config.trials  # types fit the schema
    with pytest.raises(ValueError, match="not columns"):
        make_row({"trial": 1, "acuracy": 0.5})


def test_a_trial_another_driver_finished_is_adopted_and_answers_its_policy(front):
    values = uniform_values(front.space, 8)
    pricing = Pricing(front.space, front.budget)
    policy = pricing.policy(values)
    row = trial_row("s", 57, "COMPLETE", policy, pricing.cost(values), feasible=True,
                    result={"metric": 0.5, "attempt": 1})  # fmt: skip
    driver, recorder = _driver(front, FakePool(2), guidance=Guidance(seeds=(values,)))
    foreign = optuna.trial.create_trial(params=values, distributions=driver.proposer.distributions,
                                        values=[row["size_bytes"], 0.5],
                                        user_attrs={ROW_ATTR: row})  # fmt: skip
    foreign.number = 57  # the storage's number
    recorder.feed = [foreign, foreign]  # seen twice: adopted once
    driver.run()
    assert driver.ledger.adopted == 1 and driver.ledger.finished == front.config.trials
    assert driver.proposer.asks == front.config.trials - 1  # it counts toward the trials
    mine = _rows(recorder)
    assert mine.loc[0, "policy_hash"] == policy.hash and mine.loc[0, "cached_from"] == 0
    assert mine.loc[0, "metric"] == 0.5  # its result, not evaluated again
    assert all(job.policy != dict(policy) for job in driver.dispatcher.pool.jobs)


def test_the_dispatcher_sends_a_context_to_all_but_baselines_and_holds_duplicates(front):
    pricing = Pricing(front.space, front.budget)
    settings = FidelitySettings(steps=(0.5, 1.0), error_rate=0.05, metric_range=(0.0, 1.0))
    pool = FakePool(2)
    dispatcher = Dispatcher(pool, stats=DriverStats(), front=lambda: [(10, 0.5)],
                            fidelity=settings)  # fmt: skip

    def candidate(number, bits, origin):
        values = uniform_values(front.space, bits)
        return Candidate(SimpleNamespace(number=number), pricing.policy(values),
                         pricing.cost(values), True, origin)  # fmt: skip

    base, seed, again = candidate(0, 8, "baseline"), candidate(1, 4, "seed"), candidate(2, 4, "seed")  # fmt: skip
    for c in (base, seed, again):
        dispatcher.take(c)
    assert seed.duplicates == [again] and dispatcher.holds(seed.policy.hash)
    assert dispatcher.feed() is False  # both workers busy, nothing left ready
    assert pool.jobs[0].context is None  # a baseline is scored in full
    assert pool.jobs[1].context == {"size": seed.cost.size_bytes, "front": [(10, 0.5)],
                                    "fidelity": settings}  # fmt: skip
    (job, result), *_ = dispatcher.collect(timeout=0)
    assert dispatcher.finish(job, result)[1:] == ("COMPLETE", {**result, "attempt": 1})
    assert not dispatcher.holds(base.policy.hash) and dispatcher.eval_estimate == 0.0


def test_an_ask_of_a_policy_in_flight_is_recorded_with_its_own_origin(front):
    seed = uniform_values(front.space, 4)
    driver, recorder = _driver(front, FakePool(2))
    driver.proposer.queue = [(seed, "seed"), (dict(seed), "local")]
    driver.run()
    rows = _rows(recorder)
    same = rows[rows["policy_hash"] == _hash(front, seed)]
    # the local move rode along with the seed (asked while it was in flight): one
    # evaluation, two trials, each recorded with the origin it was asked with
    assert list(same["trial"]) == [0, 1] and list(same["origin"]) == ["seed", "local"]
    assert same["cached_from"].tolist()[1] == 0
    assert 1 not in [job.trial for job in driver.dispatcher.pool.jobs]
