"""Start-up cost against knob count: time to the first sampler trial, sensitivity
evaluations, before and after the sensitivity phase was bounded by the trial budget.

    python benchmarks/setup.py                          # 9 -> 241 knobs
    python benchmarks/setup.py --tasks digits-cnn --cap 120
    python benchmarks/setup.py --tasks zoo --after-only   # every torchvision classifier

Each line runs `prunesearch run` (2 workers, 40 trials, a fresh cache: planning included)
until its first trial proposed by the sampler is recorded, then stops it:
- after: the defaults (`sensitivity.share: 0.25`: at most 10 evaluations of probes);
- before: the code before the phase was bounded (commit dd67aea, checked out with
  `git worktree add /tmp/wt-before dd67aea`; `--before-tree`): every probe on all the data.
`before` is stopped at `--cap` seconds; the figure is then "> cap". One evaluation is the
float model's, timed on a worker (run.json). Sensitivity evaluations are whole-data
equivalents (a probe on a sixth of the data counts 1/6).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["digits-cnn", "orchestrator.tasks.vision:resnet18",
         "orchestrator.tasks.vision:mobilenet_v3_small", "orchestrator.tasks.vision:regnet_y_400mf",
         "orchestrator.tasks.vision:densenet121"]  # fmt: skip
TRIALS = 40


def _knobs_and_probes(task: str) -> tuple[int, int]:
    from orchestrator.config import make_config
    from orchestrator.prepare import build_space
    from orchestrator.sensitivity import schedule

    _, _, space = build_space(make_config({"task": task}))
    return len(space.searchable), schedule(space).total


def _first_sampler_trial(study: Path) -> int | None:
    """How many trials came before the first the sampler proposed; None: not yet."""
    parts = list((study / "trials").glob("part-*.parquet"))
    if not parts:
        return None
    try:
        trials = pd.read_parquet(study / "trials", columns=["trial", "origin"])
    except Exception:  # a part being replaced: look again
        return None
    sampled = trials.loc[trials["origin"] == "sampler", "trial"]
    return None if sampled.empty else int((trials["trial"] < sampled.min()).sum())


def run_once(task: str, *, tree: Path, trials: int, cap: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "c.yaml"
        config.write_text(json.dumps({"task": task, "trials": trials, "workers": {"count": 2}}))
        env = {**os.environ, "PRUNESEARCH_CACHE": str(Path(tmp) / "cache"),
               "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(tree)}  # fmt: skip
        study = Path(tmp) / "out" / "s"
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(config),
                                 "--out", str(Path(tmp) / "out"), "--study", "s", "--quiet"],
                                cwd=tree, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        reached = before = None
        while proc.poll() is None and time.monotonic() - start < cap:
            if (before := _first_sampler_trial(study)) is not None:
                reached = time.monotonic() - start
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        tables = list((Path(tmp) / "cache" / "sensitivity").glob("*.parquet"))
        evaluations = None
        if tables:
            raw = pd.read_parquet(tables[0])
            evaluations = float(raw["share"].fillna(1.0).sum()) if "share" in raw else len(raw)
        eval_s = None
        if (study / "run.json").is_file():
            runs = json.loads((study / "run.json").read_text()).get("runs", [])
            eval_s = runs[-1].get("eval_seconds") if runs else None
        return {"first_trial_s": reached, "evaluations": evaluations, "eval_s": eval_s,
                "trials_before": before}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--cap", type=float, default=240, help="seconds before 'before' stops")
    parser.add_argument(
        "--before-tree",
        type=Path,
        default=Path("/tmp/wt-before"),
        help="a checkout of the code before (commit dd67aea)",
    )
    parser.add_argument("--after-only", action="store_true",
                        help="only today's code; adds one evaluation's time and the trials "
                        "before the first sampler trial (e.g. the whole zoo: --tasks zoo)")  # fmt: skip
    args = parser.parse_args()
    if args.tasks == "zoo":
        from benchmarks.models import ZOO

        args.tasks = ",".join(f"orchestrator.tasks.vision:{arch}" for arch in ZOO)
    if args.after_only:
        return _after_only(args)
    print(
        "| task | knobs | probes (full sweep) | before: sensitivity evaluations | before: "
        "first sampler trial | after: sensitivity evaluations | after: first sampler trial |"
    )
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        knobs, total = _knobs_and_probes(task)
        if not (args.before_tree / "orchestrator").is_dir():
            raise SystemExit(f"no checkout at {args.before_tree}: git worktree add "
                             f"{args.before_tree} dd67aea")  # fmt: skip
        before = run_once(task, tree=args.before_tree.resolve(), trials=TRIALS, cap=args.cap)
        after = run_once(task, tree=ROOT, trials=TRIALS, cap=args.cap)

        def shown(value, unit=" s"):
            return f"> {args.cap:.0f}{unit}" if value is None else f"{value:.1f}{unit}"

        before_evals = (f"{before['evaluations']:.0f}" if before["first_trial_s"] is not None
                        else f"{total} planned")  # fmt: skip
        print(
            f"| {task.rpartition(':')[2]} | {knobs} | {total} | {before_evals} | "
            f"{shown(before['first_trial_s'])} | {after['evaluations'] or 0:.1f} | "
            f"{shown(after['first_trial_s'])} |",
            flush=True,
        )


def _after_only(args: argparse.Namespace) -> None:
    print("| task | knobs | sensitivity evaluations | trials before the first sampler trial "
          "| one evaluation | first sampler trial | in evaluations |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        knobs, _ = _knobs_and_probes(task)
        got = run_once(task, tree=ROOT, trials=TRIALS, cap=args.cap)
        first, eval_s = got["first_trial_s"], got["eval_s"]
        ratio = f"{first / eval_s:.0f}" if first and eval_s else "-"
        print(f"| {task.rpartition(':')[2]} | {knobs} | {got['evaluations'] or 0:.1f} | "
              f"{'-' if got['trials_before'] is None else got['trials_before']} | "
              f"{'-' if eval_s is None else f'{eval_s:.2f} s'} | "
              f"{'> cap' if first is None else f'{first:.1f} s'} | {ratio} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
