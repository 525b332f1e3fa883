"""Compaction of a study's `trials/` parts, and the one way this package lists them.

Every flush adds one small part, so a day-long study would leave tens of thousands of
files. The recorder merges them in the background, tiered like an LSM tree: once FANOUT
files hold a similar number of rows (the same power of FANOUT), they become one
`part-merged-<random>.parquet` of one row group, so each row is rewritten about
log_FANOUT(trials) times and the directory holds at most (FANOUT - 1) files per power:
about 35 for 10,000 trials, 49 for a million.

Why a lock, and what a plain reader sees. A merge must both add the merged file and
remove its sources; POSIX has no atomic rename of several files, and each step changes
one file, so a reader that lists the directory without coordination can always meet a
moment with the merged rows twice (merged file added first) or missing (sources removed
first). We add first, so nothing is ever missing, and keep the window to the few
unlinks after one rename:
- this package's readers (`open_view`: load_results, read_trials, the sink) take a shared
  flock on `trials/.view.lock` while they list and open the files (open files stay
  readable after an unlink), and the merge publishes (rename + unlinks) under the
  exclusive lock: they see the directory before a merge or after it, never between;
- each merged file names its sources in its key-value metadata (COVERS_KEY), and every
  listing here leaves out a part a merged file it also sees covers: a crash between the
  rename and the unlinks loses nothing and doubles nothing for us, and the next merge
  removes those leftovers first;
- a plain `pd.read_parquet(".../trials")` (pyarrow, DuckDB, Polars) takes no lock: while a
  merge publishes (about a millisecond, every FANOUT flushes) it may read the merged rows
  twice, or fail with FileNotFoundError on a source removed after it listed the
  directory; after a crash mid-merge the duplicates stay until the next merge. Never a
  missing row. README's "What is recorded" says so.
Mergers exclude each other with `trials/.merge.lock` (flock, non-blocking: a busy lock
means another process is merging this round). flock locks die with their process, so a
killed merger leaves no stale lock; its temporary file is hidden and removed next time.
flock is POSIX: where there is none (Windows) nothing is merged. On NFS it needs a client
that maps flock to NFS locks (Linux does, since 2.6.12).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.atomic import write_temp

try:
    import fcntl
except ImportError:  # Windows: no flock, so no merging there; readers list the parts plainly
    fcntl = None

FANOUT = 8
MERGED_PREFIX = "part-merged-"
COVERS_KEY = b"prunesearch.covers"
VIEW_LOCK, MERGE_LOCK = ".view.lock", ".merge.lock"
_SH, _EX, _NB = (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_NB) if fcntl else (0, 0, 0)


@dataclass(frozen=True, kw_only=True)
class Merge:
    """One step of a compaction: `merged` (None for the removal of a crash's leftovers)
    now holds the rows of `removed`, which are gone."""

    merged: str | None
    removed: tuple[str, ...]


# ---------------------------------------------------------------- reading


@functools.lru_cache(maxsize=65536)
def _footer(path: str) -> tuple[int, tuple[str, ...]]:
    """(rows, the part names it covers) of a part: names are never reused, so cached."""
    meta = pq.read_metadata(path)
    kv = meta.metadata or {}
    return meta.num_rows, tuple(json.loads(kv[COVERS_KEY])) if COVERS_KEY in kv else ()


def _listed(trials: Path) -> list[str]:
    return sorted(p.name for p in trials.glob("part-*.parquet"))


def _covered(trials: Path, names: list[str]) -> set[str]:
    covered: set[str] = set()
    for name in names:
        if name.startswith(MERGED_PREFIX):
            with contextlib.suppress(FileNotFoundError):  # merged away meanwhile (no lock)
                covered.update(_footer(str(trials / name))[1])
    return covered


def visible(trials: Path) -> tuple[list[str], list[str]]:
    """(the parts that hold the rows, the leftovers a merged file covers)."""
    names = _listed(trials)
    covered = _covered(trials, names)
    return [n for n in names if n not in covered], [n for n in names if n in covered]


@contextlib.contextmanager
def _flock(path: Path, mode: int, *, create: bool) -> Iterator[bool]:
    """Hold flock `mode` on `path`; yields False where the lock is not held (LOCK_NB and
    busy, or no lock file and not `create`)."""
    if fcntl is None:
        yield False
        return
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o644)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


View = tuple[list[str], dict[str, BinaryIO]]  # (visible part names, open files)


def open_view(trials: Path, known: frozenset[str] = frozenset()) -> View:
    """The visible parts, and open files for those not in `known` (for all of them where
    a known one was merged away), taken under the shared view lock: a consistent state,
    before or after any merge. The caller closes the files."""
    for _ in range(10):
        with _flock(trials / VIEW_LOCK, _SH, create=False) as locked:
            try:
                names, files = _open(trials, known)
            except FileNotFoundError:  # merged away between listing and opening (no lock)
                continue
            # No lock file at first: no merge had published yet. One that appeared meanwhile
            # may have published during our listing: list again, under the lock.
            if locked or not (trials / VIEW_LOCK).exists():
                return names, files
            for f in files.values():
                f.close()
    raise OSError(errno.EAGAIN, f"{trials} kept changing while it was read; try again")


def _open(trials: Path, known: frozenset[str]) -> View:
    names = visible(trials)[0]
    wanted = names if not known <= set(names) else [n for n in names if n not in known]
    files: dict[str, BinaryIO] = {}
    try:
        for name in wanted:
            files[name] = open(trials / name, "rb")  # noqa: SIM115 - closed by the caller
    except BaseException:
        for f in files.values():
            f.close()
        raise
    return names, files


def read_view(trials: Path, schema: pa.Schema) -> pa.Table:
    """Every row of a trials directory, each once (see the module docstring)."""
    _, files = open_view(trials)
    try:
        tables = [pq.read_table(f, schema=schema) for f in files.values()]
    finally:
        for f in files.values():
            f.close()
    return pa.concat_tables(tables) if tables else schema.empty_table()


# ---------------------------------------------------------------- merging


def compact(
    trials: Path, *, schema: pa.Schema, only: frozenset[str] | None = None
) -> Iterator[Merge]:
    """Remove a crashed merge's leftovers, then merge while some power of FANOUT holds
    FANOUT parts (of `only`, where given). Yields each step once it is done (so a caller
    hears of those before a failure); nothing where another process is merging."""
    if fcntl is None or not _work(trials, only):  # common: no lock file, no listing under lock
        return
    with _flock(trials / MERGE_LOCK, _EX | _NB, create=True) as held:
        if not held:
            return
        if step := _clean(trials):
            yield step
        while group := _next_group(trials, only):
            yield _merge(trials, group, schema)


def _work(trials: Path, only: frozenset[str] | None) -> bool:
    try:
        names, leftovers = visible(trials)
        return bool(leftovers) or _next_group(trials, only, names=names) is not None
    except FileNotFoundError:  # another process merged meanwhile: look under the lock
        return True


def _level(rows: int) -> int:
    """The power of FANOUT below `rows`: FANOUT files of one level merge into a higher one."""
    level = 0
    while rows >= FANOUT ** (level + 1):
        level += 1
    return level


def _next_group(trials: Path, only: frozenset[str] | None, *,
                names: list[str] | None = None) -> tuple[str, ...] | None:  # fmt: skip
    """The parts of the lowest power of FANOUT (by rows) that holds FANOUT of them."""
    levels: dict[int, list[str]] = {}
    for name in visible(trials)[0] if names is None else names:
        if only is None or name in only:
            rows = _footer(str(trials / name))[0]
            levels.setdefault(_level(rows), []).append(name)
    full = [level for level, group in levels.items() if len(group) >= FANOUT]
    return tuple(levels[min(full)]) if full else None


def _clean(trials: Path) -> Merge | None:
    """A killed merger's leftovers: its hidden temporary file, and sources it renamed a
    merged file over but did not remove (we hold the merge lock: no merge is under way)."""
    for temp in trials.glob(f".{MERGED_PREFIX}*"):
        temp.unlink(missing_ok=True)
    leftovers = visible(trials)[1]
    if not leftovers:
        return None
    with _flock(trials / VIEW_LOCK, _EX, create=True):
        for name in leftovers:
            (trials / name).unlink(missing_ok=True)
    return Merge(merged=None, removed=tuple(leftovers))


def _merge(trials: Path, group: tuple[str, ...], schema: pa.Schema) -> Merge:
    table = pa.concat_tables([pq.read_table(trials / n, schema=schema) for n in group])
    table = table.replace_schema_metadata({COVERS_KEY: json.dumps(list(group)).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(table.num_rows, 1))  # one row group
    name = f"{MERGED_PREFIX}{uuid.uuid4().hex[:16]}.parquet"
    temp = write_temp(trials / name, sink.getvalue().to_pybytes())
    _publish(trials, temp, name, group)
    return Merge(merged=name, removed=group)


def _publish(trials: Path, temp: Path, name: str, group: tuple[str, ...]) -> None:
    """Rename the merged file in, then remove its sources, under the exclusive view lock.
    The directory is fsynced between the two, so no crash keeps the removals and loses
    the rename."""
    with _flock(trials / VIEW_LOCK, _EX, create=True):
        os.replace(temp, trials / name)
        _fsync_dir(trials)
        for source in group:
            (trials / source).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
