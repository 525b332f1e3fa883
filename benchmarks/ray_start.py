"""Local Ray start-up: how long a run waits for its Ray, and what Ray starts (issue 16).

Each line starts a local Ray in a fresh process, `--repeats` times (median), three ways:
- ray default: `ray.init(address="local", num_cpus=2)` (the dashboard if installed);
- no dashboard: the local start before issue 16 (include_dashboard=False, bound to
  127.0.0.1, a 200-MB object store);
- prunesearch: what a local `prunesearch run` starts now (orchestrator.search._ray_init:
  the same, without Ray's autoscaler monitor and log monitor).
It times the start (imports aside) and then a first trivial actor call (a worker process started), and
counts the Ray processes started (descendants of the process) and their memory (RSS).

    python benchmarks/ray_start.py
    python benchmarks/ray_start.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, time
import psutil
import ray
import ray._private.ray_constants as ray_constants
from orchestrator.config import make_config
from orchestrator.search import _ray_init
mode = sys.argv[1]
t0 = time.perf_counter()  # imports aside: Ray's start alone
if mode == "default":
    ray.init(address="local", num_cpus=2, log_to_driver=False, logging_level="ERROR")
elif mode == "prunesearch":
    _ray_init(make_config({"workers": {"count": 2}}))
else:
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20,
             log_to_driver=False, logging_level="ERROR")
started = time.perf_counter() - t0

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

ray.get(Probe.remote().ping.remote())
first = time.perf_counter() - t0
procs = psutil.Process().children(recursive=True)
def role(p):  # Ray's Python processes by their script
    script = [a for a in p.cmdline()[1:3] if a.endswith(".py")]
    return script[0].rsplit("/", 1)[-1] if p.name() == "python" and script else p.name()
names = sorted({role(p) for p in procs})
rss = sum(p.memory_info().rss for p in procs)
print(json.dumps({"init": started, "first_call": first, "processes": len(procs),
                  "names": names, "rss_mb": rss / 2**20}))
ray.shutdown()
"""

MODES = ["default", "no dashboard", "prunesearch"]


def measure(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"{'mode':<13} {'ray.init s':>10} {'+1st call s':>11} {'processes':>9} "
          f"{'RSS MB':>7}  what runs (besides workers)")  # fmt: skip
    found: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):  # round robin: a load change hits every mode alike
        for mode in MODES:
            found[mode].append(measure(mode))
    for mode, runs in found.items():
        init = statistics.median(r["init"] for r in runs)
        first = statistics.median(r["first_call"] for r in runs)
        procs = statistics.median(r["processes"] for r in runs)
        rss = statistics.median(r["rss_mb"] for r in runs)
        names = ", ".join(n for n in runs[-1]["names"] if not n.startswith("ray::IDLE"))
        print(f"{mode:<13} {init:>10.2f} {first:>11.2f} {procs:>9.0f} {rss:>7.0f}  {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
