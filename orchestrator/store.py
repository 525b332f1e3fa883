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
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from orchestrator.results import ResultSink
from orchestrator.storage import close_storage, open_storage

ROW_ATTR = "prunesearch.row"
# the live driver of a study: {"host", "pid", "at" (unix time), "stopped"}; written by its
# recorder every HEARTBEAT_SECONDS, so a second driver's --resume can tell it is running
DRIVER_ATTR = "prunesearch.driver"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 45.0
INTERRUPTED = "interrupted: the driver stopped before this trial finished; re-queued on resume"
_HEADER = struct.Struct("<I")  # length prefix of each pickled message


@dataclass
class OpenedStudy:
    study_id: int
    finished: list[FrozenTrial]  # in trial-number order, all finished
    requeue: list[dict[str, Any]] = field(default_factory=list)  # params of interrupted trials


def open_study(url: str, name: str, directions: list[str], *, resume: bool) -> OpenedStudy:
    storage = open_storage(url)
    try:
        if not resume:
            study = optuna.create_study(storage=storage, study_name=name, directions=directions)
            return OpenedStudy(study_id=study._study_id, finished=[])
        study = optuna.load_study(storage=storage, study_name=name)
        requeue = []
        for trial in study.get_trials(deepcopy=False):
            if not trial.state.is_finished():
                storage.set_trial_user_attr(trial._trial_id, "error", INTERRUPTED)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                requeue.append(dict(trial.params))
        finished = sorted(study.get_trials(deepcopy=True), key=lambda t: t.number)
        return OpenedStudy(study_id=study._study_id, finished=finished, requeue=requeue)
    finally:
        close_storage(storage)


class StudyWriter:
    """Applies driver messages to the durable study, then rows to the Parquet sink."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_id: int,
                 sink: ResultSink) -> None:  # fmt: skip
        self.storage, self.study_id, self.sink = storage, study_id, sink
        self._ids: dict[int, int] = {}  # trial number -> storage trial id
        self._done: set[int] = set()
        self._beat = 0.0

    def heartbeat(self, *, driver_pid: int, stopped: bool = False) -> None:
        """Say the study's driver is alive (at most every HEARTBEAT_SECONDS) or gone."""
        now = time.time()
        if not stopped and now - self._beat < HEARTBEAT_SECONDS:
            return
        self._beat = now
        value = {"host": socket.gethostname(), "pid": driver_pid, "at": now, "stopped": stopped}
        self.storage.set_study_user_attr(self.study_id, DRIVER_ATTR, value)

    def apply(self, batch: list[tuple[str, FrozenTrial, Any]]) -> None:
        finals = {t.number: (t, row) for kind, t, row in batch if kind == "finished"}
        for kind, trial, row in batch:
            if kind == "created":
                final = finals.get(trial.number)
                if final is None:
                    self._create(trial)
                else:  # created and finished in one batch: one write, already finished
                    self._create(_with_row(*final))
                    self._done.add(trial.number)
                continue
            if trial.number not in self._done:
                self._finish(trial, row)
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

    def _finish(self, trial: FrozenTrial, row: dict[str, Any]) -> None:
        trial_id = self._ids[trial.number]
        for key, value in _with_row(trial, row).user_attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)
        self.storage.set_trial_state_values(trial_id, trial.state, trial.values)


def live_driver(url: str, name: str) -> dict[str, Any] | None:
    """The driver running study `name` now (its heartbeat is fresh and not stopped), if any."""
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
        beat = storage.get_study_user_attrs(study_id).get(DRIVER_ATTR)
    except KeyError:
        return None
    finally:
        close_storage(storage)
    if not beat or beat.get("stopped") or time.time() - beat.get("at", 0) > STALE_SECONDS:
        return None
    if beat.get("host") == socket.gethostname() and not _alive(int(beat.get("pid", 0))):
        return None  # died on this machine moments ago
    return beat


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


class Recorder:
    """Driver side: streams trials to the recorder process (see the module docstring)."""

    def __init__(self, url: str, study_name: str, study_dir: Path, *,
                 flush_seconds: float = 1.0) -> None:  # fmt: skip
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - open for the child's lifetime
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.recorder", url, study_name, str(study_dir),
             str(flush_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr,
            start_new_session=True, env={**os.environ, "PYTHONPATH": _package_root()},
        )  # fmt: skip
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pump = threading.Thread(target=self._pump_loop, name="prunesearch-recorder-pump",
                                      daemon=True)  # fmt: skip
        self._pump.start()
        self.drain_seconds = 0.0

    def created(self, trial: FrozenTrial) -> None:
        self._send(("created", trial, None))

    def finished(self, trial: FrozenTrial, row: dict[str, Any]) -> None:
        self._send(("finished", trial, row))

    def _send(self, message: tuple) -> None:
        self._check()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # a snapshot, now
        self._queue.put(_HEADER.pack(len(data)) + data)

    def _pump_loop(self) -> None:
        stdin = self._proc.stdin
        try:
            while (chunk := self._queue.get()) is not None:
                stdin.write(chunk)
                stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the recorder died: _check reports it with its own error
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def close(self) -> None:
        """Send end-of-stream and wait until every trial is durable."""
        start = time.perf_counter()
        self._queue.put(None)
        self._pump.join()
        code = self._proc.wait()
        self.drain_seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"recording results failed: {self._error_text()}")

    def _check(self) -> None:
        if self._proc.poll() is not None:
            raise RuntimeError(f"recording results failed: {self._error_text()}")

    def _error_text(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"the recorder exited with code {self._proc.returncode}"


def _package_root() -> str:
    """The recorder imports this package from where the driver did (editable or not)."""
    root = str(Path(__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + extra if extra else "")


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
