"""What is recorded: the Parquet schema, immutable part files, the front, load_results.

Every flush writes one new `trials/part-*.parquet` (temporary name, fsync, `os.replace`)
and rewrites `pareto.parquet` the same way, so a crash never leaves a torn file and
`pd.read_parquet("<out>/<study>/trials")` always reads. Temporary names start with '.',
which pyarrow, pandas, DuckDB and Polars skip. The recorder merges small parts into larger
ones (orchestrator/compaction.py), and every reader here lists them through
`compaction.open_view`, which sees each trial once even while a merge runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator import compaction
from orchestrator.atomic import atomic_write_bytes

STATES = ("COMPLETE", "FAIL", "PRUNED", "INFEASIBLE")

SCHEMA = pa.schema(
    [
        ("study", pa.string()),
        ("trial", pa.int64()),
        ("state", pa.string()),
        ("metric", pa.float64()),
        ("size_bytes", pa.int64()),
        ("macs", pa.int64()),
        ("bops", pa.int64()),
        ("params", pa.int64()),  # parameter elements of the rebuilt model
        ("feasible", pa.bool_()),
        ("policy", pa.string()),
        ("policy_hash", pa.string()),
        ("fidelity", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("rebuild_seconds", pa.float64()),
        ("recovery_seconds", pa.float64()),  # BatchNorm re-estimation and fine-tuning
        ("artifact_seconds", pa.float64()),  # writing the target's file, loading it to run
        ("latency_ms", pa.float64()),  # median forward in the target runtime (`latency:`)
        ("latency_p90_ms", pa.float64()),
        ("latency_predicted_ms", pa.float64()),  # the driver's, before dispatch (latency limit)
        ("worker", pa.string()),
        ("node", pa.string()),
        ("attempt", pa.int64()),
        ("error", pa.string()),
        ("cached_from", pa.int64()),  # trial whose result a duplicate policy reused
        ("origin", pa.string()),  # sampler | baseline | seed | repair | requeued
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)
COLUMNS = tuple(SCHEMA.names)
# the columns a worker's result fills as they are (the driver knows the others)
RESULT_COLUMNS = ("fidelity", "eval_seconds", "rebuild_seconds", "recovery_seconds",
                  "artifact_seconds", "latency_ms", "latency_p90_ms", "worker",
                  "node", "attempt", "error", "cached_from")  # fmt: skip


def make_row(values: Mapping[str, Any]) -> dict[str, Any]:
    """One trial's row: every column of SCHEMA in its order, None where `values` has none.
    A name outside the schema is a bug, raised here: the schema is the one row definition."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not columns of the trial schema: {sorted(unknown)}")
    return {column: values.get(column) for column in COLUMNS}


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _cell(column: str, value: Any) -> Any:
    # Rows travel as JSON (Optuna user attrs): timestamps are ISO strings until here.
    if column == "finished_at" and isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{c: _cell(c, r.get(c)) for c in COLUMNS} for r in rows], schema=SCHEMA
    )


def nondominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (size, metric) points no other point dominates (size lower is better,
    metric higher is better). Equal points do not dominate each other: all are kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    kept: list[int] = []
    best = float("-inf")
    for i in order:
        size, metric = points[i]
        last = points[kept[-1]] if kept else None
        if metric > best or (last is not None and (size, metric) == last):
            kept.append(i)
            best = max(best, metric)
    return sorted(kept, key=lambda i: (points[i][0], -points[i][1], i))


FRONT_AXES = {"size": "size_bytes", "latency": "latency_ms"}  # config `front:` -> column


def compute_front(trials: pd.DataFrame, axis: str = "size_bytes") -> pd.DataFrame:
    """The front over feasible COMPLETE trials, `axis` (size_bytes or latency_ms) against
    the metric; one row per distinct policy (lowest trial)."""
    done = trials[(trials["state"] == "COMPLETE") & trials["feasible"].astype(bool)
                  & trials[axis].notna()]  # fmt: skip
    done = done.sort_values("trial").drop_duplicates("policy_hash", keep="first")
    points = list(zip(done[axis].astype(float), done["metric"].astype(float), strict=True))
    return done.iloc[nondominated(points)].reset_index(drop=True)


def read_trials(study_dir: Path) -> pd.DataFrame:
    return compaction.read_view(Path(study_dir) / "trials", SCHEMA).to_pandas()


class ResultSink:
    """Buffers finished-trial rows and flushes them as immutable Parquet parts.

    Several sinks may share a study directory (drivers of a shared study, or a resume
    rebuilding lost rows): each writes its own parts, and reads the others' new parts
    before it rewrites the front, so `pareto.parquet` covers every driver's trials.
    Parts merged away by `compact` (any sink's) are followed: see `_absorb_new_parts`."""

    def __init__(self, study_dir: Path, *, axis: str = "size_bytes") -> None:
        self.dir, self.axis = Path(study_dir), axis
        (self.dir / "trials").mkdir(parents=True, exist_ok=True)
        self.table = SCHEMA.empty_table()
        self.recorded: set[int] = set()
        self._known: set[str] = set()  # part files in self.table
        self._mine: set[str] = set()  # parts this sink wrote or merged
        self._absorb_new_parts()
        self.pending: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        if row["trial"] in self.recorded:  # exactly one row per trial, whatever happens
            return
        self.recorded.add(row["trial"])
        self.pending.append(row)

    def flush(self) -> None:
        # rows another writer recorded meanwhile are theirs (two resumes rebuilding a
        # dead driver's lost rows at once): one row per trial
        others = self._absorb_new_parts()
        self.pending = [row for row in self.pending if row["trial"] not in others]
        if not self.pending:
            return
        new = to_table(self.pending)
        # The random part keeps names unique when several writers share the directory.
        name = f"part-{len(self._known):06d}-{uuid.uuid4().hex[:8]}.parquet"
        _atomic_write_table(self.dir / "trials" / name, new)
        self._known.add(name)
        self._mine.add(name)
        self.pending.clear()
        self.table = pa.concat_tables([self.table, new])
        front = compute_front(self.table.to_pandas(), self.axis)
        _atomic_write_table(self.dir / "pareto.parquet",
                            pa.Table.from_pandas(front, schema=SCHEMA, preserve_index=False))  # fmt: skip

    def _absorb_new_parts(self) -> set[int]:
        """Read the parts other writers added (whole files: they appear by rename); returns
        their trial numbers. Where a part this sink holds was merged away, it reads the
        whole directory again (rarely: once per merge that another writer made), since
        the merged file holds rows it has beside rows it lacks."""
        names, files = compaction.open_view(self.dir / "trials", frozenset(self._known))
        try:
            tables = [pq.read_table(f, schema=SCHEMA) for f in files.values()]
        finally:
            for f in files.values():
                f.close()
        if not self._known <= set(names):
            self.table, self._known = SCHEMA.empty_table(), set()
        self.table = pa.concat_tables([self.table, *tables])
        self._known = set(names)
        self._mine &= self._known
        trials = {t for table in tables for t in table.column("trial").to_pylist()}
        self.recorded |= trials
        return trials

    def compact(self, *, own: bool = False) -> Iterator[compaction.Merge]:
        """Merge small parts (those this sink wrote, with `own`: drivers on different
        machines sharing a bucket cannot lock each other out), yielding each step done;
        see orchestrator/compaction.py."""
        only = frozenset(self._mine) if own else None
        for step in compaction.compact(self.dir / "trials", schema=SCHEMA, only=only):
            if step.merged is not None and self._known >= set(step.removed):
                self._known = self._known - set(step.removed) | {step.merged}
                self._mine.add(step.merged)
                # one chunk per flush would pile up too over a long study
                self.table = self.table.combine_chunks()
            yield step

    def frame(self) -> pd.DataFrame:
        rows = self.table.to_pandas()
        if self.pending:
            rows = pd.concat([rows, to_table(self.pending).to_pandas()], ignore_index=True)
        return rows.sort_values("trial").reset_index(drop=True)


def load_results(study_dir: str | Path) -> pd.DataFrame:
    """All finished trials of a study directory (a path, or an s3:// or gs:// URI), one
    row each, sorted by trial number."""
    from orchestrator.remote import local_copy

    with local_copy(study_dir) as path:
        if not (path / "run.json").is_file():
            raise FileNotFoundError(f"'{study_dir}' is not a prunesearch study directory (no "
                                    "run.json)")  # fmt: skip
        return read_trials(path).sort_values("trial").reset_index(drop=True)


def load_front(study_dir: str | Path, *, axis: str = "size_bytes") -> pd.DataFrame:
    return compute_front(load_results(study_dir), axis)


def front_axis(config: Mapping[str, Any] | None) -> str:
    """The front's column of a study by its recorded config (`front:`; size before it)."""
    return FRONT_AXES[(config or {}).get("front", "size")]
