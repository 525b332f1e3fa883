"""Where the driver's time goes: sampler, waiting for workers, everything else (overhead)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import optuna


@dataclass
class DriverStats:
    sampler_seconds: float = 0.0  # inside the sampler (ask-time sampling, after_trial)
    wait_seconds: float = 0.0  # blocked in ray.wait with every worker busy
    held_seconds: float = 0.0  # waiting for the recorder to catch up (dispatcher.held)
    loop_seconds: float = 0.0  # the whole dispatch loop, wall time
    drain_seconds: float = 0.0  # after the loop, until every trial is durable (recorder)
    trials: int = 0

    @property
    def overhead_seconds(self) -> float:
        """Driver time that is neither sampling nor waiting: dispatch, tell, bookkeeping."""
        waiting = self.wait_seconds + self.held_seconds
        return max(0.0, self.loop_seconds - waiting - self.sampler_seconds)

    def as_dict(self) -> dict[str, float]:
        per = max(self.trials, 1)
        return {"trials": self.trials, "loop_seconds": self.loop_seconds,
                "wait_seconds": self.wait_seconds, "held_seconds": self.held_seconds,
                "sampler_seconds": self.sampler_seconds,
                "drain_seconds": self.drain_seconds,
                "overhead_ms_per_trial": 1000 * self.overhead_seconds / per,
                "sampler_ms_per_trial": 1000 * self.sampler_seconds / per}  # fmt: skip


class TimedSampler(optuna.samplers.BaseSampler):
    """Delegates to a sampler and adds the time it takes to `stats.sampler_seconds`."""

    def __init__(self, inner: optuna.samplers.BaseSampler, stats: DriverStats) -> None:
        self.inner, self.stats = inner, stats

    def _timed(self, name: str, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return getattr(self.inner, name)(*args, **kwargs)
        finally:
            self.stats.sampler_seconds += time.perf_counter() - start

    def infer_relative_search_space(self, study, trial):
        return self._timed("infer_relative_search_space", study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._timed("sample_relative", study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._timed("sample_independent", study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        return self._timed("before_trial", study, trial)

    def after_trial(self, study, trial, state, values):
        return self._timed("after_trial", study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
