"""Durable record of a study: Optuna storage (SQLite by default) plus the Parquet sink.

The driver samples from an in-memory Optuna study, so asking and telling cost well under
a millisecond; Optuna's RDB storage costs 10-40 ms of SQLAlchemy work per trial here
(one transaction per parameter), which would make the driver the bottleneck. A
background Recorder thread replays every trial into the durable study in the same order
(so trial numbers match), then hands the finished trial's row to the Parquet sink.
Parquet rows are written only after the durable study holds the finished trial, so the
Parquet files never claim a trial the study lost.

Resume: trials left RUNNING by a stopped driver are marked FAIL ("interrupted") and
their parameters re-queued; the finished trials are copied into a fresh in-memory study.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

from orchestrator.results import ResultSink

ROW_ATTR = "prunesearch.row"
INTERRUPTED = "interrupted: the driver stopped before this trial finished; re-queued on resume"


def sqlite_storage(path: Path) -> optuna.storages.RDBStorage:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 60}}
    )

    # WAL + synchronous=NORMAL: commits survive a process crash without an fsync each,
    # and readers (optuna-dashboard, `prunesearch front`) never block the writer.
    @event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record):
        cursor = conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    storage.engine.dispose()  # reconnect so every connection gets the pragmas
    return storage


@dataclass
class OpenedStudy:
    storage: optuna.storages.BaseStorage
    study_id: int
    finished: list[FrozenTrial]  # in trial-number order, all finished
    requeue: list[dict[str, Any]] = field(default_factory=list)  # params of interrupted trials


def open_study(storage: optuna.storages.BaseStorage, name: str, directions: list[str],
               *, resume: bool) -> OpenedStudy:  # fmt: skip
    if not resume:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions)
        return OpenedStudy(storage=storage, study_id=study._study_id, finished=[])
    study = optuna.load_study(storage=storage, study_name=name)
    requeue = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished():
            storage.set_trial_user_attr(trial._trial_id, "error", INTERRUPTED)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            requeue.append(dict(trial.params))
    finished = sorted(study.get_trials(deepcopy=True), key=lambda t: t.number)
    return OpenedStudy(storage=storage, study_id=study._study_id, finished=finished,
                       requeue=requeue)  # fmt: skip


class Recorder:
    """Background writer: trials into the durable study, then rows into Parquet."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int, sink: ResultSink,
                 *, flush_seconds: float = 1.0) -> None:  # fmt: skip
        self.storage, self.study_id, self.sink = storage, study_id, sink
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue = queue.Queue()
        self._ids: dict[int, int] = {}  # trial number -> storage trial id
        self._done: set[int] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prunesearch-recorder", daemon=True)
        self._thread.start()

    def created(self, trial: FrozenTrial) -> None:
        self._check()
        self._queue.put(("created", trial, None))

    def finished(self, trial: FrozenTrial, row: dict[str, Any]) -> None:
        self._check()
        self._queue.put(("finished", trial, row))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"recording results failed: {self._error}") from self._error

    def _run(self) -> None:
        last_flush = time.monotonic()
        stop = False
        while not stop:
            try:
                batch = [self._queue.get(timeout=self.flush_seconds)]
            except queue.Empty:
                batch = []
            while True:  # drain what is there: one pass handles bursts
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is None for item in batch)
            try:
                self._apply([item for item in batch if item is not None])
                if stop or time.monotonic() - last_flush >= self.flush_seconds:
                    self.sink.flush()
                    last_flush = time.monotonic()
            except BaseException as exc:  # surfaced to the driver at its next call
                self._error = exc
                return

    def _apply(self, batch: list[tuple[str, FrozenTrial, Any]]) -> None:
        finals = {t.number: t for kind, t, _ in batch if kind == "finished"}
        for kind, trial, row in batch:
            if kind == "created":
                final = finals.get(trial.number)
                # Created and finished in one batch: one write, already finished.
                self._create(final or trial)
                if final is not None:
                    self._done.add(trial.number)
                continue
            if trial.number not in self._done:
                self._finish(trial)
                self._done.add(trial.number)
            self.sink.add(row)

    def _create(self, trial: FrozenTrial) -> None:
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=trial)
        number = self.storage.get_trial_number_from_id(trial_id)
        if number != trial.number:
            raise RuntimeError(
                f"trial {trial.number} became trial {number} in the study storage: another "
                "process is writing to this study; give each driver its own --study"
            )
        self._ids[number] = trial_id

    def _finish(self, trial: FrozenTrial) -> None:
        trial_id = self._ids[trial.number]
        for key, value in trial.user_attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        self.storage.set_trial_state_values(trial_id, trial.state, trial.values)


def replay(memory: optuna.Study, finished: list[FrozenTrial]) -> None:
    """Copy the durable study's finished trials into the in-memory one (numbers match)."""
    memory.add_trials(finished)


def row_of(trial: FrozenTrial) -> dict[str, Any] | None:
    return trial.user_attrs.get(ROW_ATTR)


Callback = Callable[[FrozenTrial], None]
