"""Is the run's Ray still there? (issue 16)

When the raylet of the driver's node dies (Ray takes it down when one of its agents dies,
as an out-of-memory killer may do), or the GCS does, nothing in Ray tells the driver: its
`ray.wait` keeps returning nothing and replacement workers wait for a node forever. So
while the pool waits for results it asks `RayWatch.check`, at most every `every` seconds,
and a lost Ray is a `RayLostError` (one line, exit 1) instead of a silent wait.

What is checked (each a probe returning why Ray is lost, or None):
- a local Ray this run started: its GCS and raylet processes (a dead pid is certain);
- a Ray it joined: the local raylet's socket, and the GCS answering a key-value read
  within PING_SECONDS, lost once it has not answered for GCS_GRACE_SECONDS (a GCS with
  fault tolerance restarts within seconds: a single missed ping is no loss).
Every probe is bounded: a lost GCS makes Ray calls wait (or retry) for a minute.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import RayLostError

CHECK_SECONDS = 5.0  # between checks, only while the driver waits for results
PING_SECONDS = 3.0  # one GCS read may take this long
GCS_GRACE_SECONDS = 10.0  # unanswered this long: the GCS is lost (a run stops within ~30 s)
LOCAL_PROCESSES = {"gcs_server": "GCS", "raylet": "raylet"}  # Ray's name -> ours

Probe = Callable[[], "str | None"]  # why Ray is lost, or None while it is there


@dataclass
class RayWatch:
    """Runs its probes at most every `every` seconds; the first that reports a loss
    raises RayLostError. No probes: never lost (a test's fake pool, Ray Client mode)."""

    probes: list[Probe] = field(default_factory=list)
    every: float = CHECK_SECONDS
    # processes of a local Ray that outlive its loss (the raylet's agents stay when the
    # GCS goes): ended by `reap` once the run has given Ray up
    leftovers: list[Any] = field(default_factory=list)
    lost: str | None = None
    _last: float = field(default=float("-inf"), repr=False)

    def check(self, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.lost is None and now - self._last < self.every:
            return
        self._last = now
        for probe in self.probes:
            self.lost = self.lost or probe()
        if self.lost is not None:
            raise RayLostError(self.lost)

    def reap(self) -> None:
        """End the leftovers of a lost local Ray (psutil.Process: never a reused pid)."""
        import psutil

        for process in self.leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()


def process_probe(process: Any, *, name: str, logs: str | None = None) -> Probe:
    """A Ray process this run started (a Popen): lost once it has exited."""

    def probe() -> str | None:
        code = process.poll()
        if code is None:
            return None
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        where = f"; see {logs}/{_LOG_OF.get(name, name)}.err" if logs else ""
        return f"Ray's {name} (pid {process.pid}) is gone ({how}{where})"

    return probe


_LOG_OF = {"GCS": "gcs_server"}  # our name -> the stem of its log files


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def socket_probe(path: str, *, name: str = "local raylet") -> Probe:
    """A Unix socket something must listen on (the raylet's): lost once nothing does."""

    def probe() -> str | None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(PING_SECONDS)
            try:
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                return f"Ray's {name} is gone (nothing listens on {path})"
            except OSError:  # busy or slow: not a proof of loss
                return None
        return None

    return probe


def answer_probe(ask: Callable[[], Any], *, what: str, grace: float = GCS_GRACE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> Probe:  # fmt: skip
    """A service that must answer `ask` (which raises when it does not, within its own
    timeout): lost once it has not answered for `grace` seconds in a row."""
    silent_since: list[float] = []

    def probe() -> str | None:
        try:
            ask()
        except Exception as exc:  # Ray's RpcError, a timeout, a closed channel alike
            silent_since[:] = silent_since or [clock()]
            if clock() - silent_since[0] >= grace:
                return (f"{what} has not answered for {clock() - silent_since[0]:.0f} s "
                        f"({type(exc).__name__})")  # fmt: skip
            return None
        silent_since.clear()
        return None

    return probe


def watch_current_ray(*, every: float = CHECK_SECONDS) -> RayWatch:
    """The watch for the Ray this process is connected to: the processes of a local Ray
    it started (Ray keeps their handles), else the local raylet's socket and the GCS's
    answers."""
    import ray

    node = ray._private.worker._global_node
    if node is None:  # Ray Client (ray://): nothing local to watch
        return RayWatch(every=every)
    if node.all_processes.get("raylet"):
        logs = node.get_logs_dir_path()
        probes = [process_probe(info.process, name=ours, logs=logs)
                  for key, ours in LOCAL_PROCESSES.items()
                  for info in node.all_processes.get(key, [])]  # fmt: skip
        return RayWatch(probes=probes, every=every, leftovers=_agents(node))
    gcs = ray._private.worker.global_worker.gcs_client

    def ask() -> Any:
        return gcs.internal_kv_get(b"session_name", b"session", timeout=PING_SECONDS)

    probes = [socket_probe(node.raylet_socket_name),
              answer_probe(ask, what=f"Ray's GCS at {node.gcs_address}")]  # fmt: skip
    return RayWatch(probes=probes, every=every)


def _agents(node: Any) -> list[Any]:
    """The agents the local raylet started (its children now, before any worker)."""
    import psutil

    try:
        return psutil.Process(node.all_processes["raylet"][0].process.pid).children()
    except psutil.Error:
        return []


__all__ = ["RayWatch", "answer_probe", "process_probe", "socket_probe", "watch_current_ray"]
