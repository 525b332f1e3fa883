"""Several drivers sharing one study (`run --join`), one module at a time: the recorder's
renumbering, the feed of other drivers' trials, joining a study with live and dead
drivers, sinks sharing a directory, and the refusals. The end-to-end runs with real Ray
and PostgreSQL are in test_cluster.py."""

from __future__ import annotations

import os

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from orchestrator.errors import ConfigError
from orchestrator.results import ResultSink, read_trials
from orchestrator.storage import open_storage
from orchestrator.store import (
    INTERRUPTED,
    OWNER_ATTR,
    ROW_ATTR,
    StudyWriter,
    TrialFeed,
    live_drivers,
    open_study,
)

DIST = {"x": CategoricalDistribution([1, 2, 3, 4, 5, 6, 7, 8])}


@pytest.fixture(params=["sqlite", "journal"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return f"journal:///{tmp_path / 'study.log'}"


class FakeDriver:
    """A driver's side of the recorder protocol: its own in-memory study (numbers from 0)
    and a StudyWriter of its own, as its recorder process would hold."""

    def __init__(self, url: str, study_dir, driver_id: str):
        self.study = optuna.create_study(directions=["minimize", "maximize"])
        storage = open_storage(url)
        study_id = storage.get_study_id_from_name("s")
        self.writer = StudyWriter(storage, study_id, ResultSink(study_dir), driver_id=driver_id,
                                  shared=True)  # fmt: skip
        self.feed = TrialFeed(storage, study_id, driver_id)

    def ask(self):
        trial = self.study.ask(DIST)
        self.writer.apply([("created", self.study._storage.get_trial(trial._trial_id), None)])
        return trial

    def tell(self, trial, cached_from=None):
        x = trial.params["x"]
        frozen = self.study.tell(trial, [x * 10.0, x / 10])
        row = {"study": "s", "trial": trial.number, "state": "COMPLETE", "metric": x / 10,
               "size_bytes": x * 10, "feasible": True, "policy": f'{{"x": {x}}}',
               "policy_hash": f"h{x}", "cached_from": cached_from}  # fmt: skip
        self.writer.apply([("finished", frozen, row)])


def test_drivers_sharing_a_study_get_the_storage_numbers_and_one_row_per_trial(url, tmp_path):
    open_study(url, "s", ["minimize", "maximize"], resume=False)
    a, b = FakeDriver(url, tmp_path, "A"), FakeDriver(url, tmp_path, "B")
    a0, b0, a1, b1, a2 = a.ask(), b.ask(), a.ask(), b.ask(), a.ask()  # storage: 0 1 2 3 4
    b.tell(b1)
    a.tell(a2)
    a.tell(a0)
    b.tell(b0)
    # A adopts B's trial 1 (storage number 3) as its local trial 3, then a duplicate of it
    a.writer.apply([("foreign", 3, 3)])
    a.tell(a1, cached_from=3)
    for driver in (a, b):
        driver.writer.sink.flush()

    rows = read_trials(tmp_path).set_index("trial")
    assert sorted(rows.index) == [0, 1, 2, 3, 4]
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    for trial in study.trials:
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs[ROW_ATTR]["trial"] == trial.number  # renumbered before stored
        assert rows.loc[trial.number, "policy"] == f'{{"x": {trial.params["x"]}}}'
    owners = {t.number: t.system_attrs[OWNER_ATTR] for t in study.trials}
    assert owners == {0: "A", 1: "B", 2: "A", 3: "B", 4: "A"}
    assert rows.loc[2, "cached_from"] == 3


def test_the_feed_returns_other_drivers_finished_trials_once(url, tmp_path):
    open_study(url, "s", ["minimize", "maximize"], resume=False)
    a, b = FakeDriver(url, tmp_path, "A"), FakeDriver(url, tmp_path, "B")
    a0, b0, b1 = a.ask(), b.ask(), b.ask()
    assert a.feed.poll() == []  # B's trials still run
    b.tell(b1)
    a.tell(a0)
    assert [t.number for t in a.feed.poll()] == [2]  # B's finished one, never A's own
    assert a.feed.poll() == []
    b.tell(b0)
    (adopted,) = a.feed.poll()
    assert adopted.number == 1 and adopted.user_attrs[ROW_ATTR]["trial"] == 1
    assert [t.number for t in b.feed.poll()] == [0]


def test_joining_fails_and_requeues_only_the_trials_of_drivers_that_are_gone(url, tmp_path):
    open_study(url, "s", ["minimize", "maximize"], resume=False)
    live, dead = FakeDriver(url, tmp_path, "live"), FakeDriver(url, tmp_path, "dead")
    live.writer.heartbeat(driver_pid=os.getpid())
    dead.writer.heartbeat(driver_pid=os.getpid(), stopped=True)  # its recorder saw EOF
    running_live, running_dead, done = live.ask(), dead.ask(), dead.ask()
    dead.tell(done)

    opened = open_study(url, "s", ["minimize", "maximize"], resume=False, join=True)
    assert not opened.created and opened.live == {"live"}
    assert opened.requeue == [running_dead.params]
    assert [t.number for t in opened.finished] == [1, 2]  # the failed one is finished now
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.RUNNING, 1: TrialState.FAIL, 2: TrialState.COMPLETE}
    assert study.trials[1].user_attrs["error"] == INTERRUPTED
    # a second joiner finds nothing more to re-queue: the trial was failed once
    assert open_study(url, "s", ["minimize", "maximize"], resume=False, join=True).requeue == []
    assert set(live_drivers(open_storage(url), opened.study_id)) == {"live"}
    live.tell(running_live)


def test_a_joiner_creates_the_study_only_when_no_driver_has(url):
    first = open_study(url, "s", ["minimize", "maximize"], resume=False, join=True)
    second = open_study(url, "s", ["minimize", "maximize"], resume=False, join=True)
    assert first.created and not second.created
    assert first.study_id == second.study_id
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        open_study(url, "s", ["minimize", "maximize"], resume=False)  # no --join: refused


def test_sinks_sharing_a_directory_put_every_drivers_rows_in_the_front(tmp_path):
    def row(trial, size, metric):
        return {"study": "s", "trial": trial, "state": "COMPLETE", "metric": metric,
                "size_bytes": size, "feasible": True, "policy": "{}", "policy_hash": f"p{trial}"}  # fmt: skip

    a, b = ResultSink(tmp_path), ResultSink(tmp_path)
    a.add(row(0, 100, 0.9))
    a.flush()
    b.add(row(1, 50, 0.95))  # dominates A's point
    b.add(row(0, 100, 0.9))  # A wrote it after B started: B finds it before writing
    b.flush()
    a.add(row(2, 10, 0.5))
    a.flush()  # A reads B's part before writing the front
    front = pd.read_parquet(tmp_path / "pareto.parquet")
    assert sorted(front["trial"]) == [1, 2]
    assert sorted(read_trials(tmp_path)["trial"]) == [0, 1, 2]  # one row per trial
    assert ResultSink(tmp_path).recorded == {0, 1, 2}


def test_join_mistakes_are_one_line_before_anything_starts(tmp_path):
    from orchestrator.config import make_config
    from orchestrator.prepare import prepare

    base = {"task": "digits-cnn", "out": str(tmp_path)}
    with pytest.raises(ConfigError, match="--join needs --study NAME"):
        prepare(make_config(base), join=True)
    with pytest.raises(ConfigError, match="give one"):
        prepare(make_config({**base, "study": "s"}), join=True, resume=True)
    study = tmp_path / "s"
    study.mkdir()
    (study / "run.json").write_text('{"config": {"task": "digits-lstm"}, "space": {"knobs": []}}')
    with pytest.raises(ConfigError, match="^--join: study 's' searched task 'digits-lstm'"):
        prepare(make_config({**base, "study": "s"}), join=True)
