"""Compaction of trial parts (issue 16, point 4): the number of files stays bounded however
many flushes, and every reader gets each trial once, during merges, after a crash in the
middle of one, and with several writers on one directory. Real Parquet files, real
processes, real SIGKILL; no timing is asserted."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from orchestrator import compaction
from orchestrator.compaction import FANOUT, MERGED_PREFIX
from orchestrator.results import ResultSink, load_results, read_trials


def _row(trial: int) -> dict:
    return {"study": "s", "trial": trial, "state": "COMPLETE", "metric": 1.0 / (trial + 1),
            "size_bytes": 1000 + trial, "feasible": True, "policy": "{}",
            "policy_hash": f"p{trial}"}  # fmt: skip


def _parts(study: Path) -> list[str]:
    return sorted(p.name for p in (study / "trials").glob("part-*.parquet"))


def _bound(trials: int) -> int:
    """At most FANOUT - 1 files per power of FANOUT up to `trials` rows."""
    return (FANOUT - 1) * (compaction._level(trials) + 1)


def _plain(study: Path) -> pd.Series:
    """The trial numbers a third-party reader gets: pandas over the directory."""
    return pd.read_parquet(study / "trials")["trial"]


def _flushes(sink: ResultSink, trials: range, *, per: int) -> int:
    """Record `trials` in flushes of `per` rows, compacting after each as the recorder
    does; returns the merges done."""
    merges = 0
    for start in range(trials.start, trials.stop, per):
        for trial in range(start, min(start + per, trials.stop)):
            sink.add(_row(trial))
        sink.flush()
        merges += sum(step.merged is not None for step in sink.compact())
    return merges


# a writer process: WRITER STUDY FIRST FLUSHES PER; after each flush and its merges it
# writes progress-FIRST: "trials flushed so far, merges so far"
_WRITER = """
import sys
from pathlib import Path
from orchestrator.atomic import atomic_write_bytes
from orchestrator.results import ResultSink
study, first, flushes, per = Path(sys.argv[1]), *map(int, sys.argv[2:5])
sink, merges = ResultSink(study), 0
for i in range(flushes):
    for trial in range(first + i * per, first + (i + 1) * per):
        sink.add({"study": "s", "trial": trial, "state": "COMPLETE", "metric": 0.5,
                  "size_bytes": trial, "feasible": True, "policy": "{}", "policy_hash": str(trial)})
    sink.flush()
    merges += sum(step.merged is not None for step in sink.compact())
    atomic_write_bytes(study / f"progress-{first}", f"{(i + 1) * per} {merges}".encode())
"""


def _writer(study: Path, *, first: int = 0, flushes: int, per: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(study), str(first), str(flushes),
                             str(per)])  # fmt: skip


def _progress(study: Path, first: int = 0) -> tuple[int, int]:
    path = study / f"progress-{first}"
    if not path.exists():
        return 0, 0
    done, merges = path.read_text().split()
    return int(done), int(merges)


def _wait_for(study: Path, proc: subprocess.Popen, *, merges: int, first: int = 0) -> None:
    while _progress(study, first)[1] < merges:
        assert proc.poll() is None, "the writer exited early"
        time.sleep(0.01)


# ---------------------------------------------------------------- (a) bounded, each once


def test_many_flushes_leave_a_bounded_number_of_files_each_trial_once(tmp_path):
    sink = ResultSink(tmp_path)
    merges = _flushes(sink, range(1500), per=10)  # 150 flushes
    (tmp_path / "run.json").write_text("{}")
    assert merges > 0
    assert len(_parts(tmp_path)) <= _bound(1500)
    assert sorted(_plain(tmp_path)) == list(range(1500))  # third-party reader: each once
    assert list(load_results(tmp_path)["trial"]) == list(range(1500))
    assert sorted(sink.frame()["trial"]) == list(range(1500))  # the sink followed its merges
    assert list(ResultSink(tmp_path).frame()["trial"]) == list(range(1500))
    assert [p.name for p in (tmp_path / "trials").glob(".part-*")] == []  # no temporary file
    for name in _parts(tmp_path):
        if name.startswith(MERGED_PREFIX):  # merged files are whole row groups
            assert pq.read_metadata(tmp_path / "trials" / name).num_row_groups == 1


def test_merged_files_are_merged_again_by_size(tmp_path):
    """Tiers: the FANOUT smallest files merge first, merged files of similar size later,
    so each row is rewritten a few times, not once per merge."""
    sink = ResultSink(tmp_path)
    _flushes(sink, range(FANOUT - 1), per=1)
    assert len(_parts(tmp_path)) == FANOUT - 1  # below the fan-out: nothing merged yet
    _flushes(sink, range(FANOUT - 1, FANOUT), per=1)
    (merged,) = _parts(tmp_path)
    assert merged.startswith(MERGED_PREFIX)
    _flushes(sink, range(FANOUT, FANOUT * FANOUT), per=1)
    rows = sorted(pq.read_metadata(tmp_path / "trials" / n).num_rows for n in _parts(tmp_path))
    assert rows == [FANOUT * FANOUT]  # eight merged files of eight became one


def test_small_studies_get_no_lock_files(tmp_path):
    """Below the fan-out nothing is merged, and the directory holds the parts alone."""
    sink = ResultSink(tmp_path)
    _flushes(sink, range(FANOUT - 1), per=1)
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == _parts(tmp_path)


# ---------------------------------------------------------------- (b) readers during merges


def test_readers_in_a_loop_during_merges_get_each_trial_once(tmp_path):
    """A writer process flushes and merges 300 times while this process reads in a loop:
    our readers (load_results, a second sink following the directory) get exactly the
    trials recorded so far, once each. Pandas over the directory takes no lock: it never
    misses a trial, but a read that overlaps a merge's publication may get its rows twice
    or fail with FileNotFoundError (README)."""
    (tmp_path / "run.json").write_text("{}")
    proc = _writer(tmp_path, flushes=300, per=3)
    follower = ResultSink(tmp_path)
    reads, plain_reads = 0, 0
    try:
        while proc.poll() is None:
            before = _progress(tmp_path)[0]  # trials flushed before the reads start
            ours = load_results(tmp_path)["trial"]
            follower.flush()  # nothing pending: it reads the parts added or merged
            followed = follower.frame()["trial"]
            try:
                plain = _plain(tmp_path) if before else pd.Series([], dtype="int64")
                plain_reads += 1
            except FileNotFoundError:  # a part merged away after pandas listed it
                plain = None
            after = _progress(tmp_path)[0] + 3  # a flush may have landed before its progress
            for got in (ours, followed):
                assert got.is_unique
                assert set(range(before)) <= set(got) <= set(range(after))
            if plain is not None:
                assert set(range(before)) <= set(plain) <= set(range(after))  # nothing missing
            reads += 1
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    done, merges = _progress(tmp_path)
    assert done == 900 and merges >= 30 and reads >= 20 and plain_reads >= 10
    assert list(load_results(tmp_path)["trial"]) == list(range(900))
    assert sorted(_plain(tmp_path)) == list(range(900))  # once merges are over: exact


def test_a_merge_waits_for_a_reader_holding_the_view(tmp_path):
    """Our readers list and open the parts under a shared lock: a merge cannot publish
    (rename in, remove sources) in between, whatever the directory listing does."""
    sink = ResultSink(tmp_path)
    _flushes(sink, range(FANOUT - 1), per=1)
    sink.add(_row(FANOUT - 1))
    sink.flush()
    sources = _parts(tmp_path)
    trials = tmp_path / "trials"
    (trials / compaction.VIEW_LOCK).touch()
    merger = threading.Thread(target=lambda: list(sink.compact()))
    with compaction._flock(trials / compaction.VIEW_LOCK, fcntl.LOCK_SH, create=False) as held:
        assert held
        merger.start()
        while not list(trials.glob(f".{MERGED_PREFIX}*")):  # written, waiting to publish
            assert merger.is_alive()
        merger.join(timeout=2)  # a broken lock publishes and ends meanwhile
        assert merger.is_alive() and _parts(tmp_path) == sources
    merger.join()
    assert len(_parts(tmp_path)) == 1 and sorted(_plain(tmp_path)) == list(range(FANOUT))


# ---------------------------------------------------------------- (c) a crash mid-merge


def _crash_after_rename(monkeypatch) -> None:
    """The merger dies after renaming the merged file in and before removing its sources."""

    def crash(_path):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(compaction, "_fsync_dir", crash)


def test_a_crash_between_rename_and_removal_loses_nothing_and_is_cleaned(tmp_path, monkeypatch):
    (tmp_path / "run.json").write_text("{}")
    sink = ResultSink(tmp_path)
    _flushes(sink, range(2 * FANOUT - 2), per=2)  # one part short of a merge
    for trial in range(2 * FANOUT - 2, 2 * FANOUT):
        sink.add(_row(trial))
    sink.flush()
    sources = _parts(tmp_path)
    with monkeypatch.context() as patch:
        _crash_after_rename(patch)
        with pytest.raises(KeyboardInterrupt):
            list(sink.compact())
    (merged,) = set(_parts(tmp_path)) - set(sources)
    assert set(_parts(tmp_path)) == {merged, *sources}  # both there: the window, frozen
    everything = list(range(2 * FANOUT))
    # our readers leave out what the merged file covers; pandas reads those rows twice
    assert list(load_results(tmp_path)["trial"]) == everything
    assert list(ResultSink(tmp_path).frame()["trial"]) == everything
    assert sorted(_plain(tmp_path)) == sorted(everything * 2)
    # the next merge round removes the leftovers first
    (step,) = ResultSink(tmp_path).compact()
    assert step.merged is None and set(step.removed) == set(sources)
    assert _parts(tmp_path) == [merged]
    assert sorted(_plain(tmp_path)) == everything
    sink.add(_row(2 * FANOUT))  # the sink that crashed goes on: it followed the merge
    sink.flush()
    assert list(sink.frame()["trial"]) == [*everything, 2 * FANOUT]


def test_a_torn_temporary_merged_file_is_removed_by_the_next_merge(tmp_path):
    sink = ResultSink(tmp_path)
    torn = tmp_path / "trials" / f".{MERGED_PREFIX}0123456789abcdef.parquet.x1y2"
    torn.write_bytes(b"PAR1 half a file")
    _flushes(sink, range(FANOUT), per=1)
    assert not torn.exists()
    assert sorted(_plain(tmp_path)) == list(range(FANOUT))


def test_a_writer_killed_while_merging_loses_nothing(tmp_path):
    """SIGKILL of a process that flushes and merges, three times at different moments,
    each followed by a new writer (a resume): every flushed trial is there once."""
    first = 0
    for round_, merges in enumerate((3, 7, 12)):
        proc = _writer(tmp_path, first=first, flushes=10_000, per=2)
        _wait_for(tmp_path, proc, merges=merges, first=first)
        time.sleep(0.003 * round_)  # land the kill at different points of the loop
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        flushed = _progress(tmp_path, first)[0]
        reopened = ResultSink(tmp_path)
        got = reopened.frame()["trial"]
        assert got.is_unique and set(range(first, first + flushed)) <= set(got)
        first = int(got.max()) + 1
        assert set(got) == set(range(first))  # no hole: nothing lost, nothing torn
        for name in _parts(tmp_path):
            pq.read_metadata(tmp_path / "trials" / name)
        list(reopened.compact())  # cleans whatever the kill left
        assert sorted(_plain(tmp_path)) == list(range(first))
        assert list((tmp_path / "trials").glob(f".{MERGED_PREFIX}*")) == []


# ---------------------------------------------------------------- (d) several writers


def test_two_sinks_sharing_a_directory_merging_in_turn(tmp_path):
    """Drivers of one shared study: each merges the other's parts too (they lock each
    other out), and each keeps every trial once; a third sink opened midway (a resume)
    sees the same."""
    a, b = ResultSink(tmp_path), ResultSink(tmp_path)
    for round_ in range(60):
        for sink, trial in ((a, 2 * round_), (b, 2 * round_ + 1)):
            sink.add(_row(trial))
            sink.flush()
        list((a if round_ % 3 else b).compact())
        if round_ == 30:
            assert list(ResultSink(tmp_path).frame()["trial"]) == list(range(62))
    for sink in (a, b):
        sink.flush()
        assert list(sink.frame()["trial"]) == list(range(120))
    assert sorted(_plain(tmp_path)) == list(range(120))
    assert len(_parts(tmp_path)) <= _bound(120)


def test_two_writer_processes_merging_at_once(tmp_path):
    procs = [_writer(tmp_path, first=first, flushes=150, per=2) for first in (0, 10_000)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    expected = [*range(300), *range(10_000, 10_300)]
    assert sorted(_plain(tmp_path)) == expected
    assert list(read_trials(tmp_path).sort_values("trial")["trial"]) == expected
    assert len(_parts(tmp_path)) <= _bound(600)
    assert sum(_progress(tmp_path, first)[1] for first in (0, 10_000)) > 0


def test_own_only_merges_leave_other_writers_parts(tmp_path):
    """In a bucket shared by drivers on several machines a recorder merges its own parts
    only (no lock reaches the other machines)."""
    a, b = ResultSink(tmp_path), ResultSink(tmp_path)
    for trial in range(0, 2 * FANOUT, 2):
        a.add(_row(trial))
        a.flush()
        b.add(_row(trial + 1))
        b.flush()
    steps = list(a.compact(own=True))
    assert len(steps) == 1 and len(steps[0].removed) == FANOUT
    assert set(steps[0].removed) <= a._mine and not set(steps[0].removed) & b._mine
    assert len(_parts(tmp_path)) == FANOUT + 1  # b's eight and a's merged file
    b.flush()
    assert list(b.frame()["trial"]) == list(range(2 * FANOUT))


def test_merged_file_metadata_names_its_sources(tmp_path):
    sink = ResultSink(tmp_path)
    _flushes(sink, range(FANOUT - 1), per=1)
    sources = _parts(tmp_path)
    _flushes(sink, range(FANOUT - 1, FANOUT), per=1)
    (merged,) = _parts(tmp_path)
    covers = json.loads(
        pq.read_schema(tmp_path / "trials" / merged).metadata[compaction.COVERS_KEY]
    )
    assert len(covers) == FANOUT and set(sources) < set(covers)  # the seven, and the eighth


# ---------------------------------------------------------------- (e) a mirrored out


class _FailingDeletes:
    """A pyarrow filesystem whose deletes fail while `failing` (a store that is down)."""

    def __init__(self, fs) -> None:
        self.fs, self.failing = fs, True

    def delete_file(self, path: str) -> None:
        if self.failing:
            raise OSError("store unreachable")
        self.fs.delete_file(path)

    def __getattr__(self, name: str):
        return getattr(self.fs, name)


def test_a_mirror_deletes_merged_parts_after_uploading_and_retries(tmp_path):
    """The store gets the merged file before losing the parts it replaces; a delete that
    fails is retried at the next flush, and the store never lacks a row meanwhile."""
    from orchestrator.recorder import _flush
    from orchestrator.remote import Mirror

    local, store = tmp_path / "local", tmp_path / "store"
    local.mkdir()
    (store / "trials").mkdir(parents=True)  # a local "store" has directories: make them
    sink, mirror = ResultSink(local), Mirror(f"file://{store}", local)
    mirror.fs = _FailingDeletes(mirror.fs)
    for trial in range(FANOUT):
        sink.add(_row(trial))
        _flush(sink, mirror, shared=False, last=False)
    (merged,) = _parts(local)  # merged here, right after the eighth flush wrote its part
    # the merged file uploaded beside the seven parts uploaded before (not deleted yet)
    assert merged in _parts(store) and len(_parts(store)) == FANOUT
    assert sorted(read_trials(store)["trial"]) == list(range(FANOUT))  # nothing twice for us
    mirror.fs.failing = False
    sink.add(_row(FANOUT))
    _flush(sink, mirror, shared=False, last=True)
    assert _parts(store) == _parts(local) and len(_parts(store)) == 2
    assert sorted(_plain(store)) == list(range(FANOUT + 1))
