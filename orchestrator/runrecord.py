"""run.json, the record of one study: one typed model, read and written only here.

`<out>/<study>/run.json` holds what a study was started with (config, versions, space,
budget, base model figures) and one entry per driver run. The driver writes it (locked,
atomic); `front`, `export`, `report`, `--resume`, `--join` and the benchmarks read it
through `read_record`, so every reader accepts the same files and refuses a damaged,
foreign or newer one with the same one-line ConfigError.

`format` names the kind of file (another tool's run.json is not a study); `version`
counts the layouts of this kind. A file without it (written before the field existed)
has the layout of version 1. A newer version is refused rather than half read: this
code cannot know what its fields mean.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.atomic import atomic_write_json
from orchestrator.budget import Budget
from orchestrator.errors import ConfigError
from orchestrator.results import read_trials

FILE = "run.json"
FORMAT = "prunesearch-study/1"
VERSION = 1
REWRITE = "rerun or resume the study to rewrite it"  # the fix a reading command suggests

# extra="allow" everywhere: a key this code does not name survives a read-modify-write
# (finish_run_json, a resumed or joined run) instead of being dropped.
_RECORD = ConfigDict(extra="allow", frozen=True)


class RunEntry(BaseModel):
    """One driver's run of the study: what it started with, then (when it ends) the
    driver's own figures (`Driver.summary`)."""

    model_config = _RECORD
    started_at: str | None = None
    trials: int | None = None
    sampler: str | None = None
    resume: bool = False
    join: bool = False
    driver_id: str = ""
    workers: list[dict[str, Any]] = []
    finished_at: str | None = None
    finished_trials: int | None = None
    interrupted: bool | None = None
    error: str | None = None
    asks: int | None = None
    infeasible_asks: int | None = None
    infeasible_share: float | None = None
    worker_seconds: float | None = None
    worker_seconds_feasible_share: float | None = None
    multi_fidelity: bool | None = None
    validation_share_saved: float | None = None
    driver: dict[str, Any] | None = None  # DriverStats.as_dict: loop and sampler timings
    adopted_trials: int | None = None


class BaseFigures(BaseModel):
    """The unpruned float model: its cost (search_spaces.cost.Cost) and metric."""

    model_config = _RECORD
    size_bytes: int | None = None
    macs: int | None = None
    bops: int | None = None
    params: int | None = None
    metric: float | None = None


class BudgetRecord(BaseModel):
    """The study's Budget as run.json holds it: the limits set, and the metric floor."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a misspelt limit is damage
    size_bytes: int | None = None
    macs: int | None = None
    bops: int | None = None
    metric_floor: float | None = None
    latency_ms: float | None = None

    @classmethod
    def of(cls, budget: Budget) -> BudgetRecord:
        latency = {} if budget.latency_ms is None else {"latency_ms": budget.latency_ms}
        return cls(**budget.limits, metric_floor=budget.metric_floor, **latency)

    def budget(self) -> Budget:
        return Budget(**self.model_dump())


class RunRecord(BaseModel):
    """run.json. Fields an older or partial file lacks read as None (or their default);
    a reader that needs one says so (`read_record(needs=...)`). `config` and `space`
    stay the plain dicts of SearchConfig and SearchSpace: their own code reads them."""

    model_config = _RECORD
    format: str = FORMAT
    version: int = Field(VERSION, strict=True, ge=1)  # strict: "2" is damage, not 2
    study: str | None = None
    created_at: str | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str] = {}
    sampler: str | None = None
    objective: str = "front"
    directions: list[str] = ["minimize", "maximize"]  # the default before it was recorded
    budget: BudgetRecord | None = None
    space: dict[str, Any] | None = None
    base: BaseFigures = BaseFigures()
    runs: list[RunEntry] = []

    @property
    def task(self) -> str | None:
        return (self.config or {}).get("task")

    def dump(self) -> dict[str, Any]:
        """The JSON object to write: what was read or set (an old file keeps its keys and
        gains none but `version`), stamped with this layout's version. A future layout
        must migrate an older record when reading it, before this stamps it."""
        data = self.model_dump(mode="json", exclude_unset=True)
        return {**data, "format": self.format, "version": VERSION}

    def finished(self, summary: dict[str, Any]) -> RunRecord:
        """This record with the driver's `summary` added to its entry (the entry of the
        same driver_id: drivers of a shared study each finish their own; else the last;
        none at all, a run.json rewritten under the driver: a new entry)."""
        runs = list(self.runs) or [RunEntry()]
        mine = [n for n, run in enumerate(runs) if run.driver_id == summary.get("driver_id")]
        n = (mine or [len(runs) - 1])[-1]
        runs[n] = RunEntry.model_validate({**runs[n].model_dump(exclude_unset=True), **summary})
        return self.model_copy(update={"runs": runs})


# -- reading ------------------------------------------------------------------------------


def damaged(where: str | Path, why: str, *, flag: str = "", fix: str = REWRITE) -> ConfigError:
    """The one message for a run.json that cannot be used (`flag`: the option that read it)."""
    return ConfigError(f"{_prefix(flag)}'{where}' is damaged ({why}); {fix}")


def read_record(study_dir: str | Path, *, needs: Iterable[str] = (), flag: str = "",
                fix: str = REWRITE) -> RunRecord:  # fmt: skip
    """The run record of a study directory, or ConfigError (one line) saying what is
    wrong. `needs`: fields this reader cannot do without (missing: damaged)."""
    path = Path(study_dir) / FILE
    if not path.is_file():
        raise ConfigError(f"{_prefix(flag)}'{study_dir}' is not a prunesearch study directory "
                          f"(no {FILE}); give <out>/<study>")  # fmt: skip
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise damaged(path, f"{type(exc).__name__}: {exc}", flag=flag, fix=fix) from None
    return parse_record(data, where=path, needs=needs, flag=flag, fix=fix)


def read_study(study_dir: str | Path, *,
               needs: Iterable[str] = ()) -> tuple[RunRecord, pd.DataFrame]:  # fmt: skip
    """The run record and the finished trials of a study directory (what `front` and
    `export` read), or ConfigError (one line) saying what is wrong."""
    record = read_record(study_dir, needs=needs)
    try:
        trials = read_trials(Path(study_dir))
    except Exception as exc:  # a torn or foreign part file: pyarrow raises many kinds
        raise ConfigError(f"study '{study_dir}' is damaged: {type(exc).__name__}: {exc}") from None
    return record, trials


def parse_record(data: str | bytes, *, where: str | Path, needs: Iterable[str] = (),
                 flag: str = "", fix: str = REWRITE) -> RunRecord:  # fmt: skip
    """A run record from run.json's text (`where`: its path or URI, for the message)."""
    try:
        raw = json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError included
        raise damaged(where, f"{type(exc).__name__}: {exc}", flag=flag, fix=fix) from None
    if not isinstance(raw, dict):
        raise damaged(where, "not a JSON object", flag=flag, fix=fix)
    _check_kind(raw, where, flag=flag)
    try:
        record = RunRecord.model_validate(raw)
    except ValidationError as exc:
        raise damaged(where, _first(exc), flag=flag, fix=fix) from None
    for name in needs:
        if getattr(record, name) is None:
            raise damaged(where, f"no '{name}' object", flag=flag, fix=fix)
    return record


def _check_kind(raw: dict[str, Any], where: str | Path, *, flag: str) -> None:
    """Another tool's file or a newer layout: refused before its fields are read, since
    their meaning is unknown here."""
    form = raw.get("format", FORMAT)
    if not isinstance(form, str) or not form.startswith("prunesearch-study/"):
        study_dir = Path(str(where)).parent
        raise ConfigError(f"{_prefix(flag)}'{study_dir}' is not a prunesearch study directory "
                          f"({FILE} has format {form!r})")  # fmt: skip
    version = raw.get("version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise ConfigError(f"{_prefix(flag)}'{where}' was written by a newer prunesearch (layout "
                          f"version {version}; this one reads up to {VERSION}); upgrade "
                          "prunesearch to read it")  # fmt: skip


def _first(exc: ValidationError) -> str:
    """One line for a validation error: the first field that is wrong and why."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {error['msg']}{more}" if where else f"{error['msg']}{more}"


def _prefix(flag: str) -> str:
    return f"{flag}: " if flag else ""


# -- which study --------------------------------------------------------------------------


def latest_study(out: str | Path, task: str | None = None) -> str | None:
    """The study `--resume` continues when no --study is given: the one whose run.json
    changed last, among the studies of `task` where a task is known (a config names it).

    Why by task: a study of another task can never be continued with this config (the
    resume check refuses it), so the newest study of *any* task would be the wrong one
    whenever two tasks share an out directory. With no task known (--resume without
    CONFIG), the newest study of any task is meant, and its recorded config names the task.
    A run.json that does not read may be this task's newest study: it stays a candidate,
    so the resume refuses it as damaged instead of silently continuing an older study."""
    found = []
    for path in Path(out).glob(f"*/{FILE}"):
        if path.is_file() and (task is None or _task_of(path) in (task, None)):
            found.append((path.stat().st_mtime, path.parent.name))
    return max(found)[1] if found else None


def _task_of(path: Path) -> str | None:
    """The task a run.json records; None where it does not read or names none."""
    try:
        return parse_record(path.read_bytes(), where=path).task
    except (OSError, ConfigError):
        return None


# -- writing ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(study_dir: Path) -> Iterator[None]:
    """An exclusive flock on a lock file beside run.json: the drivers of a shared study
    each add and update their entry, one at a time (the write itself stays atomic)."""
    import fcntl  # POSIX only: importing this module elsewhere must still work

    with open(study_dir / f".{FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_record(study_dir: Path, change: Callable[[RunRecord | None], RunRecord], *,
                  refresh: Callable[[], None] | None = None) -> RunRecord:  # fmt: skip
    """Read, change and atomically rewrite a study's run.json under its lock. `change`
    gets the current record (None: no run.json yet); `refresh` fetches run.json again
    first (a bucket's copy another machine's driver may have changed)."""
    with _locked(study_dir):
        if refresh is not None:
            refresh()
        current = read_record(study_dir) if (study_dir / FILE).is_file() else None
        record = change(current)
        atomic_write_json(study_dir / FILE, record.dump())
    return record


__all__ = ["FILE", "FORMAT", "VERSION", "BaseFigures", "BudgetRecord", "RunEntry", "RunRecord",
           "damaged", "latest_study", "parse_record", "read_record", "read_study",
           "update_record"]  # fmt: skip
