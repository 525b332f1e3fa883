"""Bad input, fuzzed with hypothesis: config files and flags with wrong types, unknown keys,
empty spaces, impossible budgets, unknown tasks, task modules that raise, bad globs, and
damaged or foreign study directories. Whatever is generated: exit code 2, one line on
stderr, no traceback, nothing started (a guard makes reaching Ray a failure), existing
results untouched.

Each example runs `main(argv)` in this process (fast); a few cases also run as real
processes to show that nothing else reaches the terminal. Examples are derandomized so
the suite is repeatable; PRUNESEARCH_FUZZ_EXAMPLES=N runs N per property instead.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orchestrator.budget import BudgetError, parse_budget
from orchestrator.cli import main
from orchestrator.config import SAMPLERS, SearchConfig, make_config
from orchestrator.prepare import build_space
from orchestrator.task import BUILTIN_TASKS
from search_spaces.cost import policy_cost
from search_spaces.policy import Policy

LAYERS = ("features.0", "features.3", "features.7", "classifier.1", "classifier.3")  # digits-cnn
EXAMPLES = int(os.environ.get("PRUNESEARCH_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=not EXAMPLES,
                    database=None, suppress_health_check=list(HealthCheck))  # fmt: skip


pytestmark = pytest.mark.usefixtures("no_search")  # conftest.py


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _fresh(work: Path) -> Path:
    path = work / uuid.uuid4().hex[:10]
    path.mkdir()
    return path


def _files(root: Path) -> dict[str, bytes]:
    """Every result file's bytes (SQLite's own -wal/-shm side files aside)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("study.db-")}  # fmt: skip


def _bad(capsys, argv: list[str], *expected: str, untouched: Path | None = None) -> str:
    before = _files(untouched) if untouched is not None else None
    capsys.readouterr()  # nothing left over from an earlier example
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (argv, captured.err)
    assert len(lines) == 1, (argv, captured.err)
    assert "Traceback" not in captured.err and captured.out == "", (argv, captured)
    assert lines[0].startswith("prunesearch: error: "), lines
    for part in expected:
        assert part in lines[0], (argv, lines[0])
    if untouched is not None:
        assert _files(untouched) == before, "existing results changed"
    return lines[0]


def _run_config(capsys, work: Path, data: dict, *expected: str, flags: tuple = ()) -> str:
    """`prunesearch run CONFIG --out OUT`: refused, and OUT never made."""
    case = _fresh(work)
    config = case / "search.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True))
    out = case / "out"
    line = _bad(capsys, ["run", str(config), "--out", str(out), *flags], *expected)
    assert not out.exists(), list(out.rglob("*"))
    return line


# -- generators ---------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


not_numbers = st.one_of(
    text.filter(lambda s: not _is_number(s)),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.sampled_from("abc"), st.integers(), min_size=1, max_size=2),
)
not_ints = st.one_of(not_numbers, st.booleans(),
                     st.floats(allow_nan=False, allow_infinity=False).filter(
                         lambda f: not f.is_integer()))  # fmt: skip
not_strs = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                     st.lists(st.integers(), min_size=1, max_size=2))  # fmt: skip
not_bools = st.one_of(st.integers(), text, st.floats(allow_nan=False))

# key -> values it can never take (pydantic is strict for these keys)
WRONG_TYPE = {
    "trials": not_ints, "retries": not_ints, "seed": not_ints,
    "workers.count": st.one_of(not_ints.filter(lambda v: v != "auto")),
    "recovery.finetune_steps": not_ints, "recovery.calibration_batches": not_ints,
    "baselines": not_bools, "seeding": not_bools, "repair": not_bools,
    "recovery.bn_recalibration": not_bools,
    "fidelity.enabled": not_bools.filter(lambda v: v != "auto"),
    "timeout": not_numbers, "workers.cpus_per_worker": not_numbers, "recovery.lr": not_numbers,
    "task": not_strs, "study": not_strs, "storage": not_strs,  # out: the --out flag's
    "address": not_strs,
    "sampler": st.one_of(text.filter(lambda s: s not in SAMPLERS), st.integers()),
    "objective": st.one_of(text.filter(lambda s: s not in ("front", "budget")), st.integers()),
    "pruning": text.filter(lambda s: s not in ("auto", "structured", "unstructured", "none")),
    "importance": text.filter(lambda s: s not in ("l1", "l2", "bn_scale")),
    "workers.device": text.filter(lambda s: s not in ("auto", "cpu", "cuda")),
}  # fmt: skip
OUT_OF_RANGE = {
    "trials": st.integers(max_value=0), "retries": st.integers(max_value=-1),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
    "workers.count": st.integers(max_value=0),
    "timeout": st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan)),
    "workers.cpus_per_worker": st.floats(max_value=0, allow_nan=False),
    "workers.gpus_per_worker": st.floats(max_value=-1e-9, allow_nan=False),
    "recovery.lr": st.one_of(st.floats(max_value=0), st.just(math.inf)),
    "recovery.calibration_batches": st.integers(max_value=0),
    "recovery.finetune_steps": st.integers(max_value=-1),
    "fidelity.error_rate": st.one_of(st.floats(max_value=0), st.floats(min_value=1)),
    "fidelity.steps": st.lists(st.one_of(st.floats(max_value=0), st.floats(min_value=1.0001)),
                               min_size=1, max_size=3),
    "fidelity.metric_range": st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False))
    .filter(lambda r: not r[0] < r[1] or not all(map(math.isfinite, r))).map(list),
}  # fmt: skip


def _nested(dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    data = {last: value}
    for parent in reversed(parents):
        data = {parent: data}
    return data


LEVELS = {"": SearchConfig, "workers.": SearchConfig.model_fields["workers"].annotation,
          "recovery.": SearchConfig.model_fields["recovery"].annotation,
          "fidelity.": SearchConfig.model_fields["fidelity"].annotation}  # fmt: skip


@st.composite
def typos(draw) -> tuple[str, str]:
    """(level, key): one edit away from a real key of that level, and not a real key."""
    level = draw(st.sampled_from(sorted(LEVELS)))
    fields = list(LEVELS[level].model_fields)
    key = draw(st.sampled_from([f for f in fields if len(f) >= 4]))
    i = draw(st.integers(0, len(key) - 1))
    letter = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    edit = draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
    typo = {"delete": key[:i] + key[i + 1:], "insert": key[:i] + letter + key[i:],
            "replace": key[:i] + letter + key[i + 1:],
            "swap": key[:i] + key[i + 1:i + 2] + key[i] + key[i + 2:]}[edit]  # fmt: skip
    assume(typo not in fields)
    return level, typo


# -- config files -------------------------------------------------------------------------
@fuzz(40)
@given(data=st.data())
def test_config_keys_of_the_wrong_type_or_range(capsys, work, data):
    table = data.draw(st.sampled_from([WRONG_TYPE, OUT_OF_RANGE]))
    key = data.draw(st.sampled_from(sorted(table)))
    value = data.draw(table[key])
    line = _run_config(capsys, work, _nested(key, value))
    assert f"config key '{key}" in line, line  # the key, or one of its items: 'key[1]'


@fuzz(25)
@given(typo=typos())
def test_unknown_keys_name_the_key_and_the_likely_one(capsys, work, typo):
    level, key = typo
    dotted = f"{level}{key}"
    line = _run_config(capsys, work, _nested(dotted, 1))
    assert f"unknown config key '{dotted}'" in line and "did you mean '" in line, line


@fuzz(10)
@given(key=text.filter(lambda k: k not in SearchConfig.model_fields))
def test_unknown_keys_of_any_text(capsys, work, key):
    _run_config(capsys, work, {key: 1}, "unknown config key")


@fuzz(10)
@given(order=st.permutations(LAYERS), cuts=st.sets(st.integers(1, 4), max_size=4),
       globs=st.booleans())  # fmt: skip
def test_spaces_with_every_layer_skipped_are_empty(capsys, work, order, cuts, globs):
    bounds = [0, *sorted(cuts), len(order)]
    groups = [list(order[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if a < b]
    if globs:  # the same layers by pattern
        groups = [["features.*"], ["classifier.?"]] if len(groups) > 1 else [["*"]]
    rules = [{"layers": g if len(g) > 1 else g[0], "skip": True} for g in groups]
    _run_config(capsys, work, {"space": {"rules": rules}}, "search space is empty")


@pytest.fixture(scope="module")
def smallest():
    _, _, space = build_space(make_config())
    return policy_cost(space, Policy.from_values(space, space.extreme_values("min")))


@fuzz(10)
@given(data=st.data())
def test_budgets_no_model_in_the_space_meets(capsys, work, smallest, data):
    kind, least = data.draw(st.sampled_from([("size", smallest.size_bytes),
                                             ("macs", smallest.macs), ("bops", smallest.bops)]))  # fmt: skip
    limit = data.draw(st.integers(1, least - 1))
    budget = f"{kind}={limit}B" if kind == "size" else f"{kind}={limit}"
    _run_config(capsys, work, {"budget": budget}, f"budget {kind}=", "is below the smallest model")


def _assume_unparsable(budget: str) -> None:
    """A budget that parses is not these tests' case."""
    try:
        parse_budget(budget)
    except BudgetError:
        return
    assume(False)


@fuzz(15)
@given(budget=text)
def test_budgets_that_do_not_parse(capsys, work, budget):
    _assume_unparsable(budget)
    _run_config(capsys, work, {"budget": budget}, "config key 'budget'")


@fuzz(15)
@given(name=st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=16),
       module=st.booleans())  # fmt: skip
def test_unknown_tasks(capsys, work, name, module):
    assume(name not in BUILTIN_TASKS)
    if module:  # a module spec: nothing by this name can be imported
        line = _run_config(capsys, work, {"task": f"nomod_{name}:make_task"}, "importing module")
        assert "ModuleNotFoundError" in line
    else:
        _run_config(capsys, work, {"task": name}, f"unknown task '{name}'")


RAISES = ["RuntimeError", "ValueError", "ImportError", "OSError", "KeyError", "TypeError",
          "AssertionError", "ZeroDivisionError", "MemoryError", "NotImplementedError",
          "SystemExit"]  # fmt: skip


@fuzz(20)
@given(error=st.sampled_from(RAISES), message=st.text(st.characters(blacklist_categories=("Cs",))),
       where=st.sampled_from(["import", "make_task", "returns"]))  # fmt: skip
def test_task_modules_that_raise(capsys, work, error, message, where):
    """User code raising anything (even SystemExit, or a many-line message) is one line."""
    case = _fresh(work)
    name = f"usertask_{uuid.uuid4().hex[:10]}"
    body = {"import": f"raise {error}({message!r})\n",
            "make_task": f"def make_task():\n    raise {error}({message!r})\n",
            "returns": f"def make_task():\n    return {message!r}\n"}[where]  # fmt: skip
    (case / f"{name}.py").write_text(body)
    config = case / "search.yaml"
    config.write_text(f"task: '{name}:make_task'\n")
    try:
        line = _bad(capsys, ["run", str(config), "--out", str(case / "out")], f"'{name}:make_task'")
    finally:
        sys.modules.pop(name, None)
    assert not (case / "out").exists()
    if where == "returns":
        assert "returned str, expected orchestrator.Task" in line


def _matches(pattern: str) -> bool:
    return pattern in ("$first", "$last") or any(fnmatch.fnmatchcase(n, pattern) for n in LAYERS)


@fuzz(15)
@given(patterns=st.lists(text.filter(lambda p: not _matches(p)), min_size=1, max_size=3))
def test_rules_whose_globs_match_no_layer(capsys, work, patterns):
    layers = patterns if len(patterns) > 1 else patterns[0]
    _run_config(capsys, work, {"space": {"rules": [{"layers": layers, "bits": [4]}]}},
                "matches no layer")  # fmt: skip


# -- flags --------------------------------------------------------------------------------


def _is_int(value: str) -> bool:
    try:
        int(value)  # what argparse's type=int takes: " 5", "5_000", "+5", Arabic digits
    except ValueError:
        return False
    return True


plain = text.filter(lambda s: not s.startswith("-"))  # else argparse reads it as an option
not_int_text = plain.filter(lambda s: not _is_int(s))
FLAGS = {
    "--trials": st.one_of(not_int_text.map(lambda s: ("invalid int value", s)),
                          st.integers(max_value=0).map(lambda n: ("config key 'trials'", n))),
    "--workers": st.one_of(not_int_text.map(lambda s: ("invalid int value", s)),
                           st.integers(max_value=0).map(lambda n: ("'workers.count'", n))),
    "--seed": st.one_of(not_int_text.map(lambda s: ("invalid int value", s)),
                        st.integers(max_value=-1).map(lambda n: ("config key 'seed'", n)),
                        st.integers(min_value=2**32).map(lambda n: ("config key 'seed'", n))),
    "--sampler": plain.filter(lambda s: s not in SAMPLERS)
    .map(lambda s: ("config key 'sampler'", s)),
    "--objective": plain.filter(lambda s: s not in ("front", "budget"))
    .map(lambda s: ("config key 'objective'", s)),
    "--study": st.one_of(st.just(""), text.map(lambda s: "." + s), plain.map(lambda s: s + "/x"),
                         plain.map(lambda s: s + "\x00")).map(lambda s: ("config key 'study'", s)),
}  # fmt: skip
OPTIONS = ("--trials", "--workers", "--budget", "--out", "--study", "--seed", "--sampler",
           "--objective", "--resume", "--quiet", "--address", "--help")  # fmt: skip


@fuzz(40)
@given(flag=st.sampled_from(sorted(FLAGS)), data=st.data(), quiet=st.booleans())
def test_flags_with_bad_values(capsys, work, flag, data, quiet):
    expected, value = data.draw(FLAGS[flag])
    out = _fresh(work) / "out"
    argv = ["run", "--out", str(out), flag, str(value), *(["--quiet"] if quiet else [])]
    _bad(capsys, argv, expected)
    assert not out.exists()


@fuzz(15)
@given(name=st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12))
def test_unknown_flags(capsys, work, name):
    flag = f"--{name}"
    assume(not any(option.startswith(flag) for option in OPTIONS))  # argparse takes prefixes
    _bad(capsys, ["run", "--out", str(_fresh(work) / "out"), flag], "unrecognized arguments")


@fuzz(15)
@given(budget=plain)
def test_budget_flags_that_do_not_parse(capsys, work, budget):
    _assume_unparsable(budget)
    _bad(capsys, ["run", "--out", str(_fresh(work) / "out"), "--budget", budget],
         "config key 'budget'")  # fmt: skip


@fuzz(6)
@given(depth=st.integers(0, 2), content=st.binary(max_size=64))
def test_out_below_a_file(capsys, work, depth, content):
    """--out names a file, or a directory under one: refused before anything starts."""
    case = _fresh(work)
    blocker = case / "results"
    blocker.write_bytes(content)
    out = blocker.joinpath(*["sub"] * depth)
    _bad(capsys, ["run", "--out", str(out)], "is a file, not a directory", untouched=case)


# -- damaged and foreign study directories ------------------------------------------------
@pytest.fixture(scope="module")
def study(work) -> Path:
    """A small real study directory (run.json, study.db, Parquet) made without Ray."""
    import optuna

    from orchestrator.prepare import prepare
    from orchestrator.results import ResultSink
    from orchestrator.search import write_run_json

    config = make_config({"out": str(work / "template"), "study": "s", "trials": 4})
    prepared = prepare(config)
    prepared.study_dir.mkdir(parents=True)
    write_run_json(prepared, sampler="random", base_metric=0.98, workers=[])
    storage = f"sqlite:///{prepared.study_dir / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=storage, study_name="s", directions=config.directions)
    sink = ResultSink(prepared.study_dir)
    for trial, size, metric in [(0, 1000, 0.95), (1, 400, 0.9)]:
        sink.add({"study": "s", "trial": trial, "state": "COMPLETE", "metric": metric,
                  "size_bytes": size, "macs": 10, "bops": 20, "feasible": True,
                  "policy_hash": f"h{trial}"})  # fmt: skip
    sink.flush()
    return prepared.study_dir


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def run_json_damage(draw):
    """How run.json is damaged: gone, unreadable, not JSON, not an object, or a key the
    study needs replaced by a value it can never hold."""
    kind = draw(st.sampled_from(["missing", "directory", "not-json", "bytes", "not-object",
                                 "key"]))  # fmt: skip
    if kind == "not-json":
        return kind, draw(text.filter(lambda s: not _parses(s)))
    if kind == "bytes":
        return kind, draw(st.binary(min_size=1, max_size=40).filter(lambda b: not _parses(b)))
    if kind == "not-object":
        return kind, draw(json_values.filter(lambda v: not isinstance(v, dict)))
    if kind == "key":
        key = draw(st.sampled_from(["config", "space", "directions"]))
        value = draw(json_values.filter(lambda v: not isinstance(v, dict) or not v))
        return kind, (key, value)
    return kind, None


def _parses(data) -> bool:
    try:
        json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def _damage_run_json(study_dir: Path, kind: str, arg) -> None:
    path = study_dir / "run.json"
    if kind in ("missing", "directory"):
        path.unlink()
        if kind == "directory":
            path.mkdir()
    elif kind == "not-json":
        path.write_text(arg)
    elif kind == "bytes":
        path.write_bytes(arg)
    elif kind == "not-object":
        path.write_text(json.dumps(arg))
    else:
        data = json.loads(path.read_text())
        key, value = arg
        if value == data.get(key):
            value = None
        data[key] = value
        path.write_text(json.dumps(data))


def _damage_db(study_dir: Path, kind: str, content: bytes) -> None:
    import optuna

    path = study_dir / "study.db"
    path.unlink()
    if kind == "garbage":
        path.write_bytes(content)
    elif kind == "foreign":  # an Optuna study of another name (a copied directory)
        optuna.create_study(storage=f"sqlite:///{path}", study_name="not-s")


def _damage_parts(study_dir: Path, kind: str, content: bytes) -> None:
    part = next((study_dir / "trials").glob("part-*.parquet"))
    if kind == "truncated":
        data = part.read_bytes()
        part.write_bytes(data[: len(data) * len(content) // 65])  # some prefix of it
    else:
        (study_dir / "trials" / "part-999999-foreign.parquet").write_bytes(content)


@fuzz(15)
@given(run_json=st.one_of(st.none(), run_json_damage()),
       db=st.sampled_from([None, "missing", "garbage", "foreign"]),
       parts=st.sampled_from([None, "truncated", "foreign"]),
       content=st.binary(max_size=64))  # fmt: skip
def test_damaged_or_foreign_studies(capsys, work, study, run_json, db, parts, content):
    assume(run_json or db or parts)
    out = _fresh(work)
    study_dir = out / "s"
    shutil.copytree(study, study_dir)
    if run_json:
        _damage_run_json(study_dir, *run_json)
    if db:
        _damage_db(study_dir, db, content)
    if parts:
        _damage_parts(study_dir, parts, content)
    _bad(capsys, ["run", "--out", str(out), "--study", "s", "--resume"], "--resume",
         untouched=out)  # fmt: skip
    # reading commands refuse it too, or (study.db aside) read it: never a traceback
    before = _files(out)
    code = main(["front", str(study_dir)])
    captured = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in captured.err, captured
    assert code == 0 or len(captured.err.strip().splitlines()) == 1, captured.err
    if parts or (run_json and run_json[0] != "key"):  # what `front` itself reads
        assert code == 2, captured.out
    assert _files(out) == before


# -- real processes -----------------------------------------------------------------------
def test_bad_input_in_a_real_process_is_one_line(tmp_path, study):
    """What a user sees: only the one line (no library warning, no traceback), code 2."""
    (tmp_path / "exits.py").write_text("import sys\nsys.exit('usage: train.py [-h]')\n")
    (tmp_path / "exits.yaml").write_text("task: 'exits:make_task'\n")
    (tmp_path / "results").write_text("not a directory")
    damaged = tmp_path / "damaged"
    shutil.copytree(study, damaged / "s")
    (damaged / "s" / "study.db").write_bytes(b"SQLite format 3\x00 but not really")
    cases = [
        (["run", "exits.yaml", "--out", "o1"], "loading it called sys.exit('usage: train.py"),
        (["run", "--out", "results/x"], "is a file, not a directory"),
        (["run", "--out", str(damaged), "--study", "s", "--resume"], "not an Optuna study"),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *argv], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for argv, _ in cases]  # fmt: skip
    for proc, (argv, expected) in zip(procs, cases, strict=True):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, err)
        assert out == ""
    assert not (tmp_path / "o1").exists()
