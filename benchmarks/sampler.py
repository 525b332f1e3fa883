"""Sampler cost per ask, side by side: multi-objective TPE, NSGA-II and random sampling
on an in-memory study of N finished trials over K knobs (the same distributions the
driver uses: categorical bits, stepped keep), with a size constraint on every trial.

This is the measurement behind `sampler: auto` (orchestrator/search.py): TPE is used
while knobs x trials stays small enough that an ask costs tens of milliseconds, NSGA-II
beyond. Run: python benchmarks/sampler.py [--knobs 10,20,40] [--trials 60,300] [--asks 20]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution

from orchestrator.search import SAMPLERS, auto_sampler

optuna.logging.set_verbosity(optuna.logging.ERROR)


def distributions(knobs: int) -> dict:
    dists = {}
    for i in range(knobs):
        if i % 2 == 0:
            dists[f"bits:l{i}"] = CategoricalDistribution((2, 3, 4, 5, 6, 8, 32))
        else:
            dists[f"keep:l{i}"] = FloatDistribution(0.1, 1.0, step=0.05)
    return dists


def filled_study(name: str, knobs: int, trials: int) -> optuna.Study:
    """A study with `trials` finished trials, asked from a random sampler."""
    rng = random.Random(0)
    dists = distributions(knobs)
    sampler = SAMPLERS[name](0, trials + 100)
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=sampler)
    filler = optuna.create_study(directions=["minimize", "maximize"],
                                 sampler=optuna.samplers.RandomSampler(seed=0))  # fmt: skip
    for _ in range(trials):
        trial = filler.ask(dists)
        trial.set_constraint("size_bytes", rng.uniform(-1, 0.5))
        filler.tell(trial, [rng.uniform(1e3, 2e5), rng.uniform(0.1, 1.0)])
    study.add_trials(filler.trials)
    return study


def ms_per_ask(name: str, knobs: int, trials: int, asks: int) -> float:
    study = filled_study(name, knobs, trials)
    dists = distributions(knobs)
    rng = random.Random(1)
    start = time.perf_counter()
    for _ in range(asks):
        trial = study.ask(dists)
        trial.set_constraint("size_bytes", rng.uniform(-1, 0.5))
        study.tell(trial, [rng.uniform(1e3, 2e5), rng.uniform(0.1, 1.0)])
    return 1000 * (time.perf_counter() - start) / asks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knobs", default="10,20,40")
    parser.add_argument("--trials", default="60,300")
    parser.add_argument("--asks", type=int, default=20)
    args = parser.parse_args()
    knob_counts = [int(k) for k in args.knobs.split(",")]
    trial_counts = [int(t) for t in args.trials.split(",")]
    print(f"sampler: ms per ask+tell on an in-memory study, {args.asks} asks after N finished "
          f"trials; Python {platform.python_version()}, Optuna {optuna.__version__}")  # fmt: skip
    print()
    print("| knobs | trials so far | tpe ms | nsga2 ms | random ms | auto picks (2 workers) |")
    print("|-------|---------------|--------|----------|-----------|------------------------|")
    for knobs in knob_counts:
        for trials in trial_counts:
            cells = [f"{ms_per_ask(name, knobs, trials, args.asks):.1f}"
                     for name in ("tpe", "nsga2", "random")]  # fmt: skip
            print(
                f"| {knobs} | {trials} | {' | '.join(cells)} | {auto_sampler(knobs, trials, 2)} |"
            )


if __name__ == "__main__":
    main()
