"""Issue 16: a lost Ray is an error, not a wait; `submit` waits for a starting cluster
visibly.

Fast: the watch's probes against real processes and sockets that go away, the driver
stopping on a lost Ray with every finished trial recorded, `submit --wait` against a port
where nothing listens and against a job server whose job agent is not up (a small fake of
Ray's job REST API). Slow: real local runs whose raylet, GCS or Ray agent is SIGKILLed
(found through the run's own Ray temp directory), then resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from orchestrator.errors import RayLostError
from orchestrator.liveness import RayWatch, answer_probe, process_probe, socket_probe
from tests.test_driver import FakePool, _driver, _prepared
from tests.test_faults import _check_study

ROOT = Path(__file__).resolve().parent.parent


# -- the watch ------------------------------------------------------------------------------
def test_a_killed_process_is_lost_and_named_by_pid_and_signal():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        watch = RayWatch(probes=[process_probe(proc, name="raylet", logs="/x/logs")], every=5)
        watch.check(now=100.0)  # alive: nothing raised
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        watch.check(now=101.0)  # checked at most every 5 s: not looked at yet
        with pytest.raises(RayLostError) as lost:
            watch.check(now=105.0)
    finally:
        proc.kill()
    assert str(lost.value) == (f"Ray's raylet (pid {proc.pid}) is gone (killed by SIGKILL; see "
                               "/x/logs/raylet.err)")  # fmt: skip
    with pytest.raises(RayLostError):  # once lost, always lost: every check raises
        watch.check(now=105.5)


def test_a_service_that_stops_answering_is_lost_after_its_grace_only():
    clock, answers = [0.0], [True]

    def ask():
        if not answers[0]:
            raise TimeoutError("no answer")

    watch = RayWatch(probes=[answer_probe(ask, what="Ray's GCS at h:1", grace=15,
                                          clock=lambda: clock[0])], every=0)  # fmt: skip
    watch.check()
    answers[0] = False
    for clock[0] in (1.0, 10.0):  # a GCS restarting: missed pings within the grace
        watch.check()
    answers[0] = True
    clock[0] = 12.0
    watch.check()  # it answered again: the grace starts over
    answers[0] = False
    for clock[0] in (20.0, 30.0):
        watch.check()
    clock[0] = 35.0
    with pytest.raises(RayLostError, match=r"Ray's GCS at h:1 has not answered for 15 s"):
        watch.check()


def test_a_socket_nobody_listens_on_is_a_lost_raylet():
    path = tempfile.mktemp(prefix="lv", suffix=".sock", dir="/tmp")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    probe = socket_probe(path)
    try:
        assert probe() is None
        server.close()
        assert probe() == f"Ray's local raylet is gone (nothing listens on {path})"
        os.unlink(path)
        assert probe() == f"Ray's local raylet is gone (nothing listens on {path})"
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


# -- the driver ----------------------------------------------------------------------------
class LosingPool(FakePool):
    """Finishes `results` jobs, then its Ray is lost (as WorkerPool.wait raises it)."""

    def __init__(self, results: int) -> None:
        super().__init__(2)
        self.results = results

    def wait(self, timeout: float) -> list:
        if self.results <= 0:
            raise RayLostError("Ray's raylet (pid 7) is gone (killed by SIGKILL)")
        done = super().wait(timeout)
        self.results -= len(done)
        return done


def test_a_driver_whose_ray_is_lost_stops_with_every_finished_trial_recorded(tmp_path):
    prepared = _prepared(tmp_path, trials=50, baselines=False)
    pool = LosingPool(results=7)
    driver, recorder = _driver(prepared, pool)
    driver.run()  # returns: no endless wait
    assert driver.lost == "Ray's raylet (pid 7) is gone (killed by SIGKILL)"
    assert recorder.closed  # the recorder drained: what finished is durable
    evaluated = [row for row in recorder.rows if row["worker"] is not None]
    assert len(evaluated) == 7
    assert driver.summary()["error"] == driver.lost  # run.json says why the run stopped
    assert not driver.interrupted


def test_workers_loading_on_a_lost_ray_are_not_waited_for(ray_cluster, tmp_path):
    """A worker pool starting (or evaluating) on a Ray that is gone: the watch's loss
    surfaces from start() within seconds, however long the workers would take."""
    from orchestrator.workers import PoolSettings, WorkerPool

    class Slow:  # the task loads for a minute: longer than the test may wait
        def __init__(self, device):
            time.sleep(60)

    lost: list[str] = []
    watch = RayWatch(probes=[lambda: lost[0] if lost else None], every=0)
    pool = WorkerPool(lambda device: Slow(device), PoolSettings(count=1), watch=watch)
    threading.Timer(1.0, lambda: lost.append("Ray's raylet (pid 7) is gone")).start()
    started = time.monotonic()
    try:
        with pytest.raises(RayLostError, match=r"raylet \(pid 7\) is gone"):
            pool.start()
        assert time.monotonic() - started < 30  # not the minute the workers would take
    finally:
        pool.watch = RayWatch()  # Ray is in fact alive here: its actors are ended
        pool.shutdown()


# -- submit --wait ----------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)  # fmt: skip


def _ours(stderr: str) -> list[str]:
    """stderr without Ray's own log lines (its SDK logs each package upload)."""
    return [line for line in stderr.strip().splitlines()
            if not re.match(r"\d{4}-\d\d-\d\d [\d:,]+\s+INFO ", line)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit_config(tmp_path: Path) -> Path:
    config = tmp_path / "job" / "search.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({"task": "digits-cnn", "trials": 4}))
    return config


def test_submit_waits_visibly_for_a_job_server_then_names_what_to_check(tmp_path):
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens
    start = time.monotonic()
    done = _cli("submit", str(_submit_config(tmp_path)), "--address", address, "--wait", "3")
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - start >= 3  # it waited the limit given
    lines = done.stderr.strip().splitlines()
    assert lines[0] == f"waiting for Ray's job server at {address} (up to 3 s: --wait)"
    assert len(lines) == 2, done.stderr  # said once, however often it was tried
    assert lines[1].startswith(f"prunesearch: error: cannot reach the Ray job server at "
                               f"{address} within 3 s")  # fmt: skip
    assert "`ray status`" in lines[1] and "logs/dashboard.log" in lines[1]


class FakeJobServer(BaseHTTPRequestHandler):
    """Ray's job REST API as `JobSubmissionClient.submit_job` uses it: the version, the
    working_dir package upload, and jobs refused with Ray's own words while the server's
    `refusals` last (a job agent not up yet), then accepted."""

    refusals = 0
    submitted: list[dict] = []
    packages: set[str] = set()

    def _reply(self, code: int, body: str, kind: str = "application/json") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/api/version"):
            self._reply(200, json.dumps({"version": "4", "ray_version": "2.60.0",
                                         "ray_commit": "x", "session_name": "s"}))  # fmt: skip
        elif self.path in type(self).packages:
            self._reply(200, "", "text/plain")
        else:  # a package not uploaded yet
            self._reply(404, "not found", "text/plain")

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).packages.add(self.path)
        self._reply(200, "", "text/plain")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        server = type(self)
        if server.refusals > 0:
            server.refusals -= 1
            self._reply(500, "No available agent to submit job, please try again later.",
                        "text/plain")  # fmt: skip
            return
        server.submitted.append(body)
        self._reply(200, json.dumps({"job_id": body["submission_id"],
                                     "submission_id": body["submission_id"]}))  # fmt: skip

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def job_server():
    handler = type("Server", (FakeJobServer,), {"refusals": 0, "submitted": [], "packages": set()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_submit_without_a_job_agent_waits_visibly_then_names_ray_status_and_its_log(
    tmp_path, job_server
):
    handler, address = job_server
    handler.refusals = 10**6  # the agent never comes up
    done = _cli("submit", str(_submit_config(tmp_path)), "--address", address, "--wait", "3")
    assert done.returncode == 1, done.stderr
    lines = _ours(done.stderr)
    assert lines == [
        f"waiting for Ray's job agent at {address} (up to 3 s: --wait)",
        f"prunesearch: error: Ray's job agent at {address} did not take the job within 3 s (No "
        "available agent to submit job); check the cluster with `ray status` and the agent's "
        "log on the head node (/tmp/ray/session_latest/logs/dashboard_agent.log), or wait "
        "longer with --wait SECONDS",
    ]
    assert handler.refusals < 10**6 - 1  # asked again while it waited
    assert not handler.submitted


def test_submit_takes_a_job_agent_that_comes_up_while_it_waits(tmp_path, job_server):
    handler, address = job_server
    handler.refusals = 3
    done = _cli("submit", str(_submit_config(tmp_path)), "--address", address, "--study", "s")
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    assert [body["submission_id"] for body in handler.submitted] == [job]
    lines = _ours(done.stderr)
    assert lines[0] == f"waiting for Ray's job agent at {address} (up to 300 s: --wait)"
    assert len(lines) == 2 and lines[1].startswith("study s: results in"), done.stderr


def test_a_bad_wait_is_bad_input(tmp_path):
    done = _cli("submit", str(_submit_config(tmp_path)), "--address", "http://127.0.0.1:1",
                "--wait", "soon")  # fmt: skip
    assert done.returncode == 2
    assert "'soon' is no number of seconds" in done.stderr


# -- real runs losing their Ray (slow) ------------------------------------------------------
ERROR = re.compile(r"^prunesearch: error: (?P<what>.+) is gone \(.*\); (?P<rows>\d+) trials? "
                   r"recorded in (?P<out>\S+); resume with: (?P<command>prunesearch run .+)$")  # fmt: skip


def _ray_processes(ray_tmp: str) -> dict[str, psutil.Process]:
    """The raylet, GCS and agents of the run's own Ray: the processes whose command line
    names its session directory, and the raylet's agent children."""
    session = os.path.realpath(os.path.join(ray_tmp, "ray", "session_latest"))
    found: dict[str, psutil.Process] = {}
    for proc in psutil.process_iter(["name", "cmdline"]):
        if any(session in arg for arg in proc.info["cmdline"] or []):
            found.setdefault(proc.info["name"], proc)
    raylet = found["raylet"]
    # the agent the issue saw killed first (an out-of-memory killer's pick), else another
    agents = sorted((c for c in raylet.children() if c.name().endswith("Agent")),
                    key=lambda c: c.name() != "ray::DashboardAgent")  # fmt: skip
    return {"raylet": raylet, "gcs": found["gcs_server"], "agent": agents[0],
            "all": [*found.values(), *raylet.children(recursive=True)]}  # fmt: skip


def _killed_mid_run(proc: subprocess.Popen, study_dir: Path, ray_tmp: str,
                    victim: str) -> dict[str, psutil.Process]:  # fmt: skip
    """Once the run has recorded trials, SIGKILL its `victim`; its Ray processes."""
    deadline = time.monotonic() + 240
    while not _parts(study_dir):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no trial was recorded in time"
        time.sleep(0.2)
    ray = _ray_processes(ray_tmp)
    ray[victim].send_signal(signal.SIGKILL)
    return ray


def _end(proc: subprocess.Popen, ray_tmp: str) -> None:
    """A run that did not stop (the bug), and its own Ray: SIGKILL, by pid, nobody else's."""
    if proc.poll() is not None:
        return
    session = os.path.realpath(os.path.join(ray_tmp, "ray", "session_latest"))
    ours = [p for p in psutil.process_iter(["cmdline"])
            if any(session in arg for arg in p.info["cmdline"] or [])]  # fmt: skip
    proc.kill()
    proc.communicate()
    _kill([q for p in ours for q in [*p.children(recursive=True), p]])


def _kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _parts(study_dir: Path) -> list[Path]:
    return list((study_dir / "trials").glob("part-*.parquet"))


@pytest.fixture
def ray_tmp():
    """The run's own Ray temp directory (short: Ray's socket paths must fit 107 bytes)."""
    path = tempfile.mkdtemp(prefix="lv", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["raylet", "gcs", "agent"])
def test_a_run_whose_ray_dies_stops_with_one_line_and_resumes(tmp_path, ray_tmp, victim):
    config = tmp_path / "search.yaml"  # evaluations of ~0.2 s: some are running at the kill
    config.write_text(yaml.safe_dump({"task": "digits-cnn", "trials": 5000, "seeding": False,
                                      "workers": {"count": 2}, "sampler": "random",
                                      "fidelity": {"enabled": False},
                                      "recovery": {"finetune_steps": 30}}))  # fmt: skip
    out, study_dir = tmp_path / "out", tmp_path / "out" / "s"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    run = [sys.executable, "-m", "orchestrator.cli"]
    proc = subprocess.Popen([*run, "run", str(config), "--out", str(out), "--study", "s",
                             "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        ray = _killed_mid_run(proc, study_dir, ray_tmp, victim)
        _, err = proc.communicate(timeout=90)  # "stops within about 30 s", a margin for load
    finally:  # a run that waits forever (the bug) is ended here, with its Ray
        _end(proc, ray_tmp)
    assert proc.returncode == 1, err[-3000:]
    killed = ray[victim]

    errors = [line for line in err.splitlines() if line.startswith("prunesearch: error:")]
    assert len(errors) == 1, err[-3000:]
    line = ERROR.match(errors[0])
    assert line, errors[0]
    lost = {"gcs": f"Ray's GCS (pid {killed.pid})"}.get(victim, f"Ray's raylet (pid "
                                                              f"{ray['raylet'].pid})")  # fmt: skip
    assert line["what"] == lost  # an agent's death takes the raylet down with it
    trials = _check_study(study_dir)  # durable: nothing lost, torn or twice
    assert len(trials) == int(line["rows"]) >= 1
    assert line["out"] == str(study_dir)
    # the lost Ray left nothing behind (its agents outlive a lost GCS unless ended)
    _, alive = psutil.wait_procs(ray["all"], timeout=10)
    _kill(alive)
    assert not alive, [(p.pid, p.name()) for p in alive]

    target = len(trials) + 6
    command = line["command"].split()[1:]  # the printed command, as the user would run it
    resumed = subprocess.run([*run, *command, "--trials", str(target), "--quiet"], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _check_study(study_dir)
    assert len(after) == target
    kept = after.set_index("trial").loc[trials["trial"]]
    pd.testing.assert_series_equal(kept["state"], trials.set_index("trial")["state"])


@pytest.fixture
def joined_head(ray_tmp):
    """`ray start --head` on 127.0.0.1 with its own temp dir and free ports (no dashboard);
    its GCS address. Its processes are ended after the test, by pid."""
    ports = iter(_free_port() for _ in range(9))
    port = next(ports)
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=false", "--num-cpus=2", f"--temp-dir={ray_tmp}/ray",
           "--disable-usage-stats", f"--dashboard-agent-listen-port={next(ports)}",
           f"--dashboard-agent-grpc-port={next(ports)}", f"--metrics-export-port={next(ports)}",
           f"--runtime-env-agent-port={next(ports)}", f"--ray-client-server-port={next(ports)}",
           f"--node-manager-port={next(ports)}", f"--object-manager-port={next(ports)}"]  # fmt: skip
    ray_bin = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                        f"{os.environ.get('PATH', '')}")  # fmt: skip
    if ray_bin is None:
        pytest.skip("the `ray` command is not installed beside this Python")
    env = _joined_env()
    done = subprocess.run([ray_bin, *cmd[1:]], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        _kill([q for p in _session_processes(ray_tmp) for q in [*p.children(recursive=True), p]])


def _joined_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    if (Path.home() / ".ray" / "auth_token").is_file():  # Ray >= 2.52 clusters demand it
        env.setdefault("RAY_AUTH_MODE", "token")
    return env


def _session_processes(ray_tmp: str) -> list[psutil.Process]:
    session = os.path.realpath(os.path.join(ray_tmp, "ray", "session_latest"))
    return [p for p in psutil.process_iter(["cmdline"])
            if any(session in arg for arg in p.info["cmdline"] or [])]  # fmt: skip


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("victim", ["raylet", "gcs"])
def test_a_run_on_a_cluster_whose_head_dies_stops_with_one_line(tmp_path, ray_tmp, joined_head,
                                                                 victim):  # fmt: skip
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({"task": "digits-cnn", "trials": 5000, "seeding": False,
                                      "workers": {"count": 2}, "sampler": "random",
                                      "fidelity": {"enabled": False},
                                      "recovery": {"finetune_steps": 30}}))  # fmt: skip
    out, study_dir = tmp_path / "out", tmp_path / "out" / "s"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config), "--out",
                             str(out), "--study", "s", "--quiet", "--address", joined_head],
                            env=_joined_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    head: dict = {"all": []}
    try:
        head = _killed_mid_run(proc, study_dir, ray_tmp, victim)
        _, err = proc.communicate(timeout=90)  # "stops within about 30 s", a margin for load
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _kill(head["all"])  # the head's agents, orphaned by a killed raylet
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("prunesearch: error:")]
    assert len(errors) == 1, err[-3000:]
    lost = {"raylet": "Ray's local raylet is gone (nothing listens on ",
            "gcs": "has not answered for "}[victim]  # fmt: skip
    assert lost in errors[0]
    rows = re.search(r"; (\d+) trials? recorded in (\S+); resume with: prunesearch run .* "
                     rf"--address {joined_head} --resume$", errors[0])  # fmt: skip
    assert rows, errors[0]
    assert len(_check_study(study_dir)) == int(rows[1]) >= 1
