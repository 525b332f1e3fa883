"""Batch submission to a Ray cluster through the Ray Jobs SDK (`prunesearch submit`,
`status`, `logs`, `stop`).

A submitted job runs `prunesearch run CONFIG --address auto` as its entrypoint on the
cluster's head node: the job's driver is our driver, its workers the cluster's actors.
The config's directory is the job's working_dir (so a user task module beside the
config travels with it); the config's `pip` list becomes the job's pip requirements.
The study name is fixed at submission, so the user knows where results go and
`submit --resume` continues the same study.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.config import SearchConfig
from orchestrator.errors import ConfigError, JobError

# never uploaded with the working_dir: results, environments, caches
EXCLUDES = ["runs/", ".venv/", "venv/", ".git/", "__pycache__/", "*.parquet", "*.db",
            "*.db-wal", "*.db-shm", "*.pt", "*.safetensors", "*.onnx"]  # fmt: skip
ADDRESS_ENV = "RAY_ADDRESS"
# `submit --wait`: a cluster just started (`ray start --head`), on a loaded machine, may
# take minutes before its job server and job agent take jobs (issue 16: a 60-s silent wait
# was too short there)
WAIT_SECONDS = 300.0
POLL_SECONDS = 1.0
# on the head node, in Ray's default temp dir
SERVER_LOG = "/tmp/ray/session_latest/logs/dashboard.log"
AGENT_LOG = "/tmp/ray/session_latest/logs/dashboard_agent.log"


class Waiting:
    """A bounded wait for parts of a cluster that is starting: says once per part that it
    waits (one line on stderr), and whether time is left."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.seconds = url, seconds
        self.deadline = time.monotonic() + seconds
        self.said: set[str] = set()

    def more(self, what: str) -> bool:
        if what not in self.said:
            self.said.add(what)
            print(f"waiting for {what} at {self.url} (up to {self.seconds:g} s: --wait)",
                  file=sys.stderr, flush=True)  # fmt: skip
        return time.monotonic() < self.deadline


def job_address(address: str | None) -> str:
    found = address or os.environ.get(ADDRESS_ENV)
    if not found:
        raise ConfigError("no Ray job server address; give --address http://HEAD:8265 or set "
                          f"{ADDRESS_ENV}")  # fmt: skip
    if "://" not in found:
        found = f"http://{found}"
    return found


def _token_mode() -> None:
    """Send Ray's auth token when there is one (Ray >= 2.52 clusters started where a token
    exists demand it): Ray's clients send it only with RAY_AUTH_MODE=token."""
    has_token = (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                 or (Path.home() / ".ray" / "auth_token").is_file())  # fmt: skip
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def client(address: str | None, *, waiting: Waiting | None = None) -> Any:
    """The job server's client; a server that does not answer yet is waited for while
    `waiting` allows (a cluster starting), any other error is one clear line at once."""
    url = job_address(address)
    _token_mode()  # before Ray is imported: it reads its auth settings then
    from ray.job_submission import JobSubmissionClient

    while True:
        try:
            return JobSubmissionClient(url)
        except ConnectionError:  # nothing answers (yet)
            if waiting is not None and waiting.seconds > 0 and waiting.more("Ray's job server"):
                time.sleep(POLL_SECONDS)
                continue
            waited = f" within {waiting.seconds:g} s" if waiting and waiting.seconds else ""
            raise ConfigError(f"cannot reach the Ray job server at {url}{waited}; check --address "
                              f"or {ADDRESS_ENV}, and that the cluster runs: `ray status` and the "
                              f"job server's log on the head node ({SERVER_LOG})") from None  # fmt: skip
        except Exception as exc:  # RuntimeError, ValueError: one clear line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot use the Ray job server at {url} ({first}); check "
                              f"--address or {ADDRESS_ENV}") from None  # fmt: skip


def entrypoint(config_name: str, study: str, flags: dict[str, Any], *, resume: bool,
               join: bool = False) -> str:  # fmt: skip
    """The job's command: the config as shipped, joined to the cluster, with the flags the
    user gave to `submit` (already validated here)."""
    args = ["prunesearch", "run", config_name, "--address", "auto", "--study", study]
    for flag, value in flags.items():
        if value is not None:
            args += [f"--{flag}", str(value)]
    args += ["--resume"] * resume + ["--join"] * join
    return shlex.join(args)


def results_path(out: str) -> str:
    """Where the job writes results: URIs and absolute paths as given; a relative `out`
    would land in the job's temporary working_dir, so it is made absolute here (the
    cluster must see the same path: a shared filesystem, or a local cluster)."""
    if "://" in out or Path(out).is_absolute():
        return out
    return str(Path(out).resolve())


def submit(config_path: Path, config: SearchConfig, study: str, flags: dict[str, Any], *,
           address: str | None, resume: bool, join: bool = False,
           wait: float = WAIT_SECONDS) -> str:  # fmt: skip
    """Submit the search (`config` is the validated config with `flags` applied); returns
    the job id. A cluster that is starting is waited for up to `wait` seconds in all."""
    waiting = Waiting(job_address(address), wait)
    c = client(address, waiting=waiting)
    runtime_env: dict[str, Any] = {"working_dir": str(config_path.parent), "excludes": EXCLUDES}
    if config.pip:
        runtime_env["pip"] = list(config.pip)
    # the random part: drivers of one study (--join) may be submitted in the same second
    job_id = f"prunesearch-{study}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint(config_path.name, study, flags, resume=resume, join=join),
                runtime_env=runtime_env, submission_id=job_id,
                metadata={"prunesearch_study": study, "out": str(flags.get("out") or config.out)},
            )  # fmt: skip
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise JobError(f"the job server refused the job: {_last_line(exc)}") from None
            # a cluster that just started has no job agent yet: wait for it
            if not waiting.more("Ray's job agent"):
                raise JobError(_no_agent(waiting.url, wait)) from None
            time.sleep(POLL_SECONDS)


def _no_agent(url: str, wait: float) -> str:
    return (f"Ray's job agent at {url} did not take the job within {wait:g} s (No available "
            f"agent to submit job); check the cluster with `ray status` and the agent's log "
            f"on the head node ({AGENT_LOG}), or wait longer with --wait SECONDS")  # fmt: skip


def _last_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _known(c: Any, job_id: str) -> None:
    try:
        c.get_job_info(job_id)
    except RuntimeError:
        raise ConfigError(
            f"no job '{job_id}' on this cluster; list them with `ray job list`"
        ) from None


def status(job_id: str, *, address: str | None) -> tuple[str, str]:
    c = client(address)
    _known(c, job_id)
    info = c.get_job_info(job_id)
    return str(info.status), info.message or ""


def logs(job_id: str, *, address: str | None, follow: bool) -> None:
    c = client(address)
    _known(c, job_id)
    if not follow:
        print(c.get_job_logs(job_id), end="", flush=True)
        return
    import asyncio

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def stop(job_id: str, *, address: str | None) -> bool:
    c = client(address)
    _known(c, job_id)
    return bool(c.stop_job(job_id))
