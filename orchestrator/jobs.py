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
AGENT_WAIT_SECONDS = 60


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


def client(address: str | None) -> Any:
    url = job_address(address)
    _token_mode()  # before Ray is imported: it reads its auth settings then
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot reach the Ray job server at {url} ({first}); check --address "
                          f"or {ADDRESS_ENV}, and that the cluster runs (ray start --head)") from None  # fmt: skip


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
           address: str | None, resume: bool, join: bool = False) -> str:  # fmt: skip
    """Submit the search (`config` is the validated config with `flags` applied); returns
    the job id."""
    c = client(address)
    runtime_env: dict[str, Any] = {"working_dir": str(config_path.parent), "excludes": EXCLUDES}
    if config.pip:
        runtime_env["pip"] = list(config.pip)
    # the random part: drivers of one study (--join) may be submitted in the same second
    job_id = f"prunesearch-{study}-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint(config_path.name, study, flags, resume=resume, join=join),
                runtime_env=runtime_env, submission_id=job_id,
                metadata={"prunesearch_study": study, "out": str(flags.get("out") or config.out)},
            )  # fmt: skip
        except RuntimeError as exc:
            # a cluster that just started has no job agent yet: wait for it a little
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1)
                continue
            raise JobError(f"the job server refused the job: {_last_line(exc)}") from None


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
