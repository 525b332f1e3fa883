"""Security: what prunesearch loads, exposes, writes and records.

- checkpoints are loaded with `weights_only=True`, and nothing unpickles files;
- an export is safetensors + JSON, loadable with every unpickler disabled;
- a study directory is the user's alone (0o700);
- a local Ray listens on the loopback interface only and starts no dashboard/job server;
- a storage password (PRUNESEARCH_STORAGE_PASSWORD) is in no file, log, report or
  message, even when connecting fails.

Cluster-side security (token auth, dashboard binding) is checked in test_cluster_files.py.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.cli import main
from orchestrator.config import make_config
from orchestrator.search import run_search

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("orchestrator", "search_spaces", "examples", "benchmarks", "cluster")
           for p in sorted((ROOT / d).rglob("*.py"))]  # fmt: skip
SECRET = "pw-Zq81-never-written"


# -- loading -------------------------------------------------------------------------------
def _calls(tree: ast.AST, owner: str, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == owner]  # fmt: skip


def test_every_torch_load_is_weights_only():
    """torch.load of a full pickle runs arbitrary code from the file; every checkpoint the
    package (or an example or benchmark) reads goes through weights_only=True."""
    found = 0
    for path in SOURCES:
        for call in _calls(ast.parse(path.read_text()), "torch", "load"):
            found += 1
            flags = {k.arg: k.value for k in call.keywords}
            assert "weights_only" in flags, f"{path}:{call.lineno}: torch.load without weights_only"
            value = flags["weights_only"]
            assert isinstance(value, ast.Constant) and value.value is True, f"{path}:{call.lineno}"
    assert found >= 1  # the built-in tasks' checkpoints


def test_nothing_unpickles_a_file():
    """The one unpickler is the recorder reading its own parent's pipe (store.py), never a
    file: no pickle.load, torch.jit.load, numpy allow_pickle, pandas.read_pickle, joblib."""
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT).as_posix()
        assert not _calls(tree, "pickle", "load"), where
        assert not _calls(tree, "pd", "read_pickle") and not _calls(tree, "joblib", "load"), where
        loads = _calls(tree, "pickle", "loads")
        assert not loads or where == "orchestrator/store.py", where
        for call in _calls(tree, "np", "load"):
            assert not any(k.arg == "allow_pickle" for k in call.keywords), where
        assert "torch.jit.load" not in path.read_text(), where


# -- one real study: PostgreSQL storage with the password from the environment when a server
# can be started here, else the default SQLite -----------------------------------------------
@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    try:
        import pgserver
        import psycopg  # noqa: F401  (SQLAlchemy's default PostgreSQL driver)
    except ImportError:
        yield None
        return
    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    server.psql(f"CREATE ROLE secure LOGIN PASSWORD '{SECRET}';")
    server.psql("CREATE DATABASE secured OWNER secure;")
    socket_dir = server.get_uri().split("host=", 1)[1]
    yield f"postgresql://secure@/secured?host={socket_dir}"
    server.cleanup()


@pytest.fixture(scope="module")
def study(ray_cluster, postgres, tmp_path_factory):
    """A short real digits-cnn search (4 uniform baselines + 2 sampled), then its export
    and report; returns the study directory and everything printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("secure")
    config = make_config({"out": str(out), "study": "s", "trials": 6, "seed": 1,
                          "workers": {"count": 2}, "seeding": False,
                          "fidelity": {"enabled": False}, "storage": postgres})  # fmt: skip
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(printed):  # fmt: skip
        mp.setenv("PRUNESEARCH_STORAGE_PASSWORD", SECRET)
        result = run_search(config)
        assert result.error is None
        assert main(["front", str(result.study_dir)]) == 0
        assert main(["export", str(result.study_dir)]) == 0
        try:
            import matplotlib  # noqa: F401
            import plotly  # noqa: F401
        except ImportError:
            pass
        else:
            assert main(["report", str(result.study_dir)]) == 0
    return result.study_dir, printed.getvalue()


def test_the_study_directory_is_the_users_alone(study):
    study_dir, _ = study
    assert stat.S_IMODE(study_dir.stat().st_mode) == 0o700


# pickle protocols 2-5, and torch.save's zip (a pickle inside)
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def test_an_export_is_safetensors_and_json_only(study, monkeypatch):
    from safetensors import safe_open

    from orchestrator.export import load_compressed

    export = study[0] / "export"
    files = {p.name for p in export.iterdir()}
    assert files == {"model.safetensors", "manifest.json", "policy.json"}
    for name in ("manifest.json", "policy.json"):
        json.loads((export / name).read_text())  # JSON, nothing else
    data = (export / "model.safetensors").read_bytes()
    assert not data.startswith(PICKLE_MAGIC)
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])  # the safetensors layout, then raw bytes
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    assert 8 + header_size + max(ends) == len(data)  # nothing hides after the tensors
    with safe_open(export / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(header) - {"__metadata__"}

    def refuse(*args, **kwargs):
        raise AssertionError("loading an export unpickled something")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    model = load_compressed(export)  # loads with every unpickler disabled
    assert sum(p.numel() for p in model.parameters()) > 0


def _all_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_the_storage_password_is_recorded_nowhere(study, postgres, ray_cluster):
    if postgres is None:
        pytest.skip("no PostgreSQL server here (pip install pgserver 'psycopg[binary]')")
    study_dir, printed = study
    assert not (study_dir / "study.db").exists()  # the study lives in PostgreSQL
    assert (study_dir / "export").is_dir() and list(study_dir.glob("*.parquet"))
    recorded = json.loads((study_dir / "run.json").read_text())["config"]["storage"]
    assert recorded == postgres  # the URL is recorded, without any password
    # the study's files (run.json, Parquet, export, report) and the Ray session's logs
    session = Path(ray_cluster._private.worker._global_node.get_session_dir_path())
    files = _all_files(study_dir, session / "logs")
    assert len(files) > 5
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in printed


def test_a_storage_error_never_shows_the_password(postgres, tmp_path, monkeypatch, capsys):
    if postgres is None:
        pytest.skip("no PostgreSQL server here (pip install pgserver 'psycopg[binary]')")
    monkeypatch.setenv("PRUNESEARCH_STORAGE_PASSWORD", SECRET)
    for url in (postgres.replace("/secured?", "/nodb?"), postgres.replace("secure@", "nobody@")):
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"storage": url}))
        assert main(["run", str(config), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "cannot open it" in err and SECRET not in err, err
    assert not (tmp_path / "o").exists()


# -- local Ray -----------------------------------------------------------------------------
PROBE = """
import json, os, psutil, ray
from orchestrator.config import make_config
from orchestrator.search import _ray_init

_ray_init(make_config({"workers": {"count": 1}}))
try:
    @ray.remote
    class Probe:
        def pid(self):
            return os.getpid()

    ray.get(Probe.remote().pid.remote())  # a worker process listens too
    node = ray._private.worker._global_node
    listening = []
    for proc in psutil.Process().children(recursive=True):
        try:
            listening += [[proc.name(), c.laddr.ip, c.laddr.port]
                          for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    print(json.dumps({"gcs": node.gcs_address, "node_ip": node.node_ip_address,
                      "webui": node.webui_url, "listening": listening}))
finally:
    ray.shutdown()
"""
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.slow  # processes killed or started for real: CI runs it (.ci/run)
def test_a_local_ray_listens_on_loopback_only():
    """The local Ray a run starts: every port of every Ray process (GCS, raylet, agents,
    workers) on the loopback interface, so nothing on the network can submit work to it;
    no dashboard and so no job server at all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert not found["webui"]  # include_dashboard=False: no dashboard, no Jobs API
    assert found["listening"], "no listening socket found: the probe saw no Ray process"
    exposed = [entry for entry in found["listening"] if entry[1] not in LOOPBACK]
    assert not exposed, f"Ray listens beyond the loopback interface: {exposed} ({found['gcs']})"
    assert found["node_ip"] == "127.0.0.1" and found["gcs"].startswith("127.0.0.1:")
