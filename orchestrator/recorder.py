"""The recorder process: `python -m orchestrator.recorder URL STUDY STUDY_DIR FLUSH_SECONDS`.

Reads the driver's messages from stdin until end-of-file, writes each trial to the
durable Optuna study and its row to Parquet (flushed every FLUSH_SECONDS and at the end).
Imports no torch and no Ray: it starts in about a second.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from orchestrator.results import ResultSink
from orchestrator.storage import open_storage
from orchestrator.store import StudyWriter, read_messages


def main(argv: list[str]) -> int:
    url, study_name, study_dir, flush_seconds = argv[0], argv[1], Path(argv[2]), float(argv[3])
    storage = open_storage(url)
    writer = StudyWriter(storage, storage.get_study_id_from_name(study_name),
                         ResultSink(study_dir))  # fmt: skip
    driver = os.getppid()
    writer.heartbeat(driver_pid=driver)
    last_flush = time.monotonic()
    for messages, eof in read_messages(sys.stdin.fileno(), flush_seconds):
        writer.apply(messages)
        if eof or time.monotonic() - last_flush >= flush_seconds:
            writer.sink.flush()
            last_flush = time.monotonic()
        writer.heartbeat(driver_pid=driver, stopped=eof)  # end of stream: the driver is gone
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
