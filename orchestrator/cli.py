"""The `prunesearch` command.

Exit codes: 0 done, 1 failed while running, 2 bad input (one line, nothing started),
130 interrupted (the study is left resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from orchestrator.errors import ConfigError, JobError, RayLostError, ResultsError, WorkerStartError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", nargs="?", help="YAML config (default: the embedded digits-cnn search)"
    )
    p.add_argument("--target", help="the runtime the model ships on: torch (default) or "
                   "onnxruntime (key: target)")  # fmt: skip


def _run_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--trials", type=int, help="total trials of the study (key: trials)")
    p.add_argument("--workers", type=int, help="number of workers (key: workers.count)")
    p.add_argument(
        "--budget", help="hard limits, e.g. size=40KB, size=1.5MB,macs=20M or latency<=2ms "
        "(key: budget)"
    )
    p.add_argument("--out", help="results directory, or s3://bucket/prefix, gs://bucket/prefix "
                   "(key: out, default: runs)")  # fmt: skip
    p.add_argument("--study", help="study name (key: study, default: <task>-<time>)")
    p.add_argument("--seed", type=int, help="sampler seed (key: seed)")
    p.add_argument("--sampler", help="auto, tpe, nsga2 or random (key: sampler)")
    p.add_argument("--objective", help="front (default) or budget: the best within --budget "
                   "(key: objective)")  # fmt: skip
    p.add_argument("--front", help="the front's axis: size (default) or latency (key: front)")
    p.add_argument("--resume", action="store_true", help="continue an existing study")
    p.add_argument("--join", action="store_true", help="run the study --study together with the "
                   "other drivers running it (starts it if none has; storage shared by all, "
                   "e.g. postgresql://)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--address", help="Ray to join: auto (the cluster this runs in) or HOST:PORT; "
                   "default: start a local one (key: address)")  # fmt: skip


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"'{text}' is no number of seconds (e.g. 300)")
    return value


def _job_server_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray job server, e.g. http://HEAD:8265 (default: "
                   "$RAY_ADDRESS)")  # fmt: skip


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job id (printed by submit)")
    _job_server_arg(p)


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
    sb = sub.add_parser("submit", help="submit the search to a Ray cluster as a Ray Job")
    sb.add_argument("config", help="YAML config (its directory is shipped with the job)")
    _job_server_arg(sb)
    sb.add_argument("--study", help="study name (default: <task>-<time>; needed with --resume)")
    sb.add_argument("--out", help="results directory as the cluster sees it: a shared path or "
                    "s3://... (key: out; a relative path is made absolute)")  # fmt: skip
    sb.add_argument("--trials", type=int, help="total trials of the study (key: trials)")
    sb.add_argument("--budget", help="hard limits, e.g. size=40KB (key: budget)")
    sb.add_argument("--resume", action="store_true", help="continue the study --study")
    sb.add_argument("--join", action="store_true", help="one more driver for the study --study "
                    "(run --join: every driver shares it; needs a shared storage)")  # fmt: skip
    sb.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                    help="how long a cluster that is starting may take to accept the job "
                    "(its job server and job agent up; default: 300)")  # fmt: skip
    _job_args(sub.add_parser("status", help="state of a submitted job"))
    lg = sub.add_parser("logs", help="output of a submitted job")
    _job_args(lg)
    lg.add_argument("--follow", action="store_true", help="stream until the job ends")
    _job_args(sub.add_parser("stop", help="stop a submitted job (the study stays resumable)"))
    fr = sub.add_parser("front", help="print the Pareto front of a study directory")
    fr.add_argument("study_dir", help="<out>/<study>")
    ex = sub.add_parser("export", help="write the best trial within budget (or --trial N) as "
                        "policy.json, a packed model file and its manifest")  # fmt: skip
    ex.add_argument("study_dir", help="<out>/<study>")
    ex.add_argument("--budget", help="hard limits as for run, e.g. size=40KB (default: the "
                    "study's budget, else the best metric)")  # fmt: skip
    ex.add_argument("--trial", type=int, help="export this trial instead of the best")
    ex.add_argument("--out", help="directory for the files (default: <study_dir>/export)")
    ex.add_argument("--onnx", action="store_true", help="also write model.onnx, checked with "
                    "onnxruntime (needs the onnx extra)")  # fmt: skip
    ex.add_argument("--format", choices=("safetensors", "onnx"), help="safetensors: the packed "
                    "model file (default for target torch); onnx: the trial's ONNX file with "
                    "integer weights, checked in ONNX Runtime (default for target onnxruntime)")  # fmt: skip
    ex.add_argument("--accept-latency", action="store_true", help="onnx: export even when the "
                    "trial's latency here is more than 2x off the recorded one (it was timed on "
                    "another or a loaded machine); policy.json records both")  # fmt: skip
    rp = sub.add_parser("report", help="write the front (PNG, HTML), the chosen policy by layer "
                        "(PNG) and a markdown summary of a study directory")  # fmt: skip
    rp.add_argument("study_dir", help="<out>/<study>")
    rp.add_argument("--out", help="directory for the report files (default: the study directory)")
    return parser


def _load(args: argparse.Namespace, **overrides: Any):
    from orchestrator.config import load_config_file, make_config

    if args.config:
        data = load_config_file(args.config)
    elif getattr(args, "resume", False):  # continue the study as it was configured
        data = _recorded_config(args.out or "runs", args.study)
    else:
        data = {}
    return make_config(data, target=getattr(args, "target", None), **overrides)


_GIVE_CONFIG = "give the study's CONFIG file"  # the fix when its recorded config is damaged


def _recorded_config(out: str, study: str | None) -> dict[str, Any]:
    """The config a study was run with (`--resume` without CONFIG): the named study, or
    the latest one in `out` (of any task: without a CONFIG none is known; see
    runrecord.latest_study, the one rule `prepare` uses too)."""
    from orchestrator import remote
    from orchestrator.runrecord import FILE, latest_study, read_record

    if remote.is_uri(out):
        return _remote_recorded_config(out, study)
    name = study or latest_study(out)
    if name is None or not (Path(out) / name / FILE).is_file():
        where = f"'{Path(out) / study}'" if study else f"'{out}'"
        raise ConfigError(f"--resume: no prunesearch study in {where}; check --study and --out")
    record = read_record(Path(out) / name, needs=("config",), flag="--resume", fix=_GIVE_CONFIG)
    return dict(record.config or {})


def _remote_recorded_config(out: str, study: str | None) -> dict[str, Any]:
    from orchestrator import remote
    from orchestrator.runrecord import FILE, parse_record

    if not study:
        raise ConfigError(f"--resume with --out '{out}' needs --study NAME (the study to continue)")
    remote.check_uri(out)
    where = remote.join(remote.join(out, study), FILE)
    data = remote.read_bytes(where)
    if data is None:
        raise ConfigError(f"--resume: no prunesearch study at '{where}'; check --study and --out")
    record = parse_record(data, where=where, needs=("config",), flag="--resume", fix=_GIVE_CONFIG)
    return dict(record.config or {})


def _sys_path(args: argparse.Namespace) -> tuple[str, ...]:
    """Where user task modules are imported from: the working and the config's directory
    (put on sys.path while a command runs: `main` restores it)."""
    paths = [os.getcwd()]
    if getattr(args, "config", None):
        paths.append(str(Path(args.config).resolve().parent))
    return tuple(paths)


@contextlib.contextmanager
def _command_scope(args: argparse.Namespace) -> Iterator[None]:
    """What a command changes in this process, undone after it: `main` also runs inside
    tests and notebooks, whose sys.path and torch thread count are theirs."""
    saved_path = list(sys.path)
    sys.path[:0] = [p for p in _sys_path(args) if p not in sys.path]
    threads = _torch_threads()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if threads is not None and _torch_threads() != threads:
            import torch

            torch.set_num_threads(threads)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")  # never imported just to ask
    return None if torch is None else torch.get_num_threads()


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.prepare import prepare
    from orchestrator.search import run_prepared
    from orchestrator.summary import print_summary

    sys_path = _sys_path(args)
    config = _load(args, trials=args.trials, **{"workers.count": args.workers}, budget=args.budget,
                   out=args.out, study=args.study, seed=args.seed, sampler=args.sampler,
                   objective=args.objective, address=args.address, front=args.front)  # fmt: skip
    prepared = prepare(config, resume=args.resume, join=args.join)  # checks before Ray starts
    if not args.quiet:
        print(f"study {prepared.study} in {prepared.location} ({len(prepared.space.searchable)} "
              f"knobs, {config.trials} trials)", file=sys.stderr)  # fmt: skip
    try:
        result = run_prepared(prepared, quiet=args.quiet, sys_path=sys_path)
    except RayLostError as lost:
        print(f"prunesearch: error: {_one_line(lost)}; {_left_behind(args, prepared)}",
              file=sys.stderr)  # fmt: skip
        return 1
    if not args.quiet:
        print_summary(result, prepared)
    if result.error:
        print(f"prunesearch: {result.error}", file=sys.stderr)
        return 1
    if result.interrupted:
        print(f"interrupted: finished trials are recorded; continue with: "
              f"{_resume_command(args, prepared)}", file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    return 0


def _resume_command(args: argparse.Namespace, prepared: Any) -> str:
    """The command that continues this run's study (on the Ray it joined, if it did)."""
    address = f" --address {args.address}" if args.address else ""
    return (f"prunesearch run {args.config or ''} --out {prepared.config.out} --study "
            f"{prepared.study}{address} --resume").replace("  ", " ")  # fmt: skip


def _left_behind(args: argparse.Namespace, prepared: Any) -> str:
    """What a run that lost its Ray leaves: its recorded trials and how to go on (a study
    not yet opened, lost while its workers started, is simply run again)."""
    from orchestrator.results import read_trials
    from orchestrator.runrecord import FILE

    if not (prepared.study_dir / FILE).is_file():
        return "no trial had started; run the same command again"
    recorded = len(read_trials(prepared.study_dir))
    return (f"{recorded} trial{'' if recorded == 1 else 's'} recorded in {prepared.location}; "
            f"resume with: {_resume_command(args, prepared)}")  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from orchestrator.evaluate import Evaluator, RecoverySettings, pick_device
    from orchestrator.prepare import build_space
    from search_spaces import SpaceError
    from search_spaces.cost import policy_cost
    from search_spaces.policy import Policy

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
                          device=pick_device(config.workers.device),
                          target=config.target_settings())  # fmt: skip
    result = evaluator.evaluate(policy)
    report = {"metric": result["metric"], **cost.as_dict(), "policy_hash": policy.hash,
              **{k: result[k] for k in ("latency_ms", "latency_p90_ms") if k in result}}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def cmd_space(args: argparse.Namespace) -> int:
    from orchestrator.prepare import build_space
    from orchestrator.summary import print_space

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
    try:
        with worker_pool(config, space, sys_path=sys_path) as (pool, _):
            base = pool.base_metric()
            table = table_for(config.task, space, config.recovery.model_dump(), pool, base,
                              quiet=False)  # fmt: skip
    except RayLostError as lost:
        raise RayLostError(f"{lost}; the probes measured are cached: run the command "
                           "again") from None  # fmt: skip
    print_sensitivity(table, base_metric=base)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator import jobs
    from orchestrator.prepare import default_study_name

    path = Path(args.config)
    out = jobs.results_path(args.out) if args.out else None
    flags = {"out": out, "trials": args.trials, "budget": args.budget}
    config = make_config_from(path, **flags, study=args.study)
    if args.resume and args.join:
        raise ConfigError("submit: give --resume or --join, not both")
    if (args.resume or args.join) and not config.study:
        flag = "--resume" if args.resume else "--join"
        raise ConfigError(f"submit {flag} needs --study NAME (printed when it was submitted)")
    if out is None and "://" not in config.out and not Path(config.out).is_absolute():
        flags["out"] = jobs.results_path(config.out)  # else it lands in the job's temp dir
    study = config.study or default_study_name(config.task)
    wait = jobs.WAIT_SECONDS if args.wait is None else args.wait
    job = jobs.submit(path, config, study, flags, address=args.address, resume=args.resume,
                      join=args.join, wait=wait)  # fmt: skip
    print(job)
    print(f"study {study}: results in {flags['out'] or config.out}/{study}; follow with "
          f"prunesearch logs {job} --follow", file=sys.stderr)  # fmt: skip
    return 0


def make_config_from(path: Path, **overrides: Any):
    from orchestrator.config import load_config_file, make_config

    return make_config(load_config_file(path), **overrides)


def cmd_status(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    state, message = jobs.status(args.job, address=args.address)
    print(f"{state}{': ' + message if message else ''}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    jobs.logs(args.job, address=args.address, follow=args.follow)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    stopped = jobs.stop(args.job, address=args.address)
    print("stopping" if stopped else "not running")
    return 0


def cmd_front(args: argparse.Namespace) -> int:
    from orchestrator.remote import local_copy
    from orchestrator.results import compute_front, front_axis
    from orchestrator.runrecord import read_study
    from orchestrator.summary import print_front

    with local_copy(args.study_dir) as study_dir:
        run, trials = read_study(study_dir)
    # where run.json lacks them the front prints without the base columns
    base = run.base.model_dump(include={"size_bytes", "metric"}, exclude_none=True)
    axis = front_axis(run.config)
    print_front(compute_front(trials, axis), base=base, axis=axis)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report

    with _study_and_out(args) as (study_dir, out, shown):
        lines = [shown(path) for path in write_report(study_dir, out=out)]
    print("\n".join(lines))  # once uploaded
    return 0


def _onnx_lines(record: dict, out: Path, shown: Any) -> str:
    from orchestrator.budget import format_bytes

    model = record["model_file"]
    return "\n".join([
        f"exported trial {record['trial']} of study {record['study']} as ONNX (target "
        f"{record['target']}): metric in ONNX Runtime {record['artifact_metric']:.4f} (recorded "
        f"{record['metric']:.4f}), latency {record['latency_ms']:.3f} ms" + _latency_note(record),
        f"{shown(out / model['name'])}: {model['bytes']:,} bytes ({format_bytes(model['bytes'])})",
        shown(out / "policy.json"),
    ])  # fmt: skip


def _latency_note(record: dict) -> str:
    """What the user must know about the latency: accepted though it disagrees."""
    if record.get("latency_check") != "accepted":
        return ""
    return (f" (ACCEPTED with --accept-latency: the trial recorded "
            f"{record['recorded_latency_ms']:.3f} ms; policy.json keeps both)")


@contextlib.contextmanager
def _study_and_out(args: argparse.Namespace) -> Iterator[tuple[Path, Path | None, Callable]]:
    """Local paths for STUDY_DIR and --out, either of which may be a URI (downloaded
    before the block, what was written uploaded after it), and how to show a written
    path to the user."""
    from orchestrator.remote import local_copy, shown

    with contextlib.ExitStack() as stack:
        study = stack.enter_context(local_copy(args.study_dir))
        if args.out is None:
            yield study, None, lambda path: shown(path, study, args.study_dir)
        else:
            out = stack.enter_context(local_copy(args.out, pull=False))
            yield study, out, lambda path: shown(path, out, args.out)


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.budget import format_bytes
    from orchestrator.export import (
        MANIFEST_FILE,
        ONNX_FILE,
        POLICY_FILE,
        ExportError,
        export_best,
    )

    with _study_and_out(args) as (study_dir, out, shown):
        try:
            out = export_best(study_dir, budget=args.budget, trial=args.trial, out=out,
                              onnx=args.onnx, format=args.format,
                              accept_latency=args.accept_latency)  # fmt: skip
        except ExportError as exc:
            print(f"prunesearch: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        record = json.loads((out / POLICY_FILE).read_text())
        model = record["model_file"]
        lines = [_onnx_lines(record, out, shown)] if "artifact_metric" in record else [
            f"exported trial {record['trial']} of study {record['study']}: metric "
            f"{record['verified_metric']:.4f} (recorded {record['metric']:.4f}), predicted "
            f"{format_bytes(record['predicted']['size_bytes'])}",
            f"{shown(out / model['name'])}: {model['bytes']:,} bytes ({model['payload_bytes']:,} "
            f"tensors + {model['header_bytes']:,} header)",
            *(shown(out / name) for name in (MANIFEST_FILE, POLICY_FILE,
                                             *([ONNX_FILE] if args.onnx else []))),
        ]  # fmt: skip
    print("\n".join(lines))  # once uploaded
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "eval": cmd_eval, "space": cmd_space, "front": cmd_front,
    "sensitivity": cmd_sensitivity, "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs,
    "stop": cmd_stop, "report": cmd_report, "export": cmd_export,
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
        with _command_scope(args):
            return COMMANDS[args.verb](args)
    except ConfigError as exc:
        print(f"prunesearch: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (WorkerStartError, JobError, ResultsError, RayLostError) as exc:
        print(f"prunesearch: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
