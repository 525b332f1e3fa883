"""The driver's backlog to its recorder is bounded (issue 16 follow-up): a new evaluation
is sent only while the results not yet durable in the study, plus those still to come,
stay under `unrecorded_bound`, so a driver SIGKILL costs at most that much evaluation
work. Without Ray: the driver over an in-process pool and a fake recorder far slower than
the workers. With Ray: the real recorder process, stopped (SIGSTOP) or killed while the
driver waits for it, and a driver SIGKILLed while its recorder lags. No timing is
asserted; waits are for a state, with generous deadlines."""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest

from orchestrator.config import make_config
from orchestrator.dispatcher import Dispatcher, unrecorded_bound
from orchestrator.errors import ResultsError
from orchestrator.ledger import Ledger
from orchestrator.prepare import prepare
from orchestrator.proposer import Guidance, Proposer
from orchestrator.search import SAMPLERS, Driver, run_search
from orchestrator.timing import DriverStats

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parent.parent
BOUND = unrecorded_bound(2)  # two workers everywhere here


# -- the driver alone: an in-process pool, a fake recorder -------------------------------
class InstantPool:
    """orchestrator.workers.WorkerPool's interface: every job sent ends at the next wait."""

    def __init__(self, size: int = 2) -> None:
        self.size, self.running, self.jobs, self.waits = size, [], 0, 0

    @property
    def free(self) -> int:
        return self.size - len(self.running)

    @property
    def busy(self) -> int:
        return len(self.running)

    def submit(self, job) -> None:
        self.running.append(job)
        self.jobs += 1

    def wait(self, timeout: float) -> list:
        self.waits += 1  # where the real pool checks that Ray is alive
        done, self.running = self.running, []
        return [(job, {"metric": 0.5, "eval_seconds": 0.0, "seconds": 0.0}) for job in done]


class SlowRecorder:
    """orchestrator.recorder.Recorder's interface, writing nothing on its own: each time
    the driver waits for it, it makes `per_wait` more trials durable (`None`: every trial
    is durable as soon as it is told, a recorder that keeps up). `fail_at`: the wait at
    which it raises instead (`die`: it died; `interrupt`: Ctrl-C arrives meanwhile)."""

    def __init__(self, per_wait: int | None = 3, *, fail_at: int | None = None,
                 fail: str = "die") -> None:  # fmt: skip
        self.per_wait, self.fail_at, self.fail = per_wait, fail_at, fail
        self.rows: list[dict] = []
        self.recorded = self.waits = self.unrecorded_max = 0
        self.drain_seconds, self.closed = 0.0, False

    @property
    def unrecorded(self) -> int:
        return len(self.rows) - self.recorded

    def created(self, trial) -> None:
        pass

    def finished(self, trial, row: dict) -> None:
        self.rows.append(row)
        if self.per_wait is None:
            self.recorded = len(self.rows)
        self.unrecorded_max = max(self.unrecorded_max, self.unrecorded)

    def foreign(self, local: int, number: int) -> None:
        pass

    def adopted(self) -> list:
        return []

    def wait_recorded(self, timeout: float) -> None:
        self.waits += 1
        if self.waits == self.fail_at:
            if self.fail == "interrupt":
                raise KeyboardInterrupt
            raise ResultsError("recording results failed: the recorder exited with code -9")
        self.recorded = min(len(self.rows), self.recorded + (self.per_wait or 0))

    def close(self) -> None:
        self.recorded, self.closed = len(self.rows), True


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("bp")
    return prepare(make_config({"task": "digits-cnn", "out": str(out), "study": "s",
                                "sampler": "random", "seed": 1, "trials": 300,
                                "baselines": False, "seeding": False}))  # fmt: skip


def _driver(prepared, pool: InstantPool, recorder: SlowRecorder) -> Driver:
    stats = DriverStats()
    sampler = SAMPLERS["random"](prepared.config.seed, prepared.config.trials)
    study = optuna.create_study(directions=prepared.config.directions, sampler=sampler)
    ledger = Ledger(prepared, study, recorder, [], stats=stats)
    dispatcher = Dispatcher(pool, stats=stats, front=ledger.to_beat, backlog=recorder)
    proposer = Proposer(prepared, study, record=ledger, flight=dispatcher, guidance=Guidance())
    return Driver(proposer, dispatcher, ledger, target=prepared.config.trials, quiet=True,
                  stats=stats, driver_id="test")  # fmt: skip


def test_a_slow_recorder_holds_the_driver_at_the_bound_and_the_run_completes(prepared):
    pool, recorder = InstantPool(), SlowRecorder(per_wait=3)
    driver = _driver(prepared, pool, recorder)
    driver.run()
    assert sorted(row["trial"] for row in recorder.rows) == list(range(300))
    assert recorder.closed and driver.error is None and not driver.interrupted
    # the backlog reached the bound and never went past it
    assert recorder.unrecorded_max == BOUND == 64
    # held, the driver waited for the recorder (no busy loop) and still asked its pool
    # between waits (the real pool checks there that Ray is alive)
    assert recorder.waits >= (300 - BOUND) // 3
    assert pool.waits >= recorder.waits
    assert driver.summary()["unrecorded_max"] == BOUND
    assert driver.summary()["unrecorded_bound"] == BOUND


def test_a_recorder_that_keeps_up_never_holds_the_driver(prepared):
    pool, recorder = InstantPool(), SlowRecorder(per_wait=None)
    driver = _driver(prepared, pool, recorder)
    driver.run()
    assert len(recorder.rows) == 300 and recorder.waits == 0
    assert recorder.unrecorded_max == 0 and driver.stats.held_seconds == 0


def test_a_recorder_that_dies_while_the_driver_is_held_stops_the_run(prepared):
    pool, recorder = InstantPool(), SlowRecorder(per_wait=3, fail_at=5)
    driver = _driver(prepared, pool, recorder)
    with pytest.raises(ResultsError, match="recording results failed"):
        driver.run()
    assert recorder.waits == 5 and pool.jobs <= BOUND + 4 * 3


def test_ctrl_c_while_held_drains_the_recorder(prepared):
    pool, recorder = InstantPool(), SlowRecorder(per_wait=3, fail_at=5, fail="interrupt")
    driver = _driver(prepared, pool, recorder)
    driver.run()
    assert driver.interrupted and recorder.closed and recorder.unrecorded == 0
    assert len(recorder.rows) < 300


# -- the real recorder process -----------------------------------------------------------
@dataclass(frozen=True)
class CountingFactory:
    """A trivial evaluator (no model) that counts its evaluations in a file per worker."""

    directory: str

    def __call__(self, device: Any) -> CountingEvaluator:
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        return CountingEvaluator(Path(self.directory) / str(os.getpid()))


class CountingEvaluator:
    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0

    def evaluate(self, policy: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        self.path.write_text(str(self.count))
        return {"metric": 0.5, "fidelity": 1.0, "eval_seconds": 0.0}

    def base_metric(self) -> float:
        return 1.0


def _evaluated(directory: Path) -> int:
    return sum(int(p.read_text() or 0) for p in directory.glob("*"))


def _durable(study_dir: Path) -> int:
    """Trials finished COMPLETE in the study's storage (what a resume keeps). A plain read:
    the recorder, stopped, may hold a write transaction (WAL: readers go on)."""
    with sqlite3.connect(f"file:{study_dir / 'study.db'}?mode=ro", uri=True, timeout=30) as db:
        return db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]


def _recorder_of(pid: int, deadline: float) -> psutil.Process:
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if "orchestrator.recorder" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError("no recorder process appeared")


def _until_stalled(counted: Path, deadline: float) -> int:
    """The evaluation count once it has stopped growing (the driver is held)."""
    last, same = -1, 0
    while time.monotonic() < deadline and same < 6:
        now = _evaluated(counted)
        same = same + 1 if now == last else 0
        last = now
        time.sleep(0.25)
    return last


class RecorderStopper(threading.Thread):
    """Once `start_at` evaluations are done, SIGSTOP this process's recorder, wait until the
    evaluations stall, note them and the trials durable, then `then` the recorder (SIGCONT
    or SIGKILL). A run that never stalls or never ends is interrupted (noted): no hang."""

    def __init__(self, counted: Path, study_dir: Path, *, start_at: int, then: int) -> None:
        super().__init__(daemon=True)
        self.counted, self.study_dir, self.start_at, self.then = counted, study_dir, start_at, then
        self.stalled_at = self.durable_at_stall = None
        self.hung = False
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 90
        recorder = _recorder_of(os.getpid(), deadline)
        while _evaluated(self.counted) < self.start_at and time.monotonic() < deadline:
            time.sleep(0.05)
        recorder.send_signal(signal.SIGSTOP)
        try:
            self.stalled_at = _until_stalled(self.counted, deadline)
            self.durable_at_stall = _durable(self.study_dir)
        finally:
            recorder.send_signal(self.then)
            if self.then != signal.SIGCONT:
                recorder.send_signal(signal.SIGCONT)
        if not self.done.wait(60):
            self.hung = True
            _thread.interrupt_main()


def _config(tmp_path: Path, trials: int) -> Any:
    return make_config({"task": "digits-cnn", "trials": trials, "workers": {"count": 2},
                        "sampler": "random", "seed": 0, "out": str(tmp_path / "out"),
                        "study": "s", "baselines": False, "seeding": False})  # fmt: skip


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_a_stopped_recorder_stops_new_evaluations_at_the_bound(ray_cluster, tmp_path):
    """SIGSTOP the real recorder mid-run: the driver evaluates at most the bound beyond
    what is durable, waits (the evaluations stall), and finishes once it is resumed."""
    counted, study_dir = tmp_path / "evaluated", tmp_path / "out" / "s"
    stopper = RecorderStopper(counted, study_dir, start_at=30, then=signal.SIGCONT)
    stopper.start()
    try:
        result = run_search(_config(tmp_path, 300), evaluator_factory=CountingFactory(str(counted)))
    finally:
        stopper.done.set()
    stopper.join()
    assert not stopper.hung
    assert result.error is None and len(result.trials) == 300
    assert stopper.stalled_at < 300  # held while its recorder was stopped
    assert stopper.stalled_at - stopper.durable_at_stall <= BOUND
    run = json.loads((study_dir / "run.json").read_text())["runs"][-1]
    assert run["unrecorded_bound"] == BOUND and 0 < run["unrecorded_max"] <= BOUND
    assert _evaluated(counted) == 300  # nothing evaluated twice either


def test_a_recorder_killed_while_the_driver_is_held_stops_the_run(ray_cluster, tmp_path):
    """The existing recorder-death handling fires while the driver waits for it: one
    ResultsError, no hang."""
    counted, study_dir = tmp_path / "evaluated", tmp_path / "out" / "s"
    stopper = RecorderStopper(counted, study_dir, start_at=30, then=signal.SIGKILL)
    stopper.start()
    try:
        with pytest.raises(ResultsError, match="recording results failed"):
            run_search(_config(tmp_path, 300), evaluator_factory=CountingFactory(str(counted)))
    finally:
        stopper.done.set()
    stopper.join()
    assert not stopper.hung and stopper.stalled_at < 300


DRIVE = """
import sys
from orchestrator.config import make_config
from orchestrator.search import run_search
from tests.test_backpressure import CountingFactory
out, counted = sys.argv[1], sys.argv[2]
config = make_config({"task": "digits-cnn", "trials": 5000, "workers": {"count": 2},
                      "sampler": "random", "seed": 0, "out": out, "study": "s",
                      "baselines": False, "seeding": False})
run_search(config, evaluator_factory=CountingFactory(counted), quiet=True)
"""


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_a_driver_sigkill_loses_at_most_the_bound_of_evaluations(tmp_path):
    """Trivial evaluations outrun the SQLite recorder; at a driver SIGKILL, the evaluations
    that never became durable trials (evaluated again on --resume) are within the bound.
    (Before the bound, with 300 evaluations done, the study held about a third of them.)"""
    counted, study_dir = tmp_path / "evaluated", tmp_path / "out" / "s"
    proc = subprocess.Popen([sys.executable, "-c", DRIVE, str(tmp_path / "out"), str(counted)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        recorder = _recorder_of(proc.pid, deadline)
        while _evaluated(counted) < 300 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        family = psutil.Process(proc.pid).children(recursive=True)  # its Ray, its recorder
        proc.kill()  # SIGKILL: no cleanup in the driver
        proc.wait()
        psutil.wait_procs([recorder], timeout=60)  # it writes what it was sent, then exits
        assert not recorder.is_running()
    finally:
        proc.kill()
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.kill()
    evaluated, durable = _evaluated(counted), _durable(study_dir)
    assert evaluated >= 300 and durable > 0
    assert evaluated - durable <= BOUND
