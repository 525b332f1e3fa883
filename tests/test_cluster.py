"""Cluster runs with real components started here: `ray start --head` on 127.0.0.1 and a
job submitted, followed and read back through the CLI; a two-node local cluster whose
workers land on both nodes, grow when a node joins and lose nothing when one leaves;
PostgreSQL storage against a real server (pgserver's bundled PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The CLI and Ray's job entrypoints find `prunesearch` on PATH, this package on
    PYTHONPATH (as the lead's checkout, not a copy)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, env=env or _env(), timeout=timeout)  # fmt: skip


def _check_once(study_dir: Path) -> pd.DataFrame:
    for part in (study_dir / "trials").glob("part-*.parquet"):
        pq.read_table(part)  # every part reads: nothing torn
    trials = pd.read_parquet(study_dir / "trials")
    assert trials["trial"].is_unique
    return trials


def _kill_session(temp_dir: str) -> None:
    """Stop only the Ray processes of our head (`ray stop` would stop the test session's
    own Ray as well): every process whose command line names our session directory."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@pytest.fixture(scope="module")
def head():
    """`ray start --head` bound to 127.0.0.1 with its job server (dashboard) on 127.0.0.1."""
    temp_dir = f"/tmp/rps-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a limit
    dash = _free_port()
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           # every listening port free, so another Ray on this machine cannot collide
           f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
           f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}"]  # fmt: skip
    env = _env()
    ray_bin = shutil.which("ray", path=env["PATH"])
    if ray_bin is None:
        pytest.skip("the `ray` command is not installed beside this Python")
    done = subprocess.run([ray_bin, *cmd[1:]], capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        _kill_session(temp_dir)
        raise AssertionError(f"ray start failed: {done.stderr[-2000:]}")
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 60
    while _cli("status", "none", "--address", address).stderr.find("cannot reach") >= 0:
        assert time.monotonic() < deadline, "the job server did not come up"
        time.sleep(1)
    yield address
    _kill_session(temp_dir)


def _config(tmp_path: Path, **extra) -> Path:
    data = {"task": "digits-cnn", "seeding": False, "sampler": "random", "workers": {"count": 2},
            **extra}  # fmt: skip
    path = tmp_path / "job" / "search.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_submitted_job_is_followed_to_completion_and_its_results_read_back(head, tmp_path):
    config = _config(tmp_path, trials=12)
    out = tmp_path / "results"
    sub = _cli("submit", str(config), "--address", head, "--study", "night", "--out", str(out))
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    assert job.startswith("prunesearch-night")
    logs = _cli("logs", job, "--follow", "--address", head, timeout=600)
    assert logs.returncode == 0, logs.stderr
    assert "best overall" in logs.stdout  # the run's summary, streamed
    state = _cli("status", job, "--address", head)
    assert state.stdout.startswith("SUCCEEDED"), state.stdout + state.stderr
    trials = _check_once(out / "night")
    assert len(trials) == 12
    assert set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    assert (trials["node"].str.startswith("127.0.0.1/") | trials["node"].str.contains("/")).all()


@pytest.mark.slow
def test_a_stopped_job_resumes_with_submit_resume(head, tmp_path):
    config = _config(tmp_path, trials=3000)
    out = tmp_path / "results"
    job = _cli("submit", str(config), "--address", head, "--study", "s", "--out",
               str(out)).stdout.strip()  # fmt: skip
    deadline = time.monotonic() + 180
    while not list((out / "s" / "trials").glob("part-*.parquet")):
        assert time.monotonic() < deadline, _cli("logs", job, "--address", head).stdout[-2000:]
        time.sleep(0.5)
    assert _cli("stop", job, "--address", head).returncode == 0
    deadline = time.monotonic() + 120
    while not _cli("status", job, "--address", head).stdout.startswith("STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    before = _check_once(out / "s")
    assert 0 < len(before) < 3000
    again = _cli("submit", str(config), "--address", head, "--study", "s", "--out", str(out),
                 "--trials", str(len(before) + 20), "--resume")  # fmt: skip
    assert again.returncode == 0, again.stderr
    logs = _cli("logs", again.stdout.strip(), "--follow", "--address", head, timeout=600)
    assert logs.returncode == 0
    after = _check_once(out / "s")
    done_before = before.loc[before["state"] == "COMPLETE", "policy_hash"]
    new = after[~after["trial"].isin(before["trial"])]
    assert len(new) >= 20
    # finished trials are never evaluated again (a duplicate policy reuses the result)
    repeated = new[new["policy_hash"].isin(done_before) & new["worker"].notna()]
    assert repeated["cached_from"].notna().all()


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_bad_submissions_are_one_line_and_start_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _config(tmp_path)
    env = {k: v for k, v in _env().items() if k != "RAY_ADDRESS"}
    cases = [
        (["submit", str(config)], "no Ray job server address"),
        (["submit", str(config), "--address", f"http://127.0.0.1:{_free_port()}", "--wait",
          "0"], "cannot reach the Ray job server"),  # waiting: tests/test_liveness.py
        (["submit", str(config), "--address", "http://127.0.0.1:1", "--resume"], "--study"),
        (["submit", str(config), "--address", "http://127.0.0.1:1", "--join"],
         "submit --join needs --study NAME"),
        (["submit", str(config), "--study", "s", "--resume", "--join"], "not both"),
        (["status", "x"], "no Ray job server address"),
    ]  # fmt: skip
    for args, words in cases:
        done = _cli(*args, env=env, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, done.stderr)


def test_a_joining_submission_runs_another_driver_of_the_named_study():
    from orchestrator.jobs import entrypoint

    line = entrypoint("search.yaml", "shared", {"out": "/results", "trials": None}, resume=False,
                      join=True)  # fmt: skip
    assert line == ("prunesearch run search.yaml --address auto --study shared --out /results "
                    "--join")  # fmt: skip


# -- a two-node local cluster ------------------------------------------------------------
def _start_search(address: str, tmp_path: Path, trials: int) -> tuple[subprocess.Popen, Path]:
    config = _config(tmp_path, trials=trials, workers={"count": "auto"})
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config),
                             "--address", address, "--out", str(tmp_path / "out"), "--study",
                             "two", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())  # fmt: skip
    return proc, tmp_path / "out" / "two"


def _rows(study_dir: Path) -> pd.DataFrame:
    if not list((study_dir / "trials").glob("part-*.parquet")):
        return pd.DataFrame(columns=["worker", "node"])
    return pd.read_parquet(study_dir / "trials")


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the run ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.5)


@pytest.mark.slow
def test_two_nodes_workers_on_both_grow_with_a_new_node_and_survive_a_lost_one(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        proc, study_dir = _start_search(cluster.address, tmp_path, trials=4000)
        try:
            _wait(lambda: _rows(study_dir)["node"].nunique() >= 2, 180, "workers on both nodes",
                  proc)  # fmt: skip
            third = cluster.add_node(num_cpus=1)  # a node joins: workers.count auto grows
            _wait(lambda: _rows(study_dir)["node"].nunique() >= 3, 120, "a worker on the new node")
            cluster.remove_node(second)  # a node leaves mid-run
            cluster.remove_node(third)
            seen = len(_rows(study_dir))
            _wait(lambda: len(_rows(study_dir)) > seen + 20, 180, "the search goes on")
        finally:
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err[-2000:]
        trials = _check_once(study_dir)
        assert trials["worker"].nunique() >= 3
        assert trials["error"].isna().sum() > 0
    finally:
        cluster.shutdown()


# -- PostgreSQL ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    try:
        import pgserver  # a PostgreSQL server in a wheel; started here, stopped after
        import psycopg  # noqa: F401  (SQLAlchemy's default PostgreSQL driver)
    except ImportError as exc:
        pytest.skip(f"PostgreSQL server cannot be installed here ({exc}); pip install pgserver "
                    "'psycopg[binary]'")  # fmt: skip
    data = tmp_path_factory.mktemp("pg")
    server = pgserver.get_server(data, cleanup_mode="stop")
    server.psql("CREATE ROLE prune LOGIN PASSWORD 'pw-7Hq2-secret';")
    server.psql("CREATE DATABASE studies OWNER prune;")
    socket_dir = server.get_uri().split("host=", 1)[1]
    yield f"postgresql://prune@/studies?host={socket_dir}"
    server.cleanup()


@pytest.mark.slow
def test_postgres_storage_keeps_the_study_and_never_the_password(postgres, tmp_path):
    secret = "pw-7Hq2-secret"
    env = {**_env(), "PRUNESEARCH_STORAGE_PASSWORD": secret}
    config = _config(tmp_path, trials=3000, storage=postgres)
    args = ("run", str(config), "--out", str(tmp_path / "out"), "--study", "pg", "--quiet")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    study_dir = tmp_path / "out" / "pg"
    _wait(lambda: len(_rows(study_dir)) >= 10, 180, "trials recorded", proc)
    proc.kill()  # the driver dies without any cleanup
    out, err = proc.communicate(timeout=60)
    time.sleep(2)  # the recorder drains what it was sent
    resumed = _cli(*args[:-1], "--trials", str(len(_rows(study_dir)) + 30), "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    trials = _check_once(study_dir)
    study = optuna.load_study(
        study_name="pg", storage=postgres.replace("prune@", f"prune:{secret}@")
    )
    finished = sorted(t.number for t in study.trials if t.state.is_finished())
    assert sorted(trials["trial"]) == finished
    assert not (study_dir / "study.db").exists()  # the study lives in PostgreSQL
    for path in study_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in out + err + resumed.stdout + resumed.stderr


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_storage_mistakes_are_one_line_before_anything_starts(postgres, tmp_path):
    bad = [
        (postgres.replace("prune@", "prune:pw@"), "holds a password"),
        ("mongodb://host/db", "not a storage URL"),
        (postgres.replace("/studies?", "/nodb?"), "cannot open it"),
    ]
    for url, words in bad:
        config = _config(tmp_path, storage=url)
        done = _cli("run", str(config), "--out", str(tmp_path / "o"), timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], done.stderr
        assert ":pw@" not in lines[0]
        assert not (tmp_path / "o").exists()


def test_journal_storage_needs_no_server_and_resumes(ray_cluster, tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from orchestrator.config import make_config
    from orchestrator.search import run_search

    log = tmp_path / "shared" / "studies.log"
    config = make_config({"task": "digits-cnn", "trials": 8, "seeding": False, "study": "j",
                          "out": str(tmp_path / "out"), "storage": f"journal://{log}",
                          "workers": {"count": 2}})  # fmt: skip
    run_search(config)
    run_search(config.model_copy(update={"trials": 14}), resume=True)
    study = optuna.load_study(study_name="j", storage=JournalStorage(JournalFileBackend(str(log))))
    trials = _check_once(tmp_path / "out" / "j")
    assert len(trials) == 14
    assert sorted(trials["trial"]) == sorted(t.number for t in study.trials)
    assert not (tmp_path / "out" / "j" / "study.db").exists()


# -- several drivers sharing one study ------------------------------------------------------
def _owners(storage_url: str, study: str) -> dict[str, int]:
    """Finished trials of a study by the driver that asked them."""
    from orchestrator.store import OWNER_ATTR

    trials = optuna.load_study(study_name=study, storage=storage_url).trials
    owners: dict[str, int] = {}
    for trial in trials:
        if trial.state.is_finished():
            owner = trial.system_attrs.get(OWNER_ATTR, "")
            owners[owner] = owners.get(owner, 0) + 1
    return owners


@pytest.mark.slow
def test_drivers_joining_one_postgres_study_share_it_and_a_dead_ones_trials_are_requeued(
    postgres, tmp_path
):
    """Two drivers, each with its own Ray and worker (two clusters), run one study in
    PostgreSQL with --join: both record trials, each learns the other's, one row per
    trial. Then a joined driver is killed and the next joiner re-queues what it left."""
    secret = "pw-7Hq2-secret"
    env = {**_env(), "PRUNESEARCH_STORAGE_PASSWORD": secret}
    direct = postgres.replace("prune@", f"prune:{secret}@")
    config = _config(tmp_path, trials=3000, storage=postgres, workers={"count": 1})
    args = ["run", str(config), "--out", str(tmp_path / "out"), "--study", "shared", "--join",
            "--quiet"]  # fmt: skip
    study_dir = tmp_path / "out" / "shared"

    def start():
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)  # fmt: skip

    first = start()
    _wait(lambda: len(_rows(study_dir)) >= 5, 180, "the first driver records trials", first)
    second = start()
    try:
        _wait(lambda: len(_owners(direct, "shared")) >= 2
              and min(_owners(direct, "shared").values()) >= 10, 180,
              "both drivers record trials", second)  # fmt: skip
        # each driver learns the other's trials as it turns (the recorders read every 2 s):
        # wait until both have gone on recording a while, not a fixed time (a driver slowed
        # by a loaded machine once had not turned yet after 8 s)
        seen = _owners(direct, "shared")
        _wait(lambda: all(_owners(direct, "shared").get(o, 0) >= n + 10 for o, n in seen.items()),
              180, "both drivers go on recording", second)  # fmt: skip
        time.sleep(4)
    finally:
        for proc in (first, second):
            proc.send_signal(signal.SIGINT)
        errs = [proc.communicate(timeout=120)[1] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [130, 130], errs
    trials = _check_once(study_dir)
    finished = {t.number for t in optuna.load_study(study_name="shared", storage=direct).trials
                if t.state.is_finished()}  # fmt: skip
    assert set(trials["trial"]) == finished  # one row per finished trial, storage numbers
    assert (trials["origin"] == "baseline").sum() == 4  # queued once, by the first driver
    runs = json.loads((study_dir / "run.json").read_text())["runs"]
    assert [run["join"] for run in runs] == [True, True]
    assert all(run["adopted_trials"] > 0 for run in runs), runs  # each learnt the other's

    third = start()  # joins, then dies with trials running
    count = len(trials)
    _wait(lambda: len(_rows(study_dir)) >= count + 5, 180, "the third driver records", third)
    third.kill()
    third.communicate(timeout=60)
    time.sleep(3)  # its recorder drains what it was sent and says the driver is gone
    target = sum(_owners(direct, "shared").values()) + 10
    done = _cli(*args[:-1], "--trials", str(target), env=env)
    assert done.returncode == 0, done.stderr
    trials = _check_once(study_dir)
    study = optuna.load_study(study_name="shared", storage=direct)
    assert all(t.state.is_finished() for t in study.trials)
    assert set(trials["trial"]) == {t.number for t in study.trials}
    assert "requeued" in set(trials["origin"])  # what the killed driver had running
    assert len(trials) >= target
