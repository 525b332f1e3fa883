"""Results in object stores (`out: s3://...` / `gs://...`) through pyarrow's filesystems,
against S3 and GCS servers started here on the loopback (moto's S3 server, the
gcp-storage-emulator): a search writes its study there as it goes, resumes from it, and
`front`, `export` and `load_results` read it back; mistakes are one line up front."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from orchestrator.config import make_config
from orchestrator.errors import ConfigError
from orchestrator.prepare import prepare
from orchestrator.results import load_front, load_results
from orchestrator.search import run_search


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    server_mod = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_port())
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The AWS environment a user would have, pointed at the loopback server; one bucket."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    import boto3

    bucket = f"b{_port()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    fs = pafs.S3FileSystem(endpoint_override=s3_server, access_key="testing",
                           secret_key="testing", region="us-east-1")  # fmt: skip
    return f"s3://{bucket}", fs, bucket


@pytest.fixture
def gcs(monkeypatch):
    emulator = pytest.importorskip("gcp_storage_emulator.server",
                                   reason="pip install gcp-storage-emulator")  # fmt: skip
    port = _port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="results")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=f"127.0.0.1:{port}", scheme="http")
    yield "gs://results", fs, "results"
    server.stop()


def _config(out: str, tmp_path: Path, **extra):
    return make_config({"task": "digits-cnn", "seeding": False, "sampler": "random",
                        "workers": {"count": 2}, "out": out, "study": "remote",
                        "storage": f"journal://{tmp_path / 'studies.log'}", **extra})  # fmt: skip


def _journal(tmp_path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "studies.log")))
    return optuna.load_study(study_name="remote", storage=storage)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_a_search_writes_resumes_and_exports_a_study_in_s3(ray_cluster, s3, tmp_path):
    out, fs, bucket = s3
    config = _config(f"{out}/studies", tmp_path, trials=8)
    result = run_search(config)
    assert len(result.trials) == 8
    prefix = f"{bucket}/studies/remote"
    names = {info.path[len(prefix) + 1 :] for info in
             fs.get_file_info(pafs.FileSelector(prefix, recursive=True))}  # fmt: skip
    assert {"run.json", "pareto.parquet"} <= names
    assert not any(name.startswith(".") or "/." in name for name in names)  # nothing temporary
    # read straight from the bucket with pyarrow, as any tool would
    trials = pq.read_table(f"{prefix}/trials", filesystem=fs).to_pandas()
    assert sorted(trials["trial"]) == list(range(8))

    run_search(config.model_copy(update={"trials": 12}), resume=True)  # from the bucket
    study = _journal(tmp_path)
    rows = load_results(f"{out}/studies/remote")  # the public API reads URIs
    assert len(rows) == 12 and rows["trial"].is_unique
    assert sorted(rows["trial"]) == sorted(t.number for t in study.trials)
    run = json.loads(fs.open_input_stream(f"{prefix}/run.json").read())
    assert [r["resume"] for r in run["runs"]] == [False, True]
    assert not load_front(f"{out}/studies/remote").empty

    front = _cli("front", f"{out}/studies/remote")
    assert front.returncode == 0, front.stderr
    done = _cli("export", f"{out}/studies/remote")
    assert done.returncode == 0, done.stderr
    assert f"{out}/studies/remote/export/model.safetensors" in done.stdout
    policy = json.loads(fs.open_input_stream(f"{prefix}/export/policy.json").read())
    assert policy["trial"] in set(rows["trial"])


@pytest.mark.slow
def test_a_search_writes_its_study_to_gcs(ray_cluster, gcs, tmp_path):
    out, fs, bucket = gcs
    result = run_search(_config(out, tmp_path, trials=6))
    trials = pq.read_table(f"{bucket}/remote/trials", filesystem=fs).to_pandas()
    assert sorted(trials["trial"]) == sorted(result.trials["trial"]) == list(range(6))
    assert json.loads(fs.open_input_stream(f"{bucket}/remote/run.json").read())["study"] == "remote"


def test_uri_mistakes_are_one_line_before_anything_starts(s3, tmp_path):
    out, fs, bucket = s3
    with pytest.raises(ConfigError, match="object store, where the study's SQLite file cannot"):
        prepare(make_config({"task": "digits-cnn", "out": f"{out}/x"}))
    with pytest.raises(ConfigError, match="bucket 'nosuchbucket' does not exist"):
        prepare(_config("s3://nosuchbucket/x", tmp_path))
    with pytest.raises(ConfigError, match="--resume with --out 's3://.*' needs --study"):
        prepare(_config(f"{out}/x", tmp_path).model_copy(update={"study": None}), resume=True)
    with pytest.raises(ConfigError, match="--resume: 's3://.*/x/remote' is not a prunesearch"):
        prepare(_config(f"{out}/x", tmp_path), resume=True)
    with fs.open_output_stream(f"{bucket}/x/taken/run.json") as f:
        f.write(b"{}")
    with pytest.raises(ConfigError, match="study 'taken' already exists"):
        prepare(_config(f"{out}/x", tmp_path).model_copy(update={"study": "taken"}))
    done = _cli("front", f"{out}/x/nothing")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    listed = fs.get_file_info(pafs.FileSelector(bucket, recursive=True))
    assert [info.path for info in listed if info.type == pafs.FileType.File] == [
        f"{bucket}/x/taken/run.json"
    ]  # nothing written by the refusals


def test_recorders_of_drivers_on_different_machines_see_each_others_parts(s3, tmp_path):
    """Two drivers of one study (--join), each staging its own copy: each recorder's flush
    fetches the other's parts first, so both fronts cover every trial and the bucket
    holds one row per trial."""
    from orchestrator.recorder import _flush
    from orchestrator.remote import Mirror
    from orchestrator.results import ResultSink

    out, fs, bucket = s3
    uri = f"{out}/shared/s"

    def row(trial, size, metric):
        return {"study": "s", "trial": trial, "state": "COMPLETE", "metric": metric,
                "size_bytes": size, "feasible": True, "policy": "{}", "policy_hash": f"p{trial}"}  # fmt: skip

    sinks = {}
    for name in ("a", "b"):
        local = tmp_path / name / "s"
        local.mkdir(parents=True)
        sinks[name] = (ResultSink(local), Mirror(uri, local))
    (a, mirror_a), (b, mirror_b) = sinks["a"], sinks["b"]
    a.add(row(0, 100, 0.9))
    _flush(a, mirror_a, shared=True, last=False)
    b.add(row(1, 50, 0.95))
    _flush(b, mirror_b, shared=True, last=False)
    a.add(row(2, 10, 0.5))
    _flush(a, mirror_a, shared=True, last=True)
    for sink in (a, b):
        assert sink.recorded >= {0, 1}
    front = pq.read_table(f"{bucket}/shared/s/pareto.parquet", filesystem=fs).to_pandas()
    assert sorted(front["trial"]) == [1, 2]  # A's last front includes B's trial
    trials = pq.read_table(f"{bucket}/shared/s/trials", filesystem=fs).to_pandas()
    assert sorted(trials["trial"]) == [0, 1, 2]


# ---------------------------------------------------------------- compaction in a bucket


def _trial_row(trial: int) -> dict:
    return {"study": "s", "trial": trial, "state": "COMPLETE", "metric": 0.5,
            "size_bytes": trial, "feasible": True, "policy": "{}", "policy_hash": f"p{trial}"}  # fmt: skip


def _bucket_parts(fs, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{prefix}/trials", allow_not_found=True))
    return sorted(info.base_name for info in infos if info.base_name.startswith("part-"))


@pytest.mark.slow  # 8-16 s: CI's slow run
def test_merges_reach_the_bucket_and_its_readers_get_each_trial_once(s3, tmp_path):
    """The recorder's flushes merge parts, upload the merged file, then delete the parts
    it replaces: the bucket holds a bounded number of files, and `load_results` of the
    URI, in a loop while this goes on, gets the trials recorded so far, once each."""
    import threading

    from orchestrator.compaction import FANOUT, _level
    from orchestrator.recorder import _flush
    from orchestrator.remote import Mirror
    from orchestrator.results import ResultSink

    out, fs, bucket = s3
    local = tmp_path / "s"
    local.mkdir()
    (local / "run.json").write_text("{}")
    sink, mirror = ResultSink(local), Mirror(f"{out}/s", local)
    flushed, reads, errors, stop = [0], [0], [], threading.Event()

    def reader():
        while not stop.is_set():
            before = flushed[0]
            try:
                got = load_results(f"{out}/s")["trial"]
                assert got.is_unique and set(range(before)) <= set(got) <= set(range(flushed[0]))
            except Exception as exc:  # reported in the test's thread
                errors.append(exc)
                return
            reads[0] += 1

    thread = threading.Thread(target=reader)
    for flush in range(120):
        for trial in range(2 * flush, 2 * flush + 2):
            sink.add(_trial_row(trial))
        _flush(sink, mirror, shared=False, last=flush == 119)
        flushed[0] = 2 * flush + 2
        if flush == 0:
            thread.start()
    stop.set()
    thread.join()
    assert not errors, errors[0]
    assert reads[0] >= 3
    parts = _bucket_parts(fs, f"{bucket}/s")
    assert parts == sorted(p.name for p in (local / "trials").glob("part-*.parquet"))
    assert any(name.startswith("part-merged-") for name in parts)
    assert len(parts) <= (FANOUT - 1) * (_level(240) + 1)
    trials = pq.read_table(f"{bucket}/s/trials", filesystem=fs).to_pandas()  # a plain reader
    assert sorted(trials["trial"]) == list(range(240))
    assert list(load_results(f"{out}/s")["trial"]) == list(range(240))


@pytest.mark.slow  # 8-16 s: CI's slow run
def test_drivers_on_two_machines_merge_their_own_parts_in_one_bucket(s3, tmp_path):
    from orchestrator.recorder import _flush
    from orchestrator.remote import Mirror
    from orchestrator.results import ResultSink

    out, fs, bucket = s3
    machines = []
    for name in ("a", "b"):
        local = tmp_path / name / "s"
        local.mkdir(parents=True)
        machines.append((ResultSink(local), Mirror(f"{out}/shared/s", local)))
    for flush in range(40):
        for index, (sink, mirror) in enumerate(machines):
            sink.add(_trial_row(2 * flush + index))
            _flush(sink, mirror, shared=True, last=flush == 39)
    for sink, mirror in machines:
        _flush(sink, mirror, shared=True, last=True)  # fetch the other's last parts
        assert list(sink.frame()["trial"]) == list(range(80))
    trials = pq.read_table(f"{bucket}/shared/s/trials", filesystem=fs).to_pandas()
    assert sorted(trials["trial"]) == list(range(80))
    parts = _bucket_parts(fs, f"{bucket}/shared/s")
    assert len(parts) < 40 and sum(name.startswith("part-merged-") for name in parts) >= 2
