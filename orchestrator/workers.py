"""Worker pool: Ray actors that load the task once and evaluate many policies.

The only Ray-core module of the engine (with orchestrator.liveness, which asks whether
Ray itself is still there). Dispatch is asynchronous: `ray.wait` returns the
first finished evaluation and its worker takes the next candidate at once. A worker that
dies (process killed, node lost) is replaced and its candidate re-dispatched up to
`retries` times; an error raised by the evaluation itself is returned, not retried. While
it waits, its `RayWatch` checks that Ray itself is still there (orchestrator.liveness).
"""

from __future__ import annotations

import math
import numbers
import os
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import RayError

from orchestrator.errors import WorkerStartError
from orchestrator.evaluate import Evaluator, RecoverySettings, pick_device
from orchestrator.liveness import RayWatch
from orchestrator.targets import TargetSettings
from search_spaces import SearchSpace

EvaluatorFactory = Callable[
    [Any], Any
]  # device -> object with .evaluate(policy) and .base_metric()


@dataclass(frozen=True)
class TaskEvaluatorFactory:
    """Builds the task's Evaluator inside a worker (the task spec, not the model, travels)."""

    task_spec: str
    space: SearchSpace
    recovery: RecoverySettings
    target: TargetSettings = TargetSettings()

    def __call__(self, device: Any) -> Evaluator:
        from orchestrator.task import resolve_task

        return Evaluator(resolve_task(self.task_spec), self.space, recovery=self.recovery,
                         device=device, target=self.target)  # fmt: skip


class _Worker:
    def __init__(self, factory: EvaluatorFactory, name: str, device: str, threads: int,
                 sys_path: tuple[str, ...]) -> None:  # fmt: skip
        for entry in reversed(sys_path):  # user task modules import as they do in the driver
            if entry not in sys.path:
                sys.path.insert(0, entry)
        import torch

        torch.set_num_threads(max(1, threads))
        if device == "auto" and ray.get_gpu_ids():
            device = "cuda"
        self.device = pick_device("cpu" if device == "auto" else device)
        self.name = name
        # address and Ray node id: several nodes may share a host (and so an address)
        ip = ray.util.get_node_ip_address() or socket.gethostname()
        self.node = f"{ip}/{ray.get_runtime_context().get_node_id()[:8]}"
        self.evaluator = factory(self.device)

    def info(self) -> dict[str, Any]:
        batches = getattr(self.evaluator, "validation", None)  # a custom evaluator may not say
        return {"worker": self.name, "node": self.node, "device": str(self.device),
                "pid": os.getpid(),
                "validation_batches": len(batches) if isinstance(batches, list) else None}  # fmt: skip

    def base_metric(self) -> float:
        return _finite_metric(self.evaluator.base_metric())

    def base_latency(self) -> float | None:
        measure = getattr(self.evaluator, "base_latency", None)  # a custom evaluator may not
        return measure() if measure is not None else None

    def policy_latency(self, policy: dict[str, Any]) -> float | None:
        measure = getattr(self.evaluator, "policy_latency", None)
        return measure(policy) if measure is not None else None

    def latency_probes(self, acts: dict[str, list[int]],
                       least: dict[str, list[int]] | None = None) -> dict[str, Any] | None:  # fmt: skip
        probe = getattr(self.evaluator, "latency_probes", None)
        return probe(acts, least) if probe is not None else None

    def evaluate(
        self, policy: dict[str, Any], context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        try:  # context: keyword arguments of multi-fidelity evaluation (size, front, ...)
            result = dict(self.evaluator.evaluate(policy, **(context or {})))
            result["metric"] = _finite_metric(result.get("metric"))
        except Exception as exc:  # the trial fails, the worker goes on
            last = traceback.extract_tb(exc.__traceback__)[-1]
            message = " ".join(str(exc).split())  # one line, however the error was written
            result = {"error": f"{type(exc).__name__}: {message} ({os.path.basename(last.filename)}"
                               f":{last.lineno})"}  # fmt: skip
            if isinstance(exc, torch.cuda.OutOfMemoryError):  # free the failed attempt's cache
                torch.cuda.empty_cache()  # so the next candidate finds the memory
        result.update(worker=self.name, node=self.node)
        return result


def _cause(exc: RayError) -> str:
    """The user's error inside a Ray error, in one line: `Type: message` (a task's error),
    else the last line of Ray's message (an actor's failed start ends with the user's)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        message = " ".join(str(cause).split())
        return f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    lines = str(exc).strip().splitlines()
    return lines[-1].strip() if lines else type(exc).__name__


def _finite_metric(metric: Any) -> float:
    """Custom evaluators (`evaluator_factory`) bypass the Evaluator's own check: a missing,
    NaN or infinite metric would be recorded COMPLETE and corrupt the front."""
    if isinstance(metric, torch.Tensor) and metric.numel() == 1:
        metric = metric.item()
    if not isinstance(metric, numbers.Real) or isinstance(metric, bool):
        raise TypeError(f"the evaluator returned metric {metric!r}, not a number")
    if not math.isfinite(metric):
        raise ValueError(f"the evaluator returned metric {float(metric)}")
    return float(metric)


@dataclass
class Job:
    trial: int
    policy: dict[str, Any]
    context: dict[str, Any] | None = None
    attempt: int = 1
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    count: int
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    device: str = "auto"
    retries: int = 2
    sys_path: tuple[str, ...] = ()
    timeout: float | None = None  # seconds per evaluation; past it: worker replaced, FAIL
    # workers the cluster holds now (workers.count: auto): checked every `grow_seconds`,
    # new workers start as nodes join
    target: Callable[[], int] | None = None
    grow_seconds: float = 5.0


class WorkerPool:
    """Workers are idle, running a job, or starting (loading the task; they join the idle
    ones when ready, so a worker waiting for a node never holds a candidate). Candidates
    of dead workers wait in a retry queue for the next free worker."""

    def __init__(self, factory: EvaluatorFactory, settings: PoolSettings, *,
                 watch: RayWatch | None = None) -> None:  # fmt: skip
        self.factory, self.settings = factory, settings
        self.watch = watch or RayWatch()
        self._remote = ray.remote(num_cpus=settings.cpus_per_worker,
                                  num_gpus=settings.gpus_per_worker)(_Worker)  # fmt: skip
        self._idle: list[Any] = []
        self._running: dict[Any, tuple[Any, Job]] = {}  # ObjectRef -> (actor, job)
        self._starting: dict[Any, Any] = {}  # ObjectRef of info() -> actor
        self._retry: deque[Job] = deque()
        self._names = 0
        self._grown = time.monotonic()
        self.replaced = self.timed_out = self.failed_starts = self._failed_in_a_row = 0
        self.infos: list[dict[str, Any]] = []
        self._where: dict[Any, dict[str, str]] = {}  # actor id -> {"worker", "node"}

    def start(self) -> list[dict[str, Any]]:
        """Start the workers and wait until each has loaded the task (errors surface here)."""
        self._idle = [self._new_actor() for _ in range(self.settings.count)]
        try:
            self.infos = self._get([a.info.remote() for a in self._idle])
        except RayError as exc:
            raise WorkerStartError(f"a worker failed to load the task: {_cause(exc)}") from exc
        for actor, info in zip(self._idle, self.infos, strict=True):
            self._remember(actor, info)
        return self.infos

    def _get(self, refs: list[Any]) -> list[Any]:
        """ray.get, asking the watch between short waits: workers that wait for a node
        of a lost Ray would otherwise be waited for forever."""
        while len(ray.wait(refs, num_returns=len(refs), timeout=1.0)[0]) < len(refs):
            self.watch.check()
        return ray.get(refs)

    def _remember(self, actor: Any, info: dict[str, Any]) -> None:
        """Where an actor runs, for the rows of candidates it cannot report itself (it died
        or hung)."""
        self._where[actor._actor_id] = {"worker": info["worker"], "node": info["node"]}

    def _new_actor(self) -> Any:
        self._names += 1
        threads = max(1, int(self.settings.cpus_per_worker))
        return self._remote.options(scheduling_strategy="SPREAD").remote(
            self.factory, f"w{self._names}", self.settings.device, threads, self.settings.sys_path
        )

    def _start_another(self) -> None:
        actor = self._new_actor()
        self._starting[actor.info.remote()] = actor

    def base_metric(self) -> float:
        """The task's metric on the unchanged model: a task whose metric fails even there
        is one clear error before any trial, not a traceback."""
        try:
            return self._get([self._idle[0].base_metric.remote()])[0]
        except RayError as exc:
            raise WorkerStartError(f"the task's metric failed on the unchanged model: "
                                   f"{_cause(exc)}") from exc  # fmt: skip

    def base_latency(self) -> float | None:
        """The unchanged model's latency, measured on a worker (None: its evaluator does
        not measure latency)."""
        try:
            return self._get([self._idle[0].base_latency.remote()])[0]
        except RayError as exc:
            raise WorkerStartError(f"measuring the unchanged model's latency failed: "
                                   f"{_cause(exc)}") from exc  # fmt: skip

    def policy_latency(self, policy: dict[str, Any]) -> float | None:
        """A policy's latency, measured on a worker (None: its evaluator does not measure
        latency)."""
        try:
            return self._get([self._idle[0].policy_latency.remote(policy)])[0]
        except RayError as exc:
            raise WorkerStartError(f"measuring a uniform policy's latency failed: "
                                   f"{_cause(exc)}") from exc  # fmt: skip

    def latency_probes(self, acts: dict[str, list[int]],
                       least: dict[str, list[int]] | None = None) -> dict[str, Any] | None:  # fmt: skip
        """The per-layer latency table's probes, timed on a worker (orchestrator/
        latency_table.py); None: its evaluator times none."""
        try:
            return self._get([self._idle[0].latency_probes.remote(acts, least)])[0]
        except RayError as exc:
            raise WorkerStartError(f"timing the layers' latency probes failed: "
                                   f"{_cause(exc)}") from exc  # fmt: skip

    @property
    def size(self) -> int:
        """Workers ready to evaluate (idle or running)."""
        return len(self._idle) + len(self._running)

    @property
    def free(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        """Candidates in flight: running, or waiting to be re-dispatched. While no worker is
        ready, the ones starting count too: every worker may be a replacement still loading
        the task (each died on a candidate), and the driver must wait for them, not end."""
        waiting = len(self._starting) if not self.size else 0
        return len(self._running) + len(self._retry) + waiting

    def submit(self, job: Job) -> None:
        actor = self._idle.pop()
        job.started = time.monotonic()
        self._running[actor.evaluate.remote(job.policy, job.context)] = (actor, job)

    def wait(self, timeout: float) -> list[tuple[Job, dict[str, Any]]]:
        """Finished jobs with their results. Workers that died are replaced and their jobs
        re-dispatched (or returned failed once out of retries); jobs past the timeout are
        returned failed and their workers replaced; new nodes get new workers."""
        self.watch.check()  # every few seconds: a lost Ray finishes nothing, ever
        self._grow()
        refs = list(self._running) + list(self._starting)
        done: list[tuple[Job, dict[str, Any]]] = []
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=self._wait_time(timeout))
            for ref in ready:
                if ref in self._starting:
                    self._started(ref)
                else:
                    done.extend(self._finished(ref))
        done.extend(self._expire())
        while self._retry and self._idle:
            self.submit(self._retry.popleft())
        return done

    def _wait_time(self, timeout: float) -> float:
        """Wake up in time for the earliest evaluation deadline."""
        if self.settings.timeout is None or not self._running:
            return timeout
        first = min(job.started for _, job in self._running.values())
        return max(0.0, min(timeout, first + self.settings.timeout - time.monotonic()))

    def _started(self, ref: Any) -> None:
        actor = self._starting.pop(ref)
        try:
            self.infos.append(ray.get(ref))
            self._remember(actor, self.infos[-1])
        except RayError as exc:  # e.g. its node left while it loaded
            self.failed_starts += 1
            self._failed_in_a_row += 1
            ray.kill(actor, no_restart=True)
            if self.settings.target is not None:
                return  # elastic: the next growth check starts another where there is room
            if self._failed_in_a_row <= self.settings.retries:
                self._start_another()  # a fixed pool keeps its size
            elif not self.size and not self._starting:  # nothing left to run a candidate
                raise WorkerStartError(f"every worker died and none could be started again: "
                                       f"{_cause(exc)}") from exc  # fmt: skip
            return
        self._failed_in_a_row = 0
        self._idle.append(actor)

    def _finished(self, ref: Any) -> list[tuple[Job, dict[str, Any]]]:
        actor, job = self._running.pop(ref)
        try:
            result = ray.get(ref)
        except RayError as exc:  # the worker process died (or the task escaped it)
            self._replace(actor)
            if job.attempt <= self.settings.retries:
                job.attempt += 1
                self._retry.append(job)
                return []
            result = {"error": f"worker died {job.attempt} times evaluating this candidate; "
                               f"last: {type(exc).__name__}",
                      **self._where.get(actor._actor_id, {})}  # fmt: skip
        else:
            self._idle.append(actor)
        result["seconds"] = time.monotonic() - job.started
        return [(job, result)]

    def _expire(self) -> list[tuple[Job, dict[str, Any]]]:
        limit = self.settings.timeout
        if limit is None:
            return []
        now = time.monotonic()
        late = [ref for ref, (_, job) in self._running.items() if now - job.started > limit]
        done = []
        for ref in late:
            actor, job = self._running.pop(ref)
            self._replace(actor)  # a hung evaluation holds its worker: only a new one helps
            self.timed_out += 1
            done.append((job, {"error": f"TimeoutError: the evaluation took longer than timeout="
                                        f"{limit:g} s; its worker was replaced",
                               "seconds": now - job.started,
                               **self._where.get(actor._actor_id, {})}))  # fmt: skip
        return done

    def _grow(self) -> None:
        """workers.count auto: start workers for capacity that joined (nodes added)."""
        target = self.settings.target
        if target is None or time.monotonic() - self._grown < self.settings.grow_seconds:
            return
        self._grown = time.monotonic()
        for _ in range(target() - self.size - len(self._starting)):
            self._start_another()

    def map(self, policies: list[dict[str, Any]],
            done: Callable[[int, dict[str, Any]], None] | None = None,
            context: dict[str, Any] | None = None,
            deadline: float | None = None) -> list[dict[str, Any] | None]:  # fmt: skip
        """Evaluate many policies on every worker, in any order; results in input order.
        `done(index, result)` is called as each one finishes (progress, and what an
        interrupted caller keeps); `context`: the evaluator's keyword arguments. Past
        `deadline` (time.monotonic()) nothing more is started: those results are None."""
        results: list[dict[str, Any] | None] = [None] * len(policies)
        pending = list(enumerate(policies))
        while pending or self.busy:
            if deadline is not None and time.monotonic() > deadline:
                pending = []
            while pending and self.free:
                index, policy = pending.pop(0)
                self.submit(Job(trial=index, policy=policy, context=context))
            for job, result in self.wait(timeout=0.5):
                results[job.trial] = result
                if done is not None:
                    done(job.trial, result)
        return results  # type: ignore[return-value]

    def _replace(self, actor: Any) -> None:
        """Kill `actor` and start a replacement; it takes candidates once it has loaded the
        task (on a lost node it waits for capacity without holding one)."""
        ray.kill(actor, no_restart=True)
        self._start_another()
        self.replaced += 1

    def shutdown(self) -> None:
        if self.watch.lost:  # the actors went with their Ray; asking it to kill them hangs
            self._idle, self._running, self._starting = [], {}, {}
            return
        actors = self._idle + [a for a, _ in self._running.values()] + list(self._starting.values())
        for actor in actors:
            ray.kill(actor, no_restart=True)
        self._idle, self._running, self._starting = [], {}, {}
        self._retry.clear()
