"""The recorder process: `python -m orchestrator.recorder URL STUDY STUDY_DIR
FLUSH_SECONDS DRIVER_ID own|shared REMOTE` (REMOTE: the study's URI, or '-').

Reads the driver's messages from stdin until end-of-file, writes each trial to the
durable Optuna study and its row to Parquet (flushed every FLUSH_SECONDS and at the end),
and uploads the new files to REMOTE after each flush (a failed upload is retried at the
next; the last must succeed). In a shared study it also sends the trials other drivers
finished up its stdout, every SYNC_SECONDS, as length-prefixed pickled lists. Imports no
torch and no Ray: it starts in about a second.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from pathlib import Path

from orchestrator.remote import Mirror
from orchestrator.results import ResultSink
from orchestrator.storage import open_storage
from orchestrator.store import _HEADER, SYNC_SECONDS, StudyWriter, TrialFeed, read_messages


def main(argv: list[str]) -> int:
    url, study_name, study_dir, flush_seconds = argv[0], argv[1], Path(argv[2]), float(argv[3])
    driver_id, shared = argv[4], argv[5] == "shared"
    mirror = Mirror(argv[6], study_dir) if argv[6] != "-" else None
    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    writer = StudyWriter(storage, study_id, ResultSink(study_dir), driver_id=driver_id,
                         shared=shared)  # fmt: skip
    feed, out = None, -1
    if shared:  # stdout carries the feed alone: anything printed goes to stderr
        feed, out = TrialFeed(storage, study_id, driver_id), os.dup(1)
        os.dup2(2, 1)
    driver = os.getppid()
    writer.heartbeat(driver_pid=driver)
    last_flush = last_sync = time.monotonic()
    timeout = min(flush_seconds, SYNC_SECONDS)
    for messages, eof in read_messages(sys.stdin.fileno(), timeout):
        writer.apply(messages)
        if eof or time.monotonic() - last_flush >= flush_seconds:
            _flush(writer.sink, mirror, shared=shared, last=eof)
            last_flush = time.monotonic()
        writer.heartbeat(driver_pid=driver, stopped=eof)  # end of stream: the driver is gone
        if feed is not None and not eof and time.monotonic() - last_sync >= SYNC_SECONDS:
            feed = feed if _send(out, feed.poll()) else None
            last_sync = time.monotonic()
    return 0


def _flush(sink: ResultSink, mirror: Mirror | None, *, shared: bool, last: bool) -> None:
    """Write the pending rows, then upload them (a URI study). Other machines' drivers of
    a shared study upload their parts: fetched first, so the front covers them too."""
    if mirror is None:
        sink.flush()
        return
    try:
        if shared:
            mirror.pull("trials")
        sink.flush()
        mirror.push()
    except OSError as exc:
        if last:
            raise SystemExit(f"uploading to {mirror.uri} failed ({exc}); the study's files are "
                             f"in {mirror.local}") from None  # fmt: skip
        print(f"prunesearch recorder: upload to {mirror.uri} failed, retrying: {exc}",
              file=sys.stderr)  # fmt: skip


def _send(fd: int, trials: list) -> bool:
    """Send the driver its adopted trials; False once it is gone (recording goes on)."""
    if not trials:
        return True
    data = pickle.dumps(trials, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:  # BrokenPipeError: the driver died
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
