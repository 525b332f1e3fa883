"""Repair of over-budget asks, on and off, side by side: share of asks over budget, trials
evaluated, and the best metric within the budget, on a tight size budget.

Run: python benchmarks/repair.py [--task digits-cnn] [--budget size=8KB] [--trials 100]
     [--seeds 0,1,2] [--sampler tpe]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray

from orchestrator.config import make_config
from orchestrator.runrecord import read_record
from orchestrator.search import run_search


def one(task: str, budget: str, trials: int, seed: int, sampler: str, repair: bool,
        out: Path) -> dict:  # fmt: skip
    study = f"{task}-{seed}-{'repair' if repair else 'plain'}"
    result = run_search(make_config({
        "task": task, "budget": budget, "trials": trials, "seed": seed, "sampler": sampler,
        "repair": repair, "workers": {"count": 2}, "out": str(out), "study": study,
    }))  # fmt: skip
    run = read_record(out / study).runs[-1]
    done = result.trials[(result.trials["state"] == "COMPLETE") & result.trials["feasible"]]
    return {
        "infeasible": run.infeasible_share,
        "evaluated": len(done),
        "best": float(done["metric"].max()) if len(done) else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits-cnn")
    parser.add_argument("--budget", default="size=8KB")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sampler", default="tpe")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repair in (False, True):
            runs = [one(args.task, args.budget, args.trials, s, args.sampler, repair, Path(tmp))
                    for s in seeds]  # fmt: skip
            rows[repair] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    ray.shutdown()
    print(f"repair: {args.task}, budget {args.budget}, {args.trials} trials, sampler "
          f"{args.sampler}, seeds {args.seeds} (means)\n")  # fmt: skip
    print(
        "| repair | infeasible share of asks | feasible trials evaluated | best metric in budget |"
    )
    print(
        "|--------|--------------------------|---------------------------|-----------------------|"
    )
    for repair, r in rows.items():
        print(f"| {'on' if repair else 'off'} | {r['infeasible']:.2f} | {r['evaluated']:.1f} | "
              f"{r['best']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
