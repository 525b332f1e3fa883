"""The front (pure, property-tested) and the Parquet sink read back with pandas."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.results import (
    COLUMNS,
    STATES,
    ResultSink,
    compute_front,
    load_front,
    load_results,
    nondominated,
    read_trials,
    to_table,
)

FEW = settings(max_examples=100, deadline=None)
# few distinct values: many ties and equal points, where fronts go wrong
_sizes = st.integers(1, 12)
_metrics = st.sampled_from([-1.0, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0])


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a dominates b: no larger, no worse, and better in one (size down, metric up)."""
    return a[0] <= b[0] and a[1] >= b[1] and a != b


@FEW
@given(points=st.lists(st.tuples(_sizes, _metrics), max_size=30))
def test_nondominated_is_exactly_the_points_nothing_dominates(points):
    kept = nondominated(points)
    assert len(kept) == len(set(kept))
    expected = {i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)}
    assert set(kept) == expected


def test_nondominated_by_hand():
    points = [(10, 0.9), (5, 0.8), (5, 0.8), (7, 0.8), (3, 0.5), (20, 0.95), (20, 0.9)]
    # (7, .8) is beaten by (5, .8); (20, .9) by (10, .9); equal (5, .8) points are both kept
    assert sorted(nondominated(points)) == [0, 1, 2, 4, 5]
    assert nondominated([]) == []


def _row(trial: int, **kw) -> dict:
    row = {
        "study": "s", "trial": trial, "state": "COMPLETE", "metric": 0.5, "size_bytes": 100,
        "macs": 1000, "bops": 32000, "feasible": True, "policy": "{}",
        "policy_hash": f"h{trial}", "fidelity": 1.0, "eval_seconds": 0.1,
        "rebuild_seconds": 0.01, "worker": "w0", "node": "n0", "attempt": 0, "error": None,
        "cached_from": None, "finished_at": datetime(2024, 1, 1, tzinfo=timezone.utc).isoformat(),
    }  # fmt: skip
    row.update(kw)
    return row


@st.composite
def trial_rows(draw) -> list[dict]:
    n = draw(st.integers(0, 25))
    rows = []
    for t in range(n):
        state = draw(st.sampled_from(STATES))
        done = state == "COMPLETE"
        rows.append(_row(t, state=state, feasible=draw(st.booleans()),
                         size_bytes=draw(_sizes),
                         metric=draw(_metrics) if done or draw(st.booleans()) else None,
                         policy_hash=draw(st.sampled_from([f"h{t}", f"h{t}", "dup-a", "dup-b"]))))  # fmt: skip
    return rows


def _frame(rows: list[dict]) -> pd.DataFrame:
    return to_table(rows).to_pandas()


@FEW
@given(rows=trial_rows())
def test_front_is_the_nondominated_distinct_complete_feasible_trials(rows):
    front = compute_front(_frame(rows))
    assert list(front.columns) == list(COLUMNS)
    eligible = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    first = {}
    for r in sorted(eligible, key=lambda r: r["trial"]):
        first.setdefault(r["policy_hash"], r)  # a repeated policy counts once, as its first trial
    candidates = list(first.values())
    point = {r["trial"]: (r["size_bytes"], r["metric"]) for r in candidates}

    in_front = list(front["trial"])
    assert len(in_front) == len(set(in_front))
    assert front["policy_hash"].is_unique  # duplicate policies appear once
    assert set(in_front) <= set(point)  # INFEASIBLE / FAIL / PRUNED / infeasible never
    assert set(front["state"]) <= {"COMPLETE"} and front["feasible"].all()
    for t in in_front:  # nothing complete and feasible dominates a front point
        assert not any(_dominates(p, point[t]) for p in point.values())
    for t, p in point.items():  # and every non-dominated one is there
        if not any(_dominates(q, p) for q in point.values()):
            assert t in in_front


def test_front_by_hand():
    rows = [
        _row(0, size_bytes=100, metric=0.9),
        _row(1, size_bytes=50, metric=0.8),
        _row(2, size_bytes=50, metric=0.8, policy_hash="h1"),  # the same policy again
        _row(3, size_bytes=10, metric=0.99, state="INFEASIBLE", feasible=False),
        _row(4, size_bytes=10, metric=0.99, state="FAIL"),
        _row(5, size_bytes=10, metric=0.99, feasible=False),
        _row(6, size_bytes=60, metric=0.7),  # dominated by trial 1
        _row(7, size_bytes=20, metric=0.3),
    ]
    front = compute_front(_frame(rows))
    assert list(front["trial"]) == [7, 1, 0]  # by size
    assert list(front["size_bytes"]) == [20, 50, 100]


def test_front_of_nothing_is_empty():
    assert compute_front(_frame([])).empty
    assert compute_front(_frame([_row(0, state="FAIL", metric=None)])).empty


# ---------------------------------------------------------------- ResultSink


def _read(study_dir) -> pd.DataFrame:
    return pd.read_parquet(study_dir / "trials").sort_values("trial").reset_index(drop=True)


def test_rows_are_read_back_with_pandas(tmp_path):
    sink = ResultSink(tmp_path)
    sink.add(_row(0, metric=0.9, size_bytes=500))
    sink.add(_row(1, state="FAIL", metric=None, size_bytes=40, error="boom"))
    sink.flush()
    sink.add(_row(2, metric=0.7, size_bytes=200))
    sink.flush()
    assert len(list((tmp_path / "trials").glob("part-*.parquet"))) == 2
    df = _read(tmp_path)
    assert set(df.columns) == set(COLUMNS)
    assert list(df["trial"]) == [0, 1, 2]
    assert list(df["state"]) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert df.loc[1, "error"] == "boom" and pd.isna(df.loc[1, "metric"])
    assert df["trial"].dtype == "int64" and df["size_bytes"].dtype == "int64"
    assert df.loc[0, "finished_at"] == pd.Timestamp("2024-01-01", tz="UTC")
    pd.testing.assert_frame_equal(sink.frame()[list(COLUMNS)], df[list(COLUMNS)],
                                  check_dtype=False)  # fmt: skip


def test_same_trial_twice_is_one_row(tmp_path):
    sink = ResultSink(tmp_path)
    sink.add(_row(3, metric=0.5))
    sink.add(_row(3, metric=0.1))  # a retried result of the same trial
    sink.flush()
    sink.add(_row(3, metric=0.2))  # after a flush too
    sink.flush()
    df = _read(tmp_path)
    assert list(df["trial"]) == [3] and df.loc[0, "metric"] == 0.5
    reopened = ResultSink(tmp_path)  # a resumed driver remembers what is recorded
    reopened.add(_row(3, metric=0.3))
    reopened.add(_row(4))
    reopened.flush()
    assert list(_read(tmp_path)["trial"]) == [3, 4]


def test_flush_with_nothing_pending_writes_no_part(tmp_path):
    sink = ResultSink(tmp_path)
    sink.flush()
    assert list((tmp_path / "trials").iterdir()) == []
    assert read_trials(tmp_path).empty


def test_leftover_temporary_files_are_ignored(tmp_path):
    sink = ResultSink(tmp_path)
    sink.add(_row(0))
    sink.flush()
    trials = tmp_path / "trials"
    (trials / ".part-000009-deadbeef.parquet.x1y2").write_bytes(b"torn half of a file")
    (trials / ".pareto.parquet.abc").write_bytes(b"PAR1")
    df = pd.read_parquet(trials)
    assert list(df["trial"]) == [0]
    reopened = ResultSink(tmp_path)  # the sink's own reader skips them too
    reopened.add(_row(1))
    reopened.flush()
    assert list(_read(tmp_path)["trial"]) == [0, 1]


def test_pareto_file_is_the_front_of_all_rows(tmp_path):
    sink = ResultSink(tmp_path)
    sink.add(_row(0, size_bytes=100, metric=0.9))
    sink.add(_row(1, size_bytes=200, metric=0.8))  # dominated
    sink.flush()
    sink.add(_row(2, size_bytes=50, metric=0.6))
    sink.add(_row(3, size_bytes=10, metric=0.99, state="INFEASIBLE", feasible=False))
    sink.flush()
    pareto = pq.read_table(tmp_path / "pareto.parquet").to_pandas()
    assert sorted(pareto["trial"]) == [0, 2]
    (tmp_path / "run.json").write_text("{}")
    assert sorted(load_front(tmp_path)["trial"]) == [0, 2]
    assert list(load_results(tmp_path)["trial"]) == [0, 1, 2, 3]


def test_no_temporary_file_is_left_after_flush(tmp_path):
    sink = ResultSink(tmp_path)
    sink.add(_row(0))
    sink.flush()
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []


def test_load_results_refuses_a_non_study_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prunesearch study"):
        load_results(tmp_path)
