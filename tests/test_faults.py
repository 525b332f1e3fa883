"""Faults injected into real runs (real Ray actors, Optuna storage, Parquet): workers killed
with SIGKILL mid-evaluation, metrics that raise, return NaN or inf, hang past `timeout`, a
model that runs out of memory, a task that fails every trial. None of them may lose,
duplicate or tear a finished trial; each is a FAIL with a readable error (or a retry on a
replacement worker) and the study goes on.

Driver crashes are in tests/test_resume.py, node loss in tests/test_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.config import make_config
from orchestrator.search import run_search


def _check_study(study_dir: Path) -> pd.DataFrame:
    """Nothing torn, nothing lost, nothing twice: every part reads, and the rows are the
    study's finished trials, one each."""
    for part in (study_dir / "trials").glob("part-*.parquet"):
        pq.read_table(part)
    trials = pd.read_parquet(study_dir / "trials")
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir}/study.db")
    finished = sorted(t.number for t in study.trials if t.state.is_finished())
    assert trials["trial"].is_unique
    assert sorted(trials["trial"]) == finished
    for row in trials.itertuples():  # the row's state is the study's
        assert study.trials[row.trial].state.name == ("COMPLETE" if row.state == "INFEASIBLE"
                                                      else row.state)  # fmt: skip
    evaluated = trials[(trials["state"] == "COMPLETE") & trials["cached_from"].isna()]
    assert evaluated["policy_hash"].is_unique  # no finished policy was evaluated twice
    return trials


def _readable(error: str) -> None:
    assert error and "\n" not in error and "Traceback" not in error and len(error) < 400, error


def _bits(policy_json: str) -> set[int]:
    return {v for k, v in json.loads(policy_json).items() if k.startswith("bits:")}


# -- 1. workers killed with SIGKILL mid-evaluation ----------------------------------------
def _kills_worker_factory(marks: Path):
    """A quick evaluator (no model) that SIGKILLs its own worker process on two poison
    policies: the uniform 4-bit baseline every time, the uniform 8-bit one on its first
    attempt only; it returns NaN for the 2-bit one. Every running evaluation leaves a
    `busy-<pid>` file ("plain" for the others), so the test can kill workers that are
    mid-evaluation of a plain one."""

    class Evaluator:
        def __init__(self, device):
            pass

        def base_metric(self):
            return 1.0

        def evaluate(self, policy):
            bits = {v for k, v in policy.items() if k.startswith("bits:")}
            keep = {v for k, v in policy.items() if k.startswith("keep:")}
            # the killer takes plain ones: not the poison policies, nor the NaN one (killed
            # and retried, it would FAIL on its second attempt, which the test checks
            # killed candidates never do)
            special = keep == {1.0} and bits in ({4}, {8}, {2})
            busy = marks / f"busy-{os.getpid()}"
            busy.write_text("special" if special else "plain")
            try:
                if keep == {1.0} and bits == {4}:
                    os.kill(os.getpid(), signal.SIGKILL)
                once = marks / "killed-once"
                if keep == {1.0} and bits == {8} and not once.exists():
                    once.touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.3)
                if keep == {1.0} and bits == {2}:  # the 2-bit baseline
                    return {"metric": float("nan")}
                return {"metric": sum(min(b, 8) for b in bits) / 40 + sum(keep) / 10,
                        "eval_seconds": 0.3}  # fmt: skip
            finally:
                busy.unlink(missing_ok=True)

    return lambda device: Evaluator(device)


def _killer(marks: Path, kills: int, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL a worker that is mid-evaluation every second, `kills` times. Only pids that
    are this test process's own descendants (the session's Ray) and named ray::_Worker."""
    mine = psutil.Process()
    while len(killed) < kills and not stop.wait(1.0):
        for busy in marks.glob("busy-*"):
            pid = int(busy.name.split("-")[1])
            try:
                if pid in killed or busy.read_text() != "plain":
                    continue
                proc = psutil.Process(pid)
                if mine not in proc.parents() or "_Worker" not in proc.name():
                    continue
                proc.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, FileNotFoundError):
                continue
            killed.append(pid)
            break


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_workers_killed_mid_evaluation_lose_and_repeat_nothing(ray_cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    config = make_config({"out": str(tmp_path), "study": "s", "trials": 30, "retries": 2,
                          "workers": {"count": 2}, "seeding": False, "sampler": "random"})  # fmt: skip
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_killer, args=(marks, 3, stop, killed), daemon=True)
    killer.start()
    try:
        result = run_search(config, evaluator_factory=_kills_worker_factory(marks))
    finally:
        stop.set()
        killer.join()

    assert result.error is None and not result.interrupted
    trials = _check_study(tmp_path / "s")
    assert len(trials) == 30  # the study finished the trials it was asked for
    assert len(killed) == 3
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in killed)  # fmt: skip
    by_origin = trials[trials["origin"] == "baseline"]
    bits = by_origin["policy"].map(_bits)
    always = by_origin[bits.map(lambda b: b == {4})].iloc[0]
    assert always["state"] == "FAIL" and always["attempt"] == 3  # retries=2: 3 attempts
    assert "worker died 3 times evaluating this candidate" in always["error"]
    _readable(always["error"])
    once = by_origin[bits.map(lambda b: b == {8})].iloc[0]
    assert once["state"] == "COMPLETE" and once["attempt"] == 2 and pd.isna(once["error"])
    nan = by_origin[bits.map(lambda b: b == {2})].iloc[0]
    assert nan["state"] == "FAIL"
    assert "ValueError: the evaluator returned metric nan" in nan["error"]
    # the externally killed candidates were retried on a new worker, not lost
    retried = trials[(trials["attempt"] == 2) & (trials["trial"] != once["trial"])]
    assert len(retried) >= 1 and (retried["state"] == "COMPLETE").all()
    # 7 deaths (3 of the poison policy, 1 of the kill-once one, 3 kills), 7 replacements:
    # the trials after them ran on new workers
    assert max(int(w[1:]) for w in trials["worker"].dropna()) >= 2 + 3 + 1
    assert (trials.loc[trials["state"] != "FAIL", "error"].isna()).all()


def test_a_pool_whose_workers_cannot_be_restarted_stops_with_one_error(ray_cluster, tmp_path):
    """Every evaluation kills its worker and no replacement can load the task: one clear
    error, instead of a driver waiting forever for workers that never come."""
    from orchestrator.errors import WorkerStartError

    marks = tmp_path / "marks"
    marks.mkdir()

    class Evaluator:
        def __init__(self, device):
            started = len(list(marks.iterdir()))
            (marks / f"{started}-{os.getpid()}").touch()
            if started >= 2:  # the first two load; their replacements cannot
                raise OSError("the model file vanished from this node")

        def base_metric(self):
            return 1.0

        def evaluate(self, policy):
            os.kill(os.getpid(), signal.SIGKILL)

    config = make_config({"out": str(tmp_path), "study": "s", "trials": 10, "retries": 1,
                          "workers": {"count": 2}, "seeding": False})  # fmt: skip
    with pytest.raises(WorkerStartError, match="every worker died and none could be started "
                       "again: .*the model file vanished from this node"):  # fmt: skip
        run_search(config, evaluator_factory=lambda device: Evaluator(device))


# -- 4. evaluator faults through a real Task plugin ---------------------------------------
FAULTY_TASK = """
import math, time
import torch
from torch import nn
from orchestrator import Task
from orchestrator.batches import accuracy

FAULTS = {faults!r}  # hidden units the rebuilt model kept -> the fault its metric injects


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def metric(model, batches):
    fault = FAULTS.get(model[0].weight.shape[0], "none")
    if fault == "raise":
        raise RuntimeError("metric exploded\\non these weights")
    if fault == "nan":
        return float("nan")
    if fault == "inf":
        return float("inf")
    if fault == "hang":
        time.sleep(600)
    if fault == "oom":  # what a too large model does on a GPU
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return accuracy(model, batches)


def make_task():
    return Task(name="faulty", model=_model, example_inputs=lambda: _batches()[0][0][:1],
                calibration=_batches, validation=_batches, metric=metric)
"""

# keep choices 0.125 ... 1.0 of 32 hidden units: 4, 8, ..., 32 units kept
FAULTS = {4: "raise", 8: "nan", 12: "inf", 16: "hang", 20: "oom"}
EXPECTED = {
    "raise": "RuntimeError: metric exploded on these weights",
    "nan": "ValueError: the task's metric returned nan",
    "inf": "ValueError: the task's metric returned inf",
    "hang": "TimeoutError: the evaluation took longer than timeout=3 s; its worker was replaced",
    "oom": "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
}


def _task_module(tmp_path: Path, faults: dict[int, str]) -> str:
    name = f"faulty_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FAULTY_TASK.format(faults=faults))
    return name


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """tmp_path importable as the driver and the workers import user task modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("faulty_"):
            del sys.modules[name]


def _kept(policy_json: str) -> int:
    keep = json.loads(policy_json)["keep:0"]
    return round(keep * 32)


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_metric_faults_fail_their_trials_and_the_study_goes_on(ray_cluster, task_dir):
    module = _task_module(task_dir, FAULTS)
    config = make_config({
        "task": f"{module}:make_task", "out": str(task_dir / "out"), "study": "s", "trials": 30,
        "workers": {"count": 2}, "seeding": False, "sampler": "random", "seed": 2,
        "timeout": 3, "space": {"keep": {"min": 0.125, "max": 1.0, "step": 0.125}},
    })  # fmt: skip
    result = run_search(config, sys_path=(str(task_dir),))
    assert result.error is None
    trials = _check_study(task_dir / "out" / "s")
    assert len(trials) == 30
    evaluated = trials[trials["cached_from"].isna()]
    kept = evaluated["policy"].map(_kept)
    for units, fault in FAULTS.items():
        rows = evaluated[kept == units]
        assert len(rows) >= 1, f"no trial met the {fault} fault: pick another seed"
        assert (rows["state"] == "FAIL").all(), rows
        for error in rows["error"]:
            assert EXPECTED[fault] in error, error
            _readable(error)
        assert rows["metric"].isna().all()
        assert rows["worker"].notna().all() and rows["node"].notna().all()  # hung ones too
    healthy = evaluated[~kept.isin(list(FAULTS))]
    assert len(healthy) >= 4 and (healthy["state"] == "COMPLETE").all()
    assert healthy["error"].isna().all() and healthy["metric"].between(0, 1).all()
    # two workers, each hang holds one until the timeout: only replacements let it finish
    assert (kept == 16).sum() >= 2
    assert trials["worker"].nunique() >= 3


def test_a_metric_failing_on_the_unchanged_model_is_one_clear_line(ray_cluster, task_dir,
                                                                    monkeypatch, capsys):  # fmt: skip
    module = _task_module(task_dir, {32: "raise"})  # the base model keeps all 32 units
    monkeypatch.chdir(task_dir)
    (task_dir / "c.yaml").write_text(f"task: '{module}:make_task'\nseeding: false\n"
                                     "workers: {count: 1}\n")  # fmt: skip
    code = main(["run", "c.yaml", "--out", "out", "--study", "s", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == ["prunesearch: error: the task's metric failed on the unchanged model: "
                   "RuntimeError: metric exploded on these weights"], err  # fmt: skip


def test_a_task_failing_every_trial_stops_early_with_one_clear_line(ray_cluster, task_dir,
                                                                    monkeypatch, capsys):  # fmt: skip
    # every candidate keeps fewer than the base model's 32 units, and every one scores NaN
    module = _task_module(task_dir, {units: "nan" for units in range(4, 32, 4)})
    (task_dir / "c.yaml").write_text(
        f"task: '{module}:make_task'\ntrials: 200\nseeding: false\nbaselines: false\n"
        "space: {keep: {min: 0.125, max: 0.875, step: 0.125}}\nworkers: {count: 2}\n"
    )
    monkeypatch.chdir(task_dir)
    code = main(["run", "c.yaml", "--out", "out", "--study", "s", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [err[-1]] and err[0].startswith("prunesearch: stopped early: the first "), err
    assert (
        "evaluations all failed; last error: ValueError: the task's metric returned nan" in err[0]
    )
    trials = _check_study(task_dir / "out" / "s")
    assert 0 < len(trials) < 20  # stopped long before the 200 trials asked for
    assert (trials["state"] == "FAIL").all()
