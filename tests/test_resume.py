"""Ctrl-C leaves a resumable study; --resume finishes it with every trial recorded once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def _wait_for_rows(study_dir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((study_dir / "trials").glob("part-*.parquet")):
            return
        time.sleep(0.1)
    raise AssertionError("no trial was recorded in time")


def _check_study(study_dir: Path) -> tuple[pd.DataFrame, list]:
    for part in (study_dir / "trials").glob("part-*.parquet"):
        pq.read_table(part)  # every part reads: nothing torn
    trials = pd.read_parquet(study_dir / "trials")
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir}/study.db")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert trials["trial"].is_unique
    assert sorted(trials["trial"]) == sorted(t.number for t in finished)
    return trials, study.trials


@pytest.mark.slow
def test_ctrl_c_then_resume_loses_and_repeats_nothing(tmp_path):
    study_dir = tmp_path / "s"
    args = ("run", "--out", str(tmp_path), "--study", "s", "--workers", "2", "--quiet")
    proc = _cli(*args, "--trials", "5000", "--sampler", "random")  # cannot finish first
    _wait_for_rows(study_dir)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err

    trials, all_trials = _check_study(study_dir)
    assert 0 < len(trials) < 5000
    target = len(all_trials) + 30  # every trial so far, interrupted ones included, and 30 more
    complete_before = set(trials.loc[trials["state"] == "COMPLETE", "policy_hash"])
    interrupted = [t for t in all_trials if not t.state.is_finished()]

    # a plain rerun of the same study is refused and changes nothing
    def snapshot():  # the results files untouched; the SQLite side files are SQLite's
        files = {p: p.read_bytes() for p in study_dir.rglob("*")
                 if p.is_file() and not p.name.startswith("study.db")}  # fmt: skip
        return files, [(t.number, t.state, t.params) for t in _check_study(study_dir)[1]]

    before = snapshot()
    assert main([*args, "--trials", str(target)]) == 2
    assert snapshot() == before

    resumed = _cli(*args, "--trials", str(target), "--sampler", "random", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    trials, all_trials = _check_study(study_dir)
    assert len(trials) == len(all_trials) == target
    assert all(t.state.is_finished() for t in all_trials)

    # trials the driver left running were failed and their policies evaluated again
    by_number = trials.set_index("trial")
    for t in interrupted:
        assert by_number.loc[t.number, "state"] == "FAIL"
        assert "interrupted" in by_number.loc[t.number, "error"]
        again = trials[(trials["policy_hash"] == by_number.loc[t.number, "policy_hash"])
                       & (trials["trial"] > t.number)]  # fmt: skip
        assert len(again) >= 1
    # nothing completed before the interrupt was evaluated again (only cache hits)
    evaluated = trials[(trials["state"] == "COMPLETE") & trials["cached_from"].isna()]
    assert evaluated["policy_hash"].is_unique
    assert complete_before <= set(evaluated["policy_hash"])


def _wait_until_consistent(study_dir: Path, timeout: float = 60) -> tuple[pd.DataFrame, list]:
    """After a driver is killed its recorder still writes what it was sent, then exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _check_study(study_dir)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
def test_driver_killed_then_resume_finishes_with_every_trial_once(tmp_path):
    study_dir = tmp_path / "s"
    args = ("run", "--out", str(tmp_path), "--study", "s", "--workers", "2", "--quiet",
            "--sampler", "random")  # fmt: skip
    proc = _cli(*args, "--trials", "5000")  # cannot finish before the kill
    _wait_for_rows(study_dir)
    proc.kill()  # SIGKILL: no cleanup of any kind in the driver
    proc.communicate(timeout=60)

    trials, all_trials = _wait_until_consistent(study_dir)
    assert 0 < len(trials) < 5000
    target = len(all_trials) + 30
    resumed = _cli(*args, "--trials", str(target), "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    trials, all_trials = _check_study(study_dir)
    assert len(trials) == len(all_trials) == target
    evaluated = trials[(trials["state"] == "COMPLETE") & trials["cached_from"].isna()]
    assert evaluated["policy_hash"].is_unique  # no completed trial evaluated twice


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_resume_is_refused_while_another_driver_runs_the_study(tmp_path):
    """--resume fails the trials a dead driver left running: never a live driver's."""
    study_dir = tmp_path / "s"
    args = ("run", "--out", str(tmp_path), "--study", "s", "--workers", "1", "--quiet",
            "--sampler", "random")  # fmt: skip
    proc = _cli(*args, "--trials", "5000")
    try:
        _wait_for_rows(study_dir)
        second = _cli(*args, "--trials", "5000", "--resume")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert len(err.strip().splitlines()) == 1
        assert "being run by another driver" in err and f"pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    _check_study(study_dir)  # the refused resume touched nothing: each trial once


def slow_digits():
    """digits-cnn whose metric logs how many batches it scored (to PRUNESEARCH_TEST_LOG)
    and, while PRUNESEARCH_TEST_SLOW is set, takes 0.3 s: a sensitivity phase to stop."""
    import os

    from orchestrator.batches import accuracy
    from orchestrator.task import resolve_task

    base = resolve_task("digits-cnn")

    def metric(model, batches):
        batches = list(batches)
        with open(os.environ["PRUNESEARCH_TEST_LOG"], "a") as log:
            log.write(f"{len(batches)}\n")
        if os.environ.get("PRUNESEARCH_TEST_SLOW"):
            time.sleep(0.3)
        return accuracy(model, batches)

    from dataclasses import replace

    return replace(base, name="slow-digits", metric=metric)


@pytest.mark.slow
def test_ctrl_c_in_the_sensitivity_phase_keeps_its_probes_and_resumes(tmp_path):
    import os
    import threading

    log = tmp_path / "metric.log"
    env = {**os.environ, "PRUNESEARCH_CACHE": str(tmp_path / "cache"),
           "PRUNESEARCH_TEST_LOG": str(log), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text("task: tests.test_resume:slow_digits\ntrials: 60\n"
                      "fidelity: {enabled: false}\n")  # fmt: skip
    args = (str(config), "--out", str(tmp_path), "--study", "s", "--workers", "2")
    proc = _cli("run", *args, env={**env, "PRUNESEARCH_TEST_SLOW": "1"})
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")),
                              daemon=True)  # fmt: skip
    reader.start()
    deadline = time.monotonic() + 120
    while "sensitivity: " not in "".join(seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.2)  # some probes done, not all (51 x 0.3 s on 2 workers; its time limit
    # is 15 evaluations of about 0.35 s shared by 2 workers)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(seen)
    assert proc.returncode == 130, err
    assert "--resume" in err
    probes_before = log.read_text().split().count("1")  # one-batch calls: the probes
    assert 0 < probes_before < 51, err
    (cached,) = (tmp_path / "cache" / "sensitivity").glob("*.parquet")
    kept = len(pd.read_parquet(cached))  # every probe done is kept; the (at most 2) in
    assert probes_before - 2 <= kept <= probes_before  # flight when Ctrl-C came are not
    assert (tmp_path / "s" / "run.json").is_file() and (tmp_path / "s" / "study.db").is_file()

    resumed = _cli("run", *args, "--resume", env=env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    # the resumed study measured only probes left (as many as its time allowed): no probe
    # twice, the in-flight ones lost at Ctrl-C aside
    after = len(pd.read_parquet(cached))
    assert kept < after <= 51
    assert log.read_text().split().count("1") == after + (probes_before - kept)
    trials, _ = _check_study(tmp_path / "s")
    assert len(trials) == 60 and (trials["origin"] == "seed").any()
