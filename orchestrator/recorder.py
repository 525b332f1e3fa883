"""The recorder: the process (`python -m orchestrator.recorder URL STUDY STUDY_DIR
FLUSH_SECONDS DRIVER_ID own|shared REMOTE AXIS`; REMOTE: the study's URI, or '-'; AXIS:
the front's column, size_bytes or latency_ms) and the
driver's handle on it (`Recorder`). Why a process: orchestrator/store.py.

Reads the driver's messages from stdin until end-of-file, writes each trial to the
durable Optuna study and its row to Parquet (flushed every FLUSH_SECONDS and at the end),
merges small Parquet parts after each (orchestrator/compaction.py), and uploads the new
files to REMOTE after each flush (a failed upload is retried at the next; the last must
succeed). Up its stdout, as length-prefixed pickles, it acknowledges what is durable:
after each chunk of messages it writes to the study, the number of finished trials
written so far (an int; the driver holds new evaluations back while too many of its
results are not yet durable: orchestrator/dispatcher.py, UNRECORDED_MIN). In a shared
study it also sends the trials other drivers finished, every SYNC_SECONDS, as lists.
Imports no torch and no Ray: it starts in about a second.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from optuna.trial import FrozenTrial

from orchestrator.errors import ResultsError
from orchestrator.remote import Mirror
from orchestrator.results import ResultSink
from orchestrator.storage import open_storage
from orchestrator.store import _HEADER, SYNC_SECONDS, StudyWriter, TrialFeed, read_messages

# messages applied between housekeeping rounds: when the storage is slower than the driver
# a backlog builds up, and it must not hold back the flushes, the heartbeat (a driver
# silent past STALE_SECONDS looks dead to a joining driver) or the feed
CHUNK = 256


def main(argv: list[str]) -> int:
    url, study_name, study_dir, flush_seconds = argv[0], argv[1], Path(argv[2]), float(argv[3])
    driver_id, shared = argv[4], argv[5] == "shared"
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    axis = argv[7] if len(argv) > 7 else "size_bytes"
    writer = StudyWriter(storage, study_id, ResultSink(study_dir, axis=axis),
                         driver_id=driver_id, shared=shared)  # fmt: skip
    rounds = Housekeeping(writer, flush_seconds, driver=os.getppid(),
                          mirror=Mirror(argv[6], study_dir) if argv[6] != "-" else None)  # fmt: skip
    # stdout carries the acknowledgements (and the feed) alone: anything printed goes to stderr
    rounds.out = os.dup(1)
    os.dup2(2, 1)
    if shared:
        rounds.feed = TrialFeed(storage, study_id, driver_id)
    writer.heartbeat(driver_pid=rounds.driver)
    for messages, eof in read_messages(sys.stdin.fileno(), min(flush_seconds, SYNC_SECONDS)):
        for start in range(0, max(1, len(messages)), CHUNK):
            chunk = messages[start : start + CHUNK]
            writer.apply(chunk)
            rounds.recorded(sum(message[0] == "finished" for message in chunk))
            rounds.run(last=eof and start + CHUNK >= len(messages))
    return 0


@dataclass
class Housekeeping:
    """What the recorder does between chunks of messages: tell the driver how many of its
    finished trials are durable, flush rows every FLUSH_SECONDS (and upload them), say
    the driver is alive (or, at the end, gone), and in a shared study send the driver the
    trials other drivers finished every SYNC_SECONDS."""

    writer: StudyWriter
    flush_seconds: float
    driver: int
    mirror: Mirror | None = None
    feed: TrialFeed | None = None
    out: int = -1
    flushed: float = field(default_factory=time.monotonic)
    synced: float = field(default_factory=time.monotonic)
    finished: int = 0  # the driver's finished trials written to the study so far

    def recorded(self, finished: int) -> None:
        """Acknowledge `finished` more trials: in the study now, so a driver kill cannot
        lose them (a resume rebuilds Parquet rows from the study)."""
        if not finished:
            return
        self.finished += finished
        if self.out >= 0 and not _send(self.out, self.finished):
            self.out, self.feed = -1, None  # the driver is gone: recording goes on

    def run(self, *, last: bool) -> None:
        if last or time.monotonic() - self.flushed >= self.flush_seconds:
            _flush(self.writer.sink, self.mirror, shared=self.writer.shared, last=last)
            self.flushed = time.monotonic()
        self.writer.heartbeat(driver_pid=self.driver, stopped=last)  # last: the driver is gone
        if self.feed is not None and not last and time.monotonic() - self.synced >= SYNC_SECONDS:
            self.feed = self.feed if _send(self.out, self.feed.poll()) else None
            self.synced = time.monotonic()


def _flush(sink: ResultSink, mirror: Mirror | None, *, shared: bool, last: bool) -> None:
    """Write the pending rows, merge small parts, then upload (a URI study): the merged
    files first, then delete the parts they replace. Other machines' drivers of a shared
    study upload their parts: fetched first, so the front covers them too."""
    if mirror is None:
        sink.flush()
        _compact(sink, None, own=False)
        return
    try:
        if shared:
            mirror.pull("trials")
        sink.flush()
        # Drivers on other machines cannot take our locks: each merges only its own parts.
        _compact(sink, mirror, own=shared)
        mirror.push()
    except OSError as exc:
        if last:
            raise SystemExit(f"uploading to {mirror.uri} failed ({exc}); the study's files are "
                             f"in {mirror.local}") from None  # fmt: skip
        print(f"prunesearch recorder: upload to {mirror.uri} failed, retrying: {exc}",
              file=sys.stderr)  # fmt: skip


def _compact(sink: ResultSink, mirror: Mirror | None, *, own: bool) -> None:
    """Merge small parts; a failure (a full disk, a damaged foreign part) costs only more
    files: the parts are intact, and recording goes on."""
    try:
        for step in sink.compact(own=own):
            if mirror is not None:
                mirror.forget([f"trials/{name}" for name in step.removed])
    except (OSError, pa.ArrowException) as exc:
        print(f"prunesearch recorder: merging parts failed, will retry: {exc}", file=sys.stderr)


def _send(fd: int, message: list | int) -> bool:
    """Send the driver its adopted trials (a list) or how many of its finished trials are
    durable (an int); False once it is gone (recording goes on)."""
    if message == []:
        return True
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:  # BrokenPipeError: the driver died
        return False
    return True


class Recorder:
    """Driver side: streams trials to the recorder process (see the module docstring)."""

    def __init__(self, url: str, study_name: str, study_dir: Path, *, driver_id: str,
                 shared: bool = False, remote: str | None = None,
                 flush_seconds: float = 1.0, axis: str = "size_bytes") -> None:  # fmt: skip
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - open for the child's lifetime
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.recorder", url, study_name, str(study_dir),
             str(flush_seconds), driver_id, "shared" if shared else "own", remote or "-", axis],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            start_new_session=True, env={**os.environ, "PYTHONPATH": _package_root()},
        )  # fmt: skip
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pump = threading.Thread(target=self._pump_loop, name="prunesearch-recorder-pump",
                                      daemon=True)  # fmt: skip
        self._pump.start()
        self._adopted: queue.SimpleQueue = queue.SimpleQueue()  # other drivers' trials
        self._told = self._recorded = 0  # finished trials sent; of those, durable (acked)
        self._acked = threading.Condition()
        self.unrecorded_max = 0  # the most finished trials not yet durable at once
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="prunesearch-recorder-acks")  # fmt: skip
        self._reader.start()
        self.drain_seconds = 0.0

    def created(self, trial: FrozenTrial) -> None:
        self._send(("created", trial, None))

    def finished(self, trial: FrozenTrial, row: dict[str, Any]) -> None:
        self._send(("finished", trial, row))
        self._told += 1
        self.unrecorded_max = max(self.unrecorded_max, self.unrecorded)

    @property
    def unrecorded(self) -> int:
        """Finished trials sent (or queued to be) that the recorder has not yet confirmed
        in the study: what a driver SIGKILL now could cost (evaluated again on resume)."""
        return self._told - self._recorded

    def wait_recorded(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the recorder to confirm more trials durable;
        ResultsError if it died (nothing will be confirmed again)."""
        self._check()
        with self._acked:
            self._acked.wait(timeout)
        self._check()

    def foreign(self, local: int, number: int) -> None:
        """The driver's number `local` is the study's trial `number` (loaded or adopted)."""
        self._send(("foreign", local, number))

    def adopted(self) -> list[FrozenTrial]:
        """Trials other drivers finished since the last call (shared studies)."""
        trials = []
        while not self._adopted.empty():
            trials += self._adopted.get()
        return trials

    def _read_loop(self) -> None:
        try:
            for messages, _ in read_messages(self._proc.stdout.fileno(), timeout=1.0):
                for message in messages:
                    if isinstance(message, int):  # finished trials durable so far
                        with self._acked:
                            self._recorded = message
                            self._acked.notify_all()
                    else:
                        self._adopted.put(message)
        finally:  # the recorder exited: a waiting driver learns it now, not at its timeout
            with self._acked:
                self._acked.notify_all()

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
        self._reader.join()
        self.drain_seconds = time.perf_counter() - start
        if code != 0:
            raise ResultsError(f"recording results failed: {self._error_text()}")

    def _check(self) -> None:
        if self._proc.poll() is not None:
            raise ResultsError(f"recording results failed: {self._error_text()}")

    def _error_text(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"the recorder exited with code {self._proc.returncode}"


def _package_root() -> str:
    """The recorder imports this package from where the driver did (editable or not)."""
    root = str(Path(__file__).resolve().parent.parent)
    extra = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + extra if extra else "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
