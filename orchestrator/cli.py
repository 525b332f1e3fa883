"""The `prunesearch` command.

Exit codes: 0 done, 1 failed while running, 2 bad input (one line, nothing started),
130 interrupted (the study is left resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from orchestrator.errors import ConfigError, WorkerStartError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", nargs="?", help="YAML config (default: the embedded digits-cnn search)"
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--trials", type=int, help="total trials of the study (key: trials)")
    p.add_argument("--workers", type=int, help="number of workers (key: workers.count)")
    p.add_argument(
        "--budget", help="hard limits, e.g. size=40KB or size=1.5MB,macs=20M (key: budget)"
    )
    p.add_argument("--out", help="results directory (key: out, default: runs)")
    p.add_argument("--study", help="study name (key: study, default: <task>-<time>)")
    p.add_argument("--seed", type=int, help="sampler seed (key: seed)")
    p.add_argument("--sampler", help="auto, tpe, nsga2 or random (key: sampler)")
    p.add_argument("--objective", help="front (default) or budget: the best within --budget "
                   "(key: objective)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue an existing study")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunesearch", description="Distributed pruning-and-quantization "
                     "policy search for PyTorch models.")  # fmt: skip
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    _run_args(sub.add_parser("run", help="search policies (no CONFIG: the embedded default)"))
    ev = sub.add_parser("eval", help="score one policy and print metric, size_bytes, macs, bops")
    _config_args(ev)
    ev.add_argument("--policy", required=True, help="policy JSON file, or uniform:BITS[:KEEP]")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _config_args(sub.add_parser("space", help="print the knobs: layers, shapes, choices"))
    se = sub.add_parser("sensitivity", help="metric per knob value, every other layer float")
    _config_args(se)
    se.add_argument("--workers", type=int, help="number of workers (key: workers.count)")
    fr = sub.add_parser("front", help="print the Pareto front of a study directory")
    fr.add_argument("study_dir", help="<out>/<study>")
    return parser


def _load(args: argparse.Namespace, **overrides: Any):
    from orchestrator.config import load_config_file, make_config

    if args.config:
        data = load_config_file(args.config)
    elif getattr(args, "resume", False):  # continue the study as it was configured
        data = _recorded_config(args.out or "runs", args.study)
    else:
        data = {}
    return make_config(data, **overrides)


def _recorded_config(out: str, study: str | None) -> dict[str, Any]:
    """The config a study was run with (`--resume` without CONFIG): the named study, or
    the latest one in `out`."""
    runs = [Path(out) / study / "run.json"] if study else list(Path(out).glob("*/run.json"))
    runs = [r for r in runs if r.is_file()]
    if not runs:
        where = f"'{Path(out) / study}'" if study else f"'{out}'"
        raise ConfigError(f"--resume: no prunesearch study in {where}; check --study and --out")
    latest = max(runs, key=lambda r: r.stat().st_mtime)
    try:
        return dict(json.loads(latest.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: '{latest}' is damaged ({exc}); give the study's CONFIG "
                          "file") from None  # fmt: skip


def _sys_path(args: argparse.Namespace) -> tuple[str, ...]:
    """Where user task modules are imported from: the working and the config's directory."""
    paths = [os.getcwd()]
    if getattr(args, "config", None):
        paths.append(str(Path(args.config).resolve().parent))
    for path in paths:
        if path not in sys.path:
            sys.path.insert(0, path)
    return tuple(paths)


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.prepare import prepare
    from orchestrator.search import run_prepared
    from orchestrator.summary import print_summary

    sys_path = _sys_path(args)
    config = _load(args, trials=args.trials, **{"workers.count": args.workers}, budget=args.budget,
                   out=args.out, study=args.study, seed=args.seed, sampler=args.sampler,
                   objective=args.objective)  # fmt: skip
    prepared = prepare(config, resume=args.resume)  # all checks before Ray starts
    if not args.quiet:
        print(f"study {prepared.study} in {prepared.study_dir} ({len(prepared.space.searchable)} "
              f"knobs, {config.trials} trials)", file=sys.stderr)  # fmt: skip
    result = run_prepared(prepared, quiet=args.quiet, sys_path=sys_path)
    if not args.quiet:
        print_summary(result, prepared)
    if result.error:
        print(f"prunesearch: {result.error}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"interrupted: finished trials are recorded; continue with: prunesearch run "
              f"{args.config or ''} --out {config.out} --study {prepared.study} --resume"
              .replace("  ", " "), file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from orchestrator.cost import policy_cost
    from orchestrator.evaluate import Evaluator, RecoverySettings, pick_device
    from orchestrator.policy import Policy
    from orchestrator.prepare import build_space
    from search_spaces import SpaceError

    _sys_path(args)
    config = _load(args)
    task, _, space = build_space(config)
    text = args.policy
    if not text.startswith("uniform:"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ConfigError(f"--policy '{args.policy}': cannot read it ({exc.strerror}); give a "
                              "policy JSON file or uniform:BITS[:KEEP]") from None  # fmt: skip
    try:
        policy = Policy.parse(space, text)
    except SpaceError as exc:
        raise ConfigError(f"--policy: {exc}") from None
    cost = policy_cost(space, policy)
    torch.set_num_threads(max(1, int(config.workers.cpus_per_worker)))
    evaluator = Evaluator(task, space, recovery=RecoverySettings(**config.recovery.model_dump()),
                          device=pick_device(config.workers.device))  # fmt: skip
    result = evaluator.evaluate(policy)
    report = {"metric": result["metric"], **cost.as_dict(), "policy_hash": policy.hash}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from orchestrator.prepare import build_space
    from orchestrator.summary import print_space

    _sys_path(args)
    config = _load(args)
    _, _, space = build_space(config)
    print_space(space)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from orchestrator.prepare import build_space, check_devices
    from orchestrator.search import worker_pool
    from orchestrator.sensitivity import table_for
    from orchestrator.summary import print_sensitivity

    sys_path = _sys_path(args)
    config = _load(args, **{"workers.count": args.workers})
    check_devices(config)
    _, _, space = build_space(config)
    with worker_pool(config, space, sys_path=sys_path) as (pool, _):
        base = pool.base_metric()
        table = table_for(config.task, space, config.recovery.model_dump(), pool, base)
    print_sensitivity(table, base_metric=base)
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    from orchestrator.summary import print_front, read_study

    front, run = read_study(Path(args.study_dir))
    print_front(front, base=run.get("base", {}))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "eval": cmd_eval, "space": cmd_space, "front": cmd_front,
    "sensitivity": cmd_sensitivity,
}  # fmt: skip


def _one_line(exc: Exception) -> str:
    """User code may raise multi-line messages; the CLI's contract is one line."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return COMMANDS[args.verb](args)
    except ConfigError as exc:
        print(f"prunesearch: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except WorkerStartError as exc:
        print(f"prunesearch: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
