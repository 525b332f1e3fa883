"""Recorder throughput: how many finished trials per second the recorder writes to each
study storage, for one driver and for a driver of a shared study (`--join`).

The recorder process (orchestrator/recorder.py) replays the driver's trials into the
durable Optuna study and then hands their rows to Parquet. If the driver finishes trials
faster than the storage takes them, the study lags behind during the run and the rest is
written when the run ends (run.json: `driver.drain_seconds`). This times exactly what the
recorder runs, `StudyWriter.apply` in chunks of 256 messages, over the same trials (a
created and a finished message each, 9 categorical knobs like digits-cnn, a Parquet row)
for each storage side by side:

  sqlite      the default: <out>/<study>/study.db (WAL)
  journal     Optuna's journal file (journal:///path.log)
  postgresql  a real PostgreSQL server started here (pgserver; skipped if not installed)

    python benchmarks/recorder.py
    python benchmarks/recorder.py --trials 500 --knobs 18
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution

from orchestrator.recorder import CHUNK
from orchestrator.results import ResultSink
from orchestrator.storage import close_storage, open_storage
from orchestrator.store import StudyWriter, open_study

DIRECTIONS = ["minimize", "maximize"]


@contextlib.contextmanager
def storages(work: Path) -> Iterator[dict[str, str]]:
    """Storage URLs by name; PostgreSQL only where pgserver runs here."""
    urls = {"sqlite": f"sqlite:///{work / 'study.db'}", "journal": f"journal:///{work / 'j.log'}"}
    server = None
    try:
        import pgserver

        server = pgserver.get_server(work / "pg", cleanup_mode="stop")
        urls["postgresql"] = server.get_uri()
    except Exception as exc:  # ImportError, or a server that cannot start here
        print(f"postgresql skipped: {type(exc).__name__}: {exc}")
    try:
        yield urls
    finally:
        if server is not None:
            server.cleanup()


def messages(name: str, trials: int, knobs: int) -> list[tuple]:
    """What a driver sends for `trials` finished trials: created, then finished with its row."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {f"bits:{i}": CategoricalDistribution([2, 3, 4, 5, 6, 8, 32]) for i in range(knobs)}
    study = optuna.create_study(directions=DIRECTIONS)
    batch = []
    for n in range(trials):
        trial = study.ask(dists)
        batch.append(("created", study._storage.get_trial(trial._trial_id), None))
        frozen = study.tell(trial, [1000.0 + n, 0.9])
        row = {"study": name, "trial": n, "state": "COMPLETE", "metric": 0.9,
               "size_bytes": 1000 + n, "feasible": True, "policy": "{}",
               "policy_hash": f"h{n}", "cached_from": None}  # fmt: skip
        batch.append(("finished", frozen, row))
    return batch


def rate(url: str, name: str, batch: list[tuple], work: Path, *, shared: bool) -> float:
    """Trials per second `StudyWriter.apply` writes, chunked as the recorder does."""
    open_study(url, name, DIRECTIONS, resume=False)
    storage = open_storage(url)
    try:
        writer = StudyWriter(storage, storage.get_study_id_from_name(name),
                             ResultSink(work / name), driver_id="bench", shared=shared)  # fmt: skip
        start = time.perf_counter()
        for i in range(0, len(batch), CHUNK):
            writer.apply(batch[i : i + CHUNK])
        writer.sink.flush()
        return len(batch) / 2 / (time.perf_counter() - start)
    finally:
        close_storage(storage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=300, help="trials per measurement (300)")
    parser.add_argument("--knobs", type=int, default=9, help="parameters per trial (9)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; median (3)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, storages(Path(tmp)) as urls:
        for storage, url in urls.items():
            cells = []
            for shared in (False, True):
                runs = []
                for r in range(args.repeats):
                    name = f"{storage}-{int(shared)}-{r}"
                    batch = messages(name, args.trials, args.knobs)
                    runs.append(rate(url, name, batch, Path(tmp), shared=shared))
                cells.append(statistics.median(runs))
            rows.append((storage, *cells))
    print(f"recorder: {args.trials} trials x {args.knobs} knobs, median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"Optuna {optuna.__version__}\n")  # fmt: skip
    print(
        "| storage    | one driver: trials/s | ms/trial | shared study (--join): trials/s | ms/trial |"
    )
    print(
        "|------------|----------------------|----------|---------------------------------|----------|"
    )
    for storage, alone, shared in rows:
        print(f"| {storage:<10} | {alone:20.0f} | {1000 / alone:8.1f} | {shared:31.0f} | "
              f"{1000 / shared:8.1f} |")  # fmt: skip
    print("\none driver: a trial created and finished in one chunk is written once, finished;"
          "\nshared: created first (the storage numbers it), finished after (its row carries that"
          " number).")  # fmt: skip


if __name__ == "__main__":
    main()
