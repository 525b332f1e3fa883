"""The dispatcher: candidates to free workers, results back (issue 13).

It holds the candidates asked ahead (ready) and those at a worker, by policy hash, so a
second ask of a policy in flight waits for the first's result instead of taking a worker;
learns how long an evaluation takes (for asking ahead in time); holds new evaluations
back while the recorder lags too far behind (`held`); and gives a run up when its first
evaluations all fail. Retries of a candidate whose worker died, and timeouts, are the
pool's (orchestrator.workers): each job's result comes back once, with the attempt it
took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.errors import RayLostError
from orchestrator.fidelity import FidelitySettings
from orchestrator.proposer import Candidate
from orchestrator.timing import DriverStats

if TYPE_CHECKING:
    from orchestrator.workers import Job

Result = dict[str, Any]

# Results the driver has told but its recorder has not yet written to the study are lost
# to a driver SIGKILL and evaluated again on --resume. The recorder's SQLite writes (~14 ms
# a trial) are slower than cheap evaluations, and without a bound the driver ran 3,000
# trials ahead of them (benchmarks/soak.py, issue 16). So a new evaluation is sent only
# while those results plus the evaluations in flight stay under this bound: what a kill
# may cost. 8 a worker leaves every worker a burst of results on top of what the recorder
# is writing (it acknowledges a chunk at a time), so that a recorder that keeps up never
# holds a worker back; at least 64, several of the recorder's batched transactions.
UNRECORDED_MIN = 64
UNRECORDED_PER_WORKER = 8
HELD_WAIT_SECONDS = 0.1  # held: how long to wait for the recorder between other duties


def unrecorded_bound(workers: int) -> int:
    """The most results, not yet durable or in flight, a driver of `workers` may hold."""
    return max(UNRECORDED_MIN, UNRECORDED_PER_WORKER * workers)


class Pool(Protocol):
    """What the dispatcher uses of a worker pool (orchestrator.workers.WorkerPool)."""

    @property
    def size(self) -> int: ...  # workers ready to evaluate (idle or running)
    @property
    def free(self) -> int: ...  # idle workers
    @property
    def busy(self) -> int: ...  # candidates in flight, retries included
    def submit(self, job: Job) -> None: ...
    def wait(self, timeout: float) -> list[tuple[Job, Result]]: ...  # RayLostError: for good


class Backlog(Protocol):
    """What the dispatcher uses of the recorder (orchestrator.recorder.Recorder)."""

    unrecorded_max: int  # the most finished trials not yet durable at once

    @property
    def unrecorded(self) -> int: ...  # finished trials told, not yet durable in the study
    def wait_recorded(self, timeout: float) -> None: ...  # ResultsError: the recorder died


def state_of(result: Result) -> str:
    # an early-stopped evaluation is Optuna's PRUNED state (the name a pruner gives it)
    return "FAIL" if "error" in result else "PRUNED" if result.get("stopped_early") else "COMPLETE"


class Dispatcher:
    def __init__(self, pool: Pool, *, stats: DriverStats, front: Callable[[], list],
                 fidelity: FidelitySettings | None = None,
                 backlog: Backlog | None = None) -> None:  # fmt: skip
        """`front`: the (size, metric) points a candidate must be able to reach, asked
        when it is sent (multi-fidelity evaluation stops early below them); `backlog`: the
        recorder, whose unrecorded results hold new evaluations back (None: never)."""
        self.pool, self.stats, self.front, self.fidelity = pool, stats, front, fidelity
        self.backlog = backlog
        self.ready: list[Candidate] = []  # asked, priced, new: waiting for a worker
        self.inflight: dict[str, Candidate] = {}  # policy hash -> candidate ready or running
        self.running: dict[int, Candidate] = {}  # trial -> candidate at a worker
        self.sent: dict[int, float] = {}  # trial -> when its evaluation was sent
        self.eval_estimate: float | None = None  # seconds per evaluation (moving average)
        self.failures_in_a_row = self.evaluated_ok = 0
        self.last_error: str | None = None
        self.error: str | None = None  # why the run gave up, if it did
        self.worker_seconds = {True: 0.0, False: 0.0}  # by feasibility of the candidate
        self.fidelity_seen: list[float] = []  # fidelity of every evaluation by a worker

    @property
    def size(self) -> int:
        return self.pool.size

    @property
    def busy(self) -> int:
        return self.pool.busy

    def holds(self, policy_hash: str) -> bool:
        return policy_hash in self.inflight

    def take(self, candidate: Candidate) -> None:
        """A new candidate waits for a worker; one whose policy is in flight rides along
        (its result serves both)."""
        policy_hash = candidate.policy.hash
        if policy_hash in self.inflight:
            self.inflight[policy_hash].duplicates.append(candidate)
            return
        self.inflight[policy_hash] = candidate
        self.ready.append(candidate)

    def feed(self) -> bool:
        """Every free worker gets a ready candidate; whether a worker is still free (and
        may be sent one: not while held)."""
        while self.pool.free and self.ready and not self.held():
            self._send(self.ready.pop(0))
        return self.pool.free > 0 and not self.held()

    def held(self) -> bool:
        """Whether new evaluations (and asks) wait for the recorder: its unrecorded results
        and the results to come of the evaluations sent (with the asks of their policies
        riding along) are at the bound (UNRECORDED_MIN)."""
        if self.backlog is None:
            return False
        coming = sum(1 + len(candidate.duplicates) for candidate in self.running.values())
        return self.backlog.unrecorded + coming >= unrecorded_bound(self.pool.size)

    def wait_recorded(self) -> None:
        """Held: wait a little for the recorder to confirm results (returning as soon as
        it does), so the driver's other duties go on in between."""
        if self.backlog is None:
            return
        start = time.perf_counter()
        self.backlog.wait_recorded(HELD_WAIT_SECONDS)
        self.stats.held_seconds += time.perf_counter() - start

    def _send(self, candidate: Candidate) -> None:
        from orchestrator.workers import Job

        number = candidate.trial.number
        self.running[number] = candidate
        context = None
        # a baseline is scored in full: the answer must never be worse than it (issue 12)
        if self.fidelity is not None and candidate.origin != "baseline":
            # the front as it stands now, not when it was asked
            context = {"size": candidate.cost.size_bytes, "front": self.front(),
                       "fidelity": self.fidelity}  # fmt: skip
        self.sent[number] = time.monotonic()
        self.pool.submit(Job(trial=number, policy=dict(candidate.policy), context=context))

    def collect(self, *, timeout: float) -> list[tuple[Job, Result]]:
        """Finished evaluations, waiting up to `timeout` for the first. Each freed worker
        takes a ready candidate at once, and results that arrive meanwhile are collected
        (their workers fed too) before any is told: a burst of results is dispatched
        first, told after (issue 6)."""
        waited = time.perf_counter()
        done = self.pool.wait(timeout=timeout)
        self.stats.wait_seconds += time.perf_counter() - waited
        more = done
        while more:
            self.feed()
            try:
                more = self.pool.wait(timeout=0)
            except RayLostError:  # those collected are told first; the next wait raises again
                break
            done += more
        return done

    def finish(self, job: Job, result: Result) -> tuple[Candidate, str, Result]:
        """A finished job's candidate, state and result (with the attempt it took),
        counted for asking ahead, run.json's shares and giving up."""
        candidate = self.running.pop(job.trial)
        del self.inflight[candidate.policy.hash]
        self.sent.pop(job.trial, None)
        if "error" not in result and "seconds" in result:  # for asking ahead in time
            seconds, old = result["seconds"], self.eval_estimate
            self.eval_estimate = seconds if old is None else old + 0.2 * (seconds - old)
        self.worker_seconds[candidate.feasible] += result.get("seconds", 0.0)
        result = {**result, "attempt": job.attempt}
        state = state_of(result)
        if state != "FAIL":
            self.fidelity_seen.append(result.get("fidelity") or 1.0)
        self.failures_in_a_row = self.failures_in_a_row + 1 if state == "FAIL" else 0
        self.evaluated_ok += state == "COMPLETE"
        self.last_error = result.get("error")
        return candidate, state, result

    def expected_ends(self) -> list[float]:
        """When the running evaluations should end (monotonic, sorted): each one average
        evaluation after it was sent (before the first result: now)."""
        return sorted(sent + (self.eval_estimate or 0.0) for sent in self.sent.values())

    def gave_up(self) -> bool:
        """A task that fails every evaluation stops the run instead of burning the budget."""
        if self.evaluated_ok or self.failures_in_a_row < max(5, 2 * self.pool.size):
            return False
        self.error = (f"stopped early: the first {self.failures_in_a_row} evaluations all failed; "
                      f"last error: {self.last_error}")  # fmt: skip
        return True

    def figures(self) -> dict[str, Any]:
        """For run.json: where worker time went, and why the run stopped early (if)."""
        spent = sum(self.worker_seconds.values())
        seen = self.fidelity_seen
        return {
            "error": self.error, "worker_seconds": spent,
            "worker_seconds_feasible_share": self.worker_seconds[True] / spent if spent else 1.0,
            "multi_fidelity": self.fidelity is not None,
            "validation_share_saved": 1 - sum(seen) / len(seen) if seen else 0.0,
            **({"unrecorded_bound": unrecorded_bound(self.pool.size),
                "unrecorded_max": self.backlog.unrecorded_max}
               if self.backlog is not None else {}),
        }  # fmt: skip
