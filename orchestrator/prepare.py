"""Everything checked before any work starts: task, space, budget, study directory.

`prepare` raises ConfigError (one line: what is wrong and how to fix it) and neither
starts Ray nor writes a file, so bad input never costs a worker or touches a study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from orchestrator.budget import Budget, format_bytes
from orchestrator.cache import cache_dir
from orchestrator.compress.plan import plan_groups
from orchestrator.config import SearchConfig
from orchestrator.errors import ConfigError
from orchestrator.noise import bits_noise
from orchestrator.remote import Mirror, check_uri, is_uri, staging_dir
from orchestrator.runrecord import FILE, damaged, latest_study, read_record
from orchestrator.targets import Target, target_of
from orchestrator.task import Task, resolve_task
from search_spaces import SearchSpace, SpaceError, derive_space, profile_model
from search_spaces.cost import Cost, policy_cost
from search_spaces.onnx_layout import OnnxLayout
from search_spaces.policy import Policy
from search_spaces.profile import ModelProfile
from search_spaces.structure import PruningPlan

_BUDGET_NAMES = {"size_bytes": "size", "macs": "macs", "bops": "bops"}


@dataclass(frozen=True, kw_only=True)
class Prepared:
    config: SearchConfig
    task: Task
    space: SearchSpace
    budget: Budget
    base_cost: Cost
    study: str
    study_dir: Path
    resume: bool  # the study exists: continue it (--resume, or --join of a started one)
    join: bool = False  # share the study with other drivers (--join)
    mirror: Mirror | None = None  # `out` is a URI: study_dir is its local staging copy
    # per bits knob and choice, the base weights' quantization noise (orchestrator.noise)
    noise: Mapping[str, Mapping[int, float]] = dataclasses.field(default_factory=dict)

    @property
    def location(self) -> str:
        """Where the study's files are, as the user named it (a path or a URI)."""
        return self.mirror.uri if self.mirror is not None else str(self.study_dir)


def build_space(config: SearchConfig) -> tuple[Task, nn.Module, SearchSpace]:
    try:
        task = resolve_task(config.task)
    except SystemExit as exc:  # e.g. a training script's argparse run at import
        raise ConfigError(f"task '{config.task}': loading it called sys.exit({exc.code!r}); "
                          "make_task() must return a Task without exiting") from None  # fmt: skip
    if config.recovery.finetune_steps and task.train is None:  # before any worker starts
        raise ConfigError(f"recovery.finetune_steps: {config.recovery.finetune_steps} needs the "
                          f"task's train batches and task '{config.task}' has none; give its "
                          "Task a train= or set finetune_steps: 0")  # fmt: skip
    try:
        model = task.model()
        example = task.example_inputs()
    except Exception as exc:
        raise ConfigError(f"task '{config.task}': loading its model or example inputs failed "
                          f"with {type(exc).__name__}: {exc}") from exc  # fmt: skip
    try:
        profile = profile_model(model, example)
    except Exception as exc:
        raise ConfigError(f"task '{config.task}': the model failed on its example inputs: "
                          f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    if not profile.layers:
        raise ConfigError(f"task '{config.task}': the model has no Conv/Linear/LSTM/GRU layer "
                          "to compress")  # fmt: skip
    target = target_of(config.target)
    target.check(example)
    mode, plan, fallback = _for_target(target, profile, *_pruning_plan(config, model, example,
                                                                        profile))  # fmt: skip
    try:
        space = derive_space(profile, config.space, pruning=mode, plan=plan, fallback=fallback,
                             stored=target.stored_bits(), artifact=_layout(target, model, example))  # fmt: skip
    except SpaceError as exc:
        raise ConfigError(str(exc)) from None
    return task, model, space


def _layout(target: Target, model: nn.Module, example: object) -> OnnxLayout | None:
    try:
        return target.layout(model, example)
    except Exception as exc:
        raise ConfigError(f"target: {target.name}: exporting the model failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                          "); use target: torch") from exc  # fmt: skip


def _for_target(target: Target, profile: ModelProfile, mode: str, plan: PruningPlan | None,
                fallback: dict[str, str]) -> tuple[str, PruningPlan | None, dict[str, str]]:  # fmt: skip
    """What of the pruning the target runs smaller: `auto`'s unstructured fallback becomes
    none, and groups through a layer type whose exported node fixes the width are left
    out, with why."""
    if mode not in target.pruning:
        return "none", None, {**fallback, "model": f"target {target.name} runs masked weights "
                                                   "dense (no smaller, no faster)"}  # fmt: skip
    if plan is None:
        return mode, plan, fallback
    kinds = {layer.name: layer.kind for layer in profile.layers}
    fixed = {g.name: kinds[m] for g in plan.groups for m in g.members
             if kinds.get(m) in target.fixed_width}  # fmt: skip
    if not fixed:
        return mode, plan, fallback
    excluded = {**plan.excluded, **{name: f"target {target.name}: its {kind} node fixes the "
                                          "width" for name, kind in fixed.items()}}  # fmt: skip
    plan = PruningPlan(groups=tuple(g for g in plan.groups if g.name not in fixed),
                       excluded=excluded, importance=plan.importance)  # fmt: skip
    return (mode, plan, fallback) if plan.groups else ("none", None, {**fallback, **excluded})


def _pruning_plan(config: SearchConfig, model: nn.Module, example: object, profile: object
                  ) -> tuple[str, PruningPlan | None, dict[str, str]]:  # fmt: skip
    """`auto` is structured where the model has coupling groups that can be cut; else
    unstructured, with why (by group, or "model" when tracing failed) for `space` and
    run.json, never silently."""
    if config.pruning not in ("auto", "structured"):
        return config.pruning, None, {}
    layer_names = [layer.name for layer in profile.layers]
    try:
        plan = plan_groups(model, example, layer_names=layer_names, importance=config.importance,
                           cache=cache_dir() / "plans")  # fmt: skip
    except Exception as exc:
        if config.pruning == "structured":
            raise ConfigError(f"pruning: structured: tracing the model's channel dependencies "
                              f"failed ({type(exc).__name__}: {exc}); use pruning: "
                              "unstructured") from exc  # fmt: skip
        return "unstructured", None, {"model": f"tracing the model's channel dependencies "
                                               f"failed ({type(exc).__name__}: {exc})"}  # fmt: skip
    if plan.groups:
        return "structured", plan, {}
    if config.pruning == "structured":
        reasons = "; ".join(f"{k}: {v}" for k, v in list(plan.excluded.items())[:3])
        raise ConfigError(f"pruning: structured: no group of this model's channels can be cut "
                          f"({reasons or 'no groups'}); use pruning: unstructured")  # fmt: skip
    return "unstructured", None, dict(plan.excluded) or {"model": "it has no coupling groups"}


def check_budget(space: SearchSpace, budget: Budget) -> None:
    """Refuse a budget that even the smallest policy in the space cannot meet."""
    smallest = policy_cost(space, Policy.from_values(space, space.extreme_values("min")))
    for field, limit in budget.limits.items():
        least = getattr(smallest, field)
        if least > limit:
            shown = format_bytes if field == "size_bytes" else str
            raise ConfigError(
                f"budget {_BUDGET_NAMES[field]}={shown(limit)} is below the smallest model this "
                f"space can build ({shown(least)}); raise the budget or widen the space's choices"
            )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "study"


def default_study_name(task_name: str) -> str:
    return f"{_slug(task_name.rpartition(':')[2] or task_name)}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out: Path) -> None:
    """`out` is a directory this user can write in, or can be made one: checked here, so
    a file in the way fails before Ray starts, not when the study directory is made."""
    path = out.absolute()
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out '{out}': '{parent}' is a file, not a directory; give a "
                                  "directory for the results (key: out)")  # fmt: skip
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"--out '{out}': cannot write in '{parent}'; give a directory "
                                  "you can write to (key: out)")  # fmt: skip
            return


def resolve_study(config: SearchConfig, task: Task, *, resume: bool,
                  join: bool = False) -> tuple[str, Path, Mirror | None]:  # fmt: skip
    """The study's name and directory: `<out>/<name>`, or for a URI `out` a local staging
    directory mirrored to `<out>/<name>` (holding the study's files for a resume or join)."""
    remote = is_uri(config.out)
    if remote:
        check_remote_out(config)
    else:
        check_out_dir(Path(config.out))
    name = _study_name(config, task, resume=resume, join=join, remote=remote)
    if not remote:
        study_dir = Path(config.out) / name
        started = (study_dir / FILE).is_file()
        check_started(config, name, started=started, resume=resume, join=join,
                      empty=not (study_dir.exists() and any(study_dir.iterdir())))  # fmt: skip
        return name, study_dir, None
    mirror = Mirror(f"{config.out.rstrip('/')}/{name}", staging_dir(name))
    try:
        started = mirror.exists(FILE)
        check_started(config, name, started=started, resume=resume, join=join,
                      empty=mirror.empty())  # fmt: skip
        if started:
            mirror.pull()
    except BaseException:
        shutil.rmtree(mirror.local.parent, ignore_errors=True)
        raise
    return name, mirror.local, mirror


def _study_name(config: SearchConfig, task: Task, *, resume: bool, join: bool,
                remote: bool) -> str:  # fmt: skip
    name = config.study
    if join:
        if resume:
            raise ConfigError("--join and --resume: give one; --join starts or continues the "
                              "study alongside its other drivers")  # fmt: skip
        if name is None:
            raise ConfigError("--join needs --study NAME: the study every driver shares")
    if name is None and resume:
        if remote:
            raise ConfigError(f"--resume with --out '{config.out}' needs --study NAME (the "
                              "study to continue)")  # fmt: skip
        name = latest_study(config.out, config.task)  # the config names the task
        if name is None:
            raise ConfigError(f"--resume: no study of task '{config.task}' in '{config.out}'; "
                              "give --study NAME (and --out DIR) of the study to continue")  # fmt: skip
    return name or default_study_name(task.name)


def check_started(config: SearchConfig, name: str, *, started: bool, resume: bool, join: bool,
                  empty: bool) -> None:  # fmt: skip
    """--resume needs a started study (its run.json); a new study an unused name."""
    where = f"{config.out.rstrip('/')}/{name}"
    if resume and not started:
        raise ConfigError(f"--resume: '{where}' is not a prunesearch study (no run.json); "
                          "check --study and --out")  # fmt: skip
    if not resume and not join and not empty:
        raise ConfigError(f"study '{name}' already exists in '{config.out}'; add --resume to "
                          "continue it or give --study NEW_NAME for a new one")  # fmt: skip


def check_remote_out(config: SearchConfig) -> None:
    """A URI `out` holds the study's files, not its Optuna study: SQLite needs a disk."""
    if config.storage is None:
        raise ConfigError(f"--out '{config.out}' is an object store, where the study's SQLite "
                          "file cannot live; set storage: postgresql://user@host/db (or "
                          "journal:///path/study.log on a disk that outlives the run)")  # fmt: skip
    check_uri(config.out)


def check_resume(study_dir: Path, config: SearchConfig, space: SearchSpace,
                 flag: str = "--resume") -> None:  # fmt: skip
    """The study continued (`flag`: --resume, or --join of a started study) is the one
    this config describes: same task, objective and space; its files read."""
    fix = "start a new study with --study NEW_NAME"
    recorded = read_record(study_dir, needs=("config", "space"), flag=flag, fix=fix)
    task, knobs = recorded.task, (recorded.space or {}).get("knobs")
    if task is None or knobs is None:
        raise damaged(study_dir / FILE, "no task or no knobs recorded", flag=flag, fix=fix)
    if task != config.task:
        raise ConfigError(f"{flag}: study '{study_dir.name}' searched task '{task}', not "
                          f"'{config.task}'; use the study's task or a new --study")  # fmt: skip
    if recorded.directions != config.directions:
        raise ConfigError(f"{flag}: study '{study_dir.name}' was started with objective "
                          f"{recorded.objective} and budget "
                          f"{(recorded.config or {}).get('budget')}; keep them or start a new "
                          "--study")  # fmt: skip
    if knobs != space.to_dict()["knobs"]:
        raise ConfigError(f"{flag}: the search space differs from the one study "
                          f"'{study_dir.name}' was started with; keep its space settings or "
                          "start a new --study")  # fmt: skip
    if config.storage is None:
        check_study_db(study_dir, flag)
    check_parts(study_dir, flag)


def check_study_db(study_dir: Path, flag: str = "--resume") -> None:
    """--resume with the default storage: `study.db` holds this study. Read only, so a
    foreign or damaged file is neither changed nor mistaken for the study."""
    import sqlite3

    path = study_dir / "study.db"
    if not path.is_file():
        raise ConfigError(f"{flag}: '{study_dir}' has no study.db (its Optuna study); it cannot "
                          "be continued: start a new --study")  # fmt: skip
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as db:  # fmt: skip
            names = {name for (name,) in db.execute("SELECT study_name FROM studies")}
    except sqlite3.Error as exc:
        raise ConfigError(f"{flag}: '{path}' is not an Optuna study database ({exc}); it "
                          "cannot be continued: start a new --study") from None  # fmt: skip
    if study_dir.name not in names:
        found = ", ".join(sorted(map(str, names))) or "none"
        raise ConfigError(f"{flag}: '{path}' holds no study '{study_dir.name}' (it holds: "
                          f"{found}); it was copied or renamed: start a new --study")  # fmt: skip


def check_parts(study_dir: Path, flag: str = "--resume") -> None:
    """--resume/--join: every Parquet part reads (prunesearch never leaves a torn one; a
    damaged file came from elsewhere). The Optuna study holds every row, so removing it is safe."""
    import pyarrow.parquet as pq

    for part in sorted((study_dir / "trials").glob("part-*.parquet")):
        try:
            pq.read_metadata(part)
        except FileNotFoundError:  # merged away meanwhile by a live driver's recorder (--join)
            continue
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"{flag}: '{part}' is damaged ({text}); move it out of the "
                              "study and resume: its rows are rebuilt from the Optuna study") from None  # fmt: skip


def check_storage(config: SearchConfig, study: str, *, resume: bool, join: bool = False) -> None:
    """A configured storage: reachable (URL, server, password) and, for a new study, free of
    the name; for --resume, holding it (--join takes either). Checked before Ray starts."""
    if config.storage is None:
        return
    from orchestrator.storage import PASSWORD_ENV, close_storage, open_storage, redact

    shown = redact(config.storage)
    storage = None
    try:
        storage = open_storage(config.storage)
        names = {s.study_name for s in storage.get_all_studies()}
    except Exception as exc:  # driver errors vary (psycopg2, sqlite3, OSError)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        secret = os.environ.get(PASSWORD_ENV)
        text = text.replace(secret, "***") if secret else text
        raise ConfigError(f"storage '{shown}': cannot open it ({text}); check the URL, that the "
                          f"server runs, and {PASSWORD_ENV}") from None  # fmt: skip
    finally:
        if storage is not None:
            close_storage(storage)
    if join:
        return
    if resume and study not in names:
        raise ConfigError(f"--resume: storage '{shown}' has no study '{study}'; check --study")
    if not resume and study in names:
        raise ConfigError(f"study '{study}' already exists in storage '{shown}'; add --resume to "
                          "continue it or give --study NEW_NAME")  # fmt: skip


def check_no_live_driver(config: SearchConfig, study: str, study_dir: Path) -> None:
    """--resume fails the trials a dead driver left running: never those of a live one."""
    from orchestrator.storage import study_storage
    from orchestrator.store import live_driver

    if config.storage is None and not (study_dir / "study.db").is_file():
        return
    beat = live_driver(study_storage(config.storage, study_dir), study)
    if beat is not None:
        ago = time.time() - beat["at"]
        raise ConfigError(f"study '{study}' is being run by another driver (pid {beat['pid']} on "
                          f"{beat['host']}, alive {ago:.0f} s ago); stop it first, or wait a "
                          "minute if it died")  # fmt: skip


def check_devices(config: SearchConfig) -> None:
    """Local runs: refuse GPU settings on a machine without CUDA before anything starts."""
    import torch

    if config.address is not None:
        return  # the cluster's nodes have the GPUs, not necessarily this machine
    wants_gpu = config.workers.gpus(0) > 0 or config.workers.device == "cuda"
    if wants_gpu and not torch.cuda.is_available():
        raise ConfigError("workers.gpus_per_worker/workers.device ask for a GPU but this machine "
                          "has no CUDA device; set gpus_per_worker: 0 and device: auto")  # fmt: skip
    cpus, w = os.cpu_count() or 1, config.workers
    if w.count == "auto" and w.cpus_per_worker > cpus:  # no worker could ever be placed
        raise ConfigError(f"workers.cpus_per_worker={w.cpus_per_worker:g} is more than this "
                          f"machine's {cpus} CPUs; lower it or set workers.count")  # fmt: skip


def prepare(config: SearchConfig, *, resume: bool = False, join: bool = False) -> Prepared:
    """`join`: run the study alongside the other drivers sharing it, starting it if no
    driver has yet (with its run.json: continuing it, checked as a resume is)."""
    check_devices(config)
    task, model, space = build_space(config)
    budget = config.parsed_budget
    check_budget(space, budget)
    study, study_dir, mirror = resolve_study(config, task, resume=resume, join=join)
    try:
        check_storage(config, study, resume=resume, join=join)
        if join and (study_dir / FILE).is_file():
            check_resume(study_dir, config, space, "--join")
            resume = True
        elif resume:
            check_resume(study_dir, config, space)
            check_no_live_driver(config, study, study_dir)
    except ConfigError:
        if mirror is not None:  # nothing of a refused run stays behind
            shutil.rmtree(mirror.local.parent, ignore_errors=True)
        raise
    base = policy_cost(space, Policy.uniform(space, 32, 1.0))
    return Prepared(config=config, task=task, space=space, budget=budget,
                    base_cost=base, study=study, study_dir=study_dir, resume=resume,
                    join=join, mirror=mirror, noise=bits_noise(model, space))  # fmt: skip
