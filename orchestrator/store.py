"""Durable record of a study: Optuna storage (SQLite by default) plus the Parquet sink.

The driver samples from an in-memory Optuna study, so asking and telling cost well under
a millisecond. Optuna's RDB storage costs 10-40 ms of SQLAlchemy work per trial here
(one transaction per parameter); done in the driver, or in a thread of it holding the
GIL, that would make the driver the bottleneck. So a recorder *process*
(`python -m orchestrator.recorder`) replays every trial into the durable study in ask
order (trial numbers match) and then hands the finished trial's row to the Parquet sink:
Parquet never claims a trial the study lost.

The driver streams pickled messages to the recorder's stdin through a pump thread that
blocks in `write` (no GIL held). If the driver dies, the recorder reads end-of-file,
records everything it was sent, flushes, and exits; it runs in its own session so a
Ctrl-C in the terminal reaches only the driver.

Resume: trials left RUNNING by a stopped driver are marked FAIL ("interrupted") and their
parameters re-queued; the finished trials are copied into a fresh in-memory study.

Shared studies (`run --join`): several drivers, each with its own workers, run one study.
The storage assigns trial numbers, so a driver's in-memory numbers are its own: its
recorder maps them to the storage's (rows carry the storage's numbers) and every few
seconds reads the trials other drivers finished (`TrialFeed`) and sends them back up its
stdout; the driver adds them to its in-memory study, so its sampler learns from them and
its evaluation cache answers their policies. Each trial records its driver (`OWNER_ATTR`)
and each driver its own heartbeat, so a joining driver fails and re-queues only the
trials of drivers that are gone.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchestrator.results import ResultSink
from orchestrator.storage import close_storage, open_storage

ROW_ATTR = "prunesearch.row"
OWNER_ATTR = "prunesearch.owner"  # trial system attr: the id of the driver that asked it
# each driver of a study: "prunesearch.driver:<id>" -> {"host", "pid", "at" (unix time),
# "stopped"}; written by its recorder every HEARTBEAT_SECONDS, so a --resume can tell a
# live driver and a --join the trials of dead ones
DRIVER_ATTR = "prunesearch.driver"
SYNC_SECONDS = 2.0  # how often a shared study's recorder reads other drivers' trials
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 45.0
INTERRUPTED = "interrupted: the driver stopped before this trial finished; re-queued on resume"
_HEADER = struct.Struct("<I")  # length prefix of each pickled message


def new_driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class OpenedStudy:
    study_id: int
    finished: list[FrozenTrial]  # in trial-number order, all finished
    requeue: list[dict[str, Any]] = field(default_factory=list)  # params of interrupted trials
    created: bool = True  # this driver created the study (it queues the baselines)
    live: set[str] = field(default_factory=set)  # ids of the other drivers running it now


def open_study(url: str, name: str, directions: list[str], *, resume: bool,
               join: bool = False) -> OpenedStudy:  # fmt: skip
    storage = open_storage(url)
    try:
        if not resume:
            try:
                study = optuna.create_study(storage=storage, study_name=name,
                                            directions=directions)  # fmt: skip
                return OpenedStudy(study_id=study._study_id, finished=[])
            except optuna.exceptions.DuplicatedStudyError:
                if not join:
                    raise
        study = optuna.load_study(storage=storage, study_name=name)
        live = set(live_drivers(storage, study._study_id))
        requeue = [dict(trial.params) for trial in study.get_trials(deepcopy=False)
                   if not trial.state.is_finished()
                   and trial.system_attrs.get(OWNER_ATTR) not in live
                   and _fail_interrupted(storage, trial._trial_id)]  # fmt: skip
        trials = study.get_trials(deepcopy=True)
        finished = [t for t in trials if t.state.is_finished()]
        # a study resumed (not joined) before its first trial (stopped in the sensitivity
        # phase): this driver queues the baselines and seeds, as its creator would have
        first = resume and not join and not trials and not live
        return OpenedStudy(study_id=study._study_id, finished=sorted(finished, key=_number),
                           requeue=requeue, created=first, live=live)  # fmt: skip
    finally:
        close_storage(storage)


def _number(trial: FrozenTrial) -> int:
    return trial.number


def _fail_interrupted(storage: optuna.storages.BaseStorage, trial_id: int) -> bool:
    """Fail a trial its (dead) driver left running; False if it finished meanwhile or
    another joining driver failed it first (that one re-queues it)."""
    try:
        storage.set_trial_user_attr(trial_id, "error", INTERRUPTED)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


class StudyWriter:
    """Applies driver messages to the durable study, then rows to the Parquet sink.

    Messages: ("created", trial, None), ("finished", trial, row) with the driver's own
    trial numbers, and ("foreign", local, number): the driver's number for a trial of the
    study it loaded or adopted. Rows are rewritten to the storage's numbers."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int, sink: ResultSink,
                 *, driver_id: str = "", shared: bool = False) -> None:  # fmt: skip
        self.storage, self.study_id, self.sink = storage, study_id, sink
        self.driver_id, self.shared = driver_id, shared
        self._ids: dict[int, int] = {}  # driver's trial number -> storage trial id
        self._numbers: dict[int, int] = {}  # driver's trial number -> storage's trial number
        self._done: set[int] = set()
        self._beat = 0.0

    def heartbeat(self, *, driver_pid: int, stopped: bool = False) -> None:
        """Say this driver is alive (at most every HEARTBEAT_SECONDS) or gone."""
        now = time.time()
        if not stopped and now - self._beat < HEARTBEAT_SECONDS:
            return
        self._beat = now
        value = {"host": socket.gethostname(), "pid": driver_pid, "at": now, "stopped": stopped}
        self.storage.set_study_user_attr(self.study_id, f"{DRIVER_ATTR}:{self.driver_id}", value)

    def apply(self, batch: list[tuple[str, Any, Any]]) -> None:
        # unshared: a trial created and finished in one batch is written once, finished
        # (its number is known before it is created, so its row can ride along)
        finals = {} if self.shared else {t.number: (t, row) for kind, t, row in batch
                                          if kind == "finished"}  # fmt: skip
        for kind, trial, row in batch:
            if kind == "foreign":
                self._numbers[trial] = row
            elif kind == "created":
                final = finals.get(trial.number)
                if final is None:
                    self._create(trial)
                else:
                    self._create(_with_row(*final))
                    self._done.add(trial.number)
            else:
                row = self._renumbered(row)
                if trial.number not in self._done:
                    self._finish(trial, row)
                    self._done.add(trial.number)
                self.sink.add(row)

    def _renumbered(self, row: dict[str, Any]) -> dict[str, Any]:
        cached = row["cached_from"]
        return {**row, "trial": self._numbers[row["trial"]],
                "cached_from": None if cached is None else self._numbers.get(cached, cached)}  # fmt: skip

    def _create(self, trial: FrozenTrial) -> None:
        trial.system_attrs = {**trial.system_attrs, OWNER_ATTR: self.driver_id}
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=trial)
        number = self.storage.get_trial_number_from_id(trial_id)
        if number != trial.number and not self.shared:
            raise RuntimeError(
                f"trial {trial.number} became trial {number} in the study storage: another "
                "process is writing to this study; give each driver its own --study, or "
                "start every driver with --join to share it"
            )
        self._ids[trial.number] = trial_id
        self._numbers[trial.number] = number

    def _finish(self, trial: FrozenTrial, row: dict[str, Any]) -> None:
        trial_id = self._ids[trial.number]
        for key, value in _with_row(trial, row).user_attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        # a PRUNED trial's report of the prefix it was stopped on (before the state: a
        # finished trial takes no more reports)
        for step, value in trial.intermediate_values.items():
            self.storage.set_trial_intermediate_value(trial_id, step, value)
        self.storage.set_trial_state_values(trial_id, trial.state, trial.values)


class TrialFeed:
    """The trials other drivers finished, each once, read incrementally: Optuna's RDB
    storage reads only trials newer than the last seen plus those seen unfinished (its
    `_get_trials`, what its own cache used), other storages everything (the journal is
    replayed in memory)."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int, driver_id: str):
        self.storage, self.study_id, self.driver_id = storage, study_id, driver_id
        self._newest = -1
        self._unfinished: set[int] = set()
        self._seen: set[int] = set()

    def poll(self) -> list[FrozenTrial]:
        new = []
        for trial in self._read():
            trial_id = trial._trial_id
            if trial_id in self._seen:
                continue
            self._newest = max(self._newest, trial_id)
            if not trial.state.is_finished():
                self._unfinished.add(trial_id)
                continue
            self._unfinished.discard(trial_id)
            self._seen.add(trial_id)
            if trial.system_attrs.get(OWNER_ATTR) != self.driver_id:
                new.append(trial)
        return new

    def _read(self) -> list[FrozenTrial]:
        if isinstance(self.storage, optuna.storages.RDBStorage):
            return self.storage._get_trials(self.study_id, None, set(self._unfinished),
                                            self._newest)  # fmt: skip
        return self.storage.get_all_trials(self.study_id, deepcopy=False)


def live_drivers(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, dict]:
    """The drivers running a study now (heartbeat fresh and not stopped), by id."""
    prefix = f"{DRIVER_ATTR}:"
    beats = storage.get_study_user_attrs(study_id).items()
    return {key[len(prefix):]: beat for key, beat in beats
            if key.startswith(prefix) and _beating(beat)}  # fmt: skip


def _beating(beat: Any) -> bool:
    if not isinstance(beat, dict) or beat.get("stopped"):
        return False
    if time.time() - beat.get("at", 0) > STALE_SECONDS:
        return False
    # a driver that died on this machine moments ago
    return beat.get("host") != socket.gethostname() or _alive(int(beat.get("pid", 0)))


def live_driver(url: str, name: str) -> dict[str, Any] | None:
    """A driver running study `name` now, if any."""
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
        beats = live_drivers(storage, study_id)
    except KeyError:
        return None
    finally:
        close_storage(storage)
    return next(iter(beats.values()), None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return pid > 0


def _with_row(trial: FrozenTrial, row: dict[str, Any]) -> FrozenTrial:
    """The row rides in the durable study too, so a resume can rebuild lost Parquet rows."""
    trial.user_attrs = {**trial.user_attrs, ROW_ATTR: row}
    return trial


def read_messages(fd: int, timeout: float):
    """Yield (messages, eof) batches from a length-prefixed pickle stream on `fd`; a batch
    is whatever arrived within `timeout` (possibly nothing)."""
    import select

    buffer = bytearray()
    eof = False
    while not eof:
        ready, _, _ = select.select([fd], [], [], timeout)
        while ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                eof = True
                break
            buffer += chunk
            ready, _, _ = select.select([fd], [], [], 0)
        messages = []
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if len(buffer) < _HEADER.size + size:
                break
            messages.append(pickle.loads(bytes(buffer[_HEADER.size : _HEADER.size + size])))
            del buffer[: _HEADER.size + size]
        yield messages, eof
