"""run.json through its one model (orchestrator.runrecord): round trip, old and newer
files, damage, and the one "latest study" rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from orchestrator.budget import Budget
from orchestrator.errors import ConfigError
from orchestrator.runrecord import (
    VERSION,
    BaseFigures,
    BudgetRecord,
    RunEntry,
    RunRecord,
    latest_study,
    read_record,
    update_record,
)

# A run.json as prunesearch wrote it before the `version` field (trimmed: one knob, one
# layer, no workers), kept literal so a change of the model cannot silently change it.
OLD_RUN_JSON = """{
  "base": {"bops": 6400, "macs": 100, "metric": 0.98, "params": 50, "size_bytes": 200},
  "budget": {"metric_floor": null, "size_bytes": 40000},
  "config": {"task": "digits-cnn", "trials": 4, "study": "old", "budget": "size=40KB"},
  "created_at": "2024-05-01T10:00:00+00:00",
  "directions": ["minimize", "maximize"],
  "format": "prunesearch-study/1",
  "objective": "front",
  "runs": [{"driver_id": "d1", "join": false, "resume": false, "sampler": "random",
            "started_at": "2024-05-01T10:00:01+00:00", "trials": 4, "workers": [],
            "finished_at": "2024-05-01T10:01:00+00:00", "infeasible_share": 0.25,
            "driver": {"loop_seconds": 58.5}, "some_later_figure": 7}],
  "sampler": "random",
  "space": {"knobs": [{"name": "bits:conv1"}], "profile": {"layers": [{"name": "conv1"}]}},
  "study": "old",
  "versions": {"python": "3.11.9", "torch": "2.3.0"}
}"""
OLD_KEYS = {"base", "budget", "config", "created_at", "directions", "format", "objective",
            "runs", "sampler", "space", "study", "versions"}  # fmt: skip


def _write(study_dir: Path, text: str) -> Path:
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "run.json").write_text(text)
    return study_dir


def _record(task: str = "digits-cnn", study: str = "s") -> RunRecord:
    return RunRecord(study=study, created_at="2025-01-01T00:00:00+00:00",
                     config={"task": task, "trials": 3, "study": study},
                     versions={"python": "3.11"}, sampler="tpe", objective="budget",
                     directions=["maximize"], budget=BudgetRecord.of(Budget(size_bytes=8000)),
                     space={"knobs": [], "profile": {"layers": []}},
                     base=BaseFigures(size_bytes=900, macs=10, bops=20, params=5, metric=0.9),
                     runs=[RunEntry(started_at="2025-01-01T00:00:01+00:00", trials=3,
                                    sampler="tpe", driver_id="a", workers=[])])  # fmt: skip


def test_round_trip_keeps_every_field_and_the_on_disk_keys(tmp_path):
    record = _record()
    written = update_record(tmp_path, lambda previous: record)
    read = read_record(tmp_path)
    assert read == written == record
    assert read.budget is not None and read.budget.budget() == Budget(size_bytes=8000)
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert set(on_disk) == OLD_KEYS | {"version"} and on_disk["version"] == VERSION
    assert on_disk["budget"] == {"size_bytes": 8000, "metric_floor": None}  # limits set only
    assert not list(tmp_path.glob(".run.json.*[!k]"))  # no temporary file left (only the lock)


def test_finished_adds_the_summary_to_its_own_drivers_entry(tmp_path):
    two = _record().model_copy(update={"runs": [RunEntry(driver_id="a"), RunEntry(driver_id="b")]})
    update_record(tmp_path, lambda previous: two)
    update_record(tmp_path, lambda r: r.finished({"driver_id": "a", "asks": 9, "new_key": 1}))
    runs = read_record(tmp_path).runs
    assert (runs[0].asks, runs[1].asks) == (9, None)
    assert json.loads((tmp_path / "run.json").read_text())["runs"][0]["new_key"] == 1


def test_an_old_file_without_version_reads_and_keeps_its_keys(tmp_path):
    study = _write(tmp_path / "old", OLD_RUN_JSON)
    record = read_record(study)
    assert record.version == 1 and record.task == "digits-cnn" and record.study == "old"
    assert record.base.size_bytes == 200 and record.base.metric == 0.98
    assert record.budget is not None and record.budget.budget() == Budget(size_bytes=40000)
    run = record.runs[0]
    assert run.driver == {"loop_seconds": 58.5} and run.infeasible_share == 0.25
    # rewritten (a finishing driver): nothing lost, only `version` gained
    update_record(study, lambda r: r.finished({"driver_id": "d1", "asks": 4}))
    before, after = json.loads(OLD_RUN_JSON), json.loads((study / "run.json").read_text())
    assert set(after) == set(before) | {"version"}
    assert after["runs"][0] == {**before["runs"][0], "asks": 4}
    assert all(after[k] == v for k, v in before.items() if k != "runs")


def test_front_reads_an_old_file_through_the_model(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.results import ResultSink

    study = _write(tmp_path / "old", OLD_RUN_JSON)
    sink = ResultSink(study)
    sink.add({"study": "old", "trial": 0, "state": "COMPLETE", "metric": 0.95, "size_bytes": 50,
              "macs": 10, "bops": 20, "feasible": True, "policy_hash": "h0"})  # fmt: skip
    sink.flush()
    assert main(["front", str(study)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[2]
    assert "4.0x" in row and "-0.0300" in row  # against the old file's base: 200 B, 0.98


def test_a_partial_old_file_reads_with_defaults(tmp_path):
    record = read_record(_write(tmp_path, '{"base": {"size_bytes": 2000, "metric": 0.96}}'))
    assert record.config is None and record.space is None and record.runs == []
    assert record.directions == ["minimize", "maximize"] and record.objective == "front"
    with pytest.raises(ConfigError, match=r"run.json' is damaged \(no 'config' object\)"):
        read_record(tmp_path, needs=("config",))


def test_a_newer_version_is_refused_in_one_clear_line(tmp_path, capsys):
    from orchestrator.cli import main

    data = {**json.loads(OLD_RUN_JSON), "version": VERSION + 1, "config": "changed meaning"}
    study = _write(tmp_path / "s", json.dumps(data))
    with pytest.raises(ConfigError, match=f"newer prunesearch.*version {VERSION + 1}.*upgrade"):
        read_record(study)
    assert main(["front", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer prunesearch" in err[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (OLD_RUN_JSON[: len(OLD_RUN_JSON) // 2], r"run.json' is damaged \(JSONDecodeError"),
        ("[1, 2]", r"run.json' is damaged \(not a JSON object\)"),
        ('{"directions": null}', r"run.json' is damaged \(directions: Input should be a valid list"),
        ('{"version": "2"}', r"run.json' is damaged \(version: Input should be a valid integer"),
        ('{"budget": {"size": 1}}', r"run.json' is damaged \(budget.size: Extra inputs"),
        ('{"format": "other/1"}', r"is not a prunesearch study directory \(run.json has format 'other/1'\)"),
    ],
)  # fmt: skip
def test_invalid_files_give_one_clear_error(tmp_path, text, expected):
    study = _write(tmp_path / "s", text)
    with pytest.raises(ConfigError, match=expected) as caught:
        read_record(study)
    assert "\n" not in str(caught.value)
    # read for an option: named first; a damaged file's fix is the caller's
    fix = ".*; start a new study with --study NEW_NAME$" if "damaged" in expected else ""
    with pytest.raises(ConfigError, match=f"^--resume: '.*{expected}{fix}"):
        read_record(study, flag="--resume", fix="start a new study with --study NEW_NAME")


def test_no_run_json_is_not_a_study(tmp_path):
    with pytest.raises(ConfigError, match="is not a prunesearch study directory \\(no run.json\\)"):
        read_record(tmp_path)


# -- the latest study --------------------------------------------------------------------


def _study(out: Path, name: str, task: str, age: int) -> None:
    """A study of `task` whose run.json changed `age` hours ago."""
    record = _record(task, name)
    study_dir = out / name
    study_dir.mkdir(parents=True)
    update_record(study_dir, lambda previous: record)
    stamp = 1_700_000_000 - age * 3600
    os.utime(study_dir / "run.json", (stamp, stamp))


def test_latest_study_is_the_latest_of_the_task_where_one_is_known(tmp_path):
    _study(tmp_path, "cnn-old", "digits-cnn", age=3)
    _study(tmp_path, "cnn-new", "digits-cnn", age=2)
    _study(tmp_path, "lstm", "digits-lstm", age=1)
    assert latest_study(tmp_path, "digits-cnn") == "cnn-new"  # not the newer lstm study
    assert latest_study(tmp_path, "digits-lstm") == "lstm"
    assert latest_study(tmp_path, "digits-resnet") is None
    assert latest_study(tmp_path) == "lstm"  # no task known: the newest of any
    assert latest_study(tmp_path / "nowhere") is None


def test_a_damaged_newer_study_is_not_skipped_for_an_older_one(tmp_path):
    _study(tmp_path, "cnn", "digits-cnn", age=3)
    _study(tmp_path, "torn", "digits-cnn", age=1)
    (tmp_path / "torn" / "run.json").write_text('{"config": {"ta')
    os.utime(tmp_path / "torn" / "run.json", (1_700_000_000, 1_700_000_000))
    assert latest_study(tmp_path, "digits-cnn") == "torn"  # so its resume says it is damaged


def test_cli_and_prepare_pick_the_latest_study_by_the_same_rule(tmp_path):
    from orchestrator.cli import _recorded_config
    from orchestrator.config import make_config
    from orchestrator.prepare import _study_name

    _study(tmp_path, "cnn", "digits-cnn", age=2)
    _study(tmp_path, "lstm", "digits-lstm", age=1)
    # --resume without CONFIG: no task known, the newest study's recorded config
    assert _recorded_config(str(tmp_path), None)["study"] == "lstm"
    # --resume with a CONFIG of task digits-cnn: its newest study, not the newer lstm one
    config = make_config({"task": "digits-cnn", "out": str(tmp_path)})
    assert _study_name(config, None, resume=True, join=False, remote=False) == "cnn"
    with pytest.raises(ConfigError, match="no study of task 'digits-resnet'"):
        _study_name(make_config({"task": "digits-resnet", "out": str(tmp_path)}), None,
                    resume=True, join=False, remote=False)  # fmt: skip
