"""`prunesearch` on bad input: exit code 2, one line on stderr, no traceback, nothing created.

Everything runs in-process through `main(argv)`; no case may get as far as starting Ray
(a guard makes that a test failure rather than a search).
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import make_config
from orchestrator.prepare import build_space
from search_spaces.cost import policy_cost
from search_spaces.policy import Policy

# the default (structured) space: the logits layer's outputs are never cut
CNN_KNOBS = [f"{kind}:{layer}" for layer in ("features.0", "features.3", "features.7",
             "classifier.1", "classifier.3") for kind in ("bits", "keep")
             if f"{kind}:{layer}" != "keep:classifier.3"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("no_search")  # conftest.py


def _bad(capsys, argv: list[str], out: Path | None = None, *expected: str) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert lines[0].startswith("prunesearch: error: ")
    for part in expected:
        assert part in lines[0], lines[0]
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    return lines[0]


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "flags", "expected"),
    [
        pytest.param("trails: 5\n", [], ["unknown config key 'trails'", "did you mean 'trials'"],
                     id="unknown-key"),
        pytest.param("workers:\n  cout: 2\n", [],
                     ["'workers.cout'", "did you mean 'workers.count'"], id="unknown-nested-key"),
        pytest.param("my-key: 1\n", [], ["unknown config key 'my-key'"], id="unknown-dashed-key"),
        pytest.param("trials: many\n", [], ["config key 'trials'", "'many'"], id="wrong-type"),
        pytest.param("space:\n  bits: [1, 4]\n", [], ["config key 'space.bits'"],
                     id="bits-out-of-range"),
        pytest.param("space:\n  rules:\n    - layers: '*'\n      skip: true\n", [],
                     ["search space is empty"], id="empty-space"),
        pytest.param("space:\n  rules:\n    - layers: conv9\n      bits: [4]\n", [],
                     ["conv9", "matches no layer", "features.0"], id="rule-matches-nothing"),
        pytest.param("task: digits-cnnn\n", [],
                     ["unknown task 'digits-cnnn'", "did you mean 'digits-cnn'"],
                     id="unknown-task"),
        pytest.param("task: digits-lstm\n", ["--budget", "size=100B"],
                     ["budget size=100 B is below the smallest model"], id="budget-too-small"),
        pytest.param("", ["--budget", "macs=10"], ["budget macs=10 is below the smallest model"],
                     id="macs-budget-too-small"),
        pytest.param("", ["--budget", "size=3XB"], ["config key 'budget'", "size=3XB"],
                     id="budget-unit"),
        pytest.param("", ["--trials", "abc"], ["--trials", "invalid int value: 'abc'"],
                     id="trials-not-a-number"),
        pytest.param("", ["--trials", "0"], ["config key 'trials'"], id="trials-zero"),
        pytest.param("", ["--workers", "0"], ["config key 'workers.count'"], id="workers-zero"),
        pytest.param("", ["--sampler", "cmaes"], ["config key 'sampler'"], id="sampler"),
        pytest.param("", ["--bogus"], ["unrecognized arguments: --bogus"], id="unknown-flag"),
        pytest.param("trials: [1, 2\n", [], ["not valid YAML"], id="invalid-yaml"),
        pytest.param("- a\n- b\n", [], ["must hold a mapping"], id="yaml-not-a-mapping"),
    ],
)  # fmt: skip
def test_run_with_bad_input(capsys, tmp_path, text, flags, expected):
    out = tmp_path / "out"
    _bad(capsys, ["run", _yaml(tmp_path, text), "--out", str(out), *flags], out, *expected)


def test_run_with_a_missing_config_file(capsys, tmp_path):
    out = tmp_path / "out"
    _bad(capsys, ["run", str(tmp_path / "nope.yaml"), "--out", str(out)], out,
         "nope.yaml", "does not exist")  # fmt: skip


def test_unknown_verb(capsys):
    _bad(capsys, ["frnt"], None, "invalid choice: 'frnt'")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        # without CONFIG, --resume reads the study's recorded config: there is none
        (["--study", "nope"], ["--resume", "nope", "no prunesearch study"]),
        ([], ["--resume: no prunesearch study in", "check --study and --out"]),
    ],
)
def test_resume_of_a_study_that_does_not_exist(capsys, tmp_path, flags, expected):
    out = tmp_path / "out"
    _bad(capsys, ["run", "--out", str(out), "--resume", *flags], out, *expected)


def test_front_on_a_directory_that_is_not_a_study(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _bad(capsys, ["front", str(tmp_path)], None, "not a prunesearch study directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- user task modules


def _module(tmp_path: Path, body: str) -> str:
    name = f"usertask_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(body)
    return name


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("raise RuntimeError('no GPU driver here')\n",
         ["importing module", "RuntimeError: no GPU driver here"]),
        ("import not_a_module_anywhere_xyz\n", ["ModuleNotFoundError", "not_a_module_anywhere_xyz"]),
        ("def make_task(:\n", ["importing module", "SyntaxError"]),
        ("def make_task():\n    raise ValueError('dataset path unset')\n",
         ["make_task() raised ValueError: dataset path unset"]),
        ("make_task = 3\n", ["has no function 'make_task'"]),
        ("def other():\n    pass\n", ["has no function 'make_task'"]),
        ("def make_task():\n    return 'a task'\n", ["returned str, expected orchestrator.Task"]),
    ],
)  # fmt: skip
def test_task_module_that_fails(capsys, tmp_path, monkeypatch, body, expected):
    monkeypatch.chdir(tmp_path)
    name = _module(tmp_path, body)
    try:
        cfg = _yaml(tmp_path, f'task: "{name}:make_task"\n')
        _bad(capsys, ["run", cfg, "--out", "out"], tmp_path / "out", f"'{name}:make_task'",
             *expected)  # fmt: skip
    finally:
        sys.modules.pop(name, None)


def test_task_module_error_with_a_multiline_message_is_still_one_line(capsys, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """User code may raise with several lines (a pydantic error, a subprocess's stderr)."""
    monkeypatch.chdir(tmp_path)
    name = _module(tmp_path, "raise RuntimeError('first line\\nsecond line\\nthird')\n")
    try:
        _bad(capsys, ["run", _yaml(tmp_path, f'task: "{name}:make_task"\n'), "--out", "out"],
             tmp_path / "out", "RuntimeError: first line")  # fmt: skip
    finally:
        sys.modules.pop(name, None)


# ---------------------------------------------------------------- eval / space


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("uniform:x", ["--policy", "uniform:BITS"]),
        ("uniform:1", ["--policy", "not supported"]),
        ("missing.json", ["--policy 'missing.json'", "cannot read it"]),
    ],
)
def test_eval_with_a_bad_policy(capsys, tmp_path, monkeypatch, policy, expected):
    monkeypatch.chdir(tmp_path)
    _bad(capsys, ["eval", "--policy", policy], None, *expected)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("{not json", ["--policy", "not valid JSON"], id="not-json"),
        pytest.param('{"bits:features.0": 4}', ["--policy", "no value for knob"], id="missing"),
        pytest.param(
            '{"bits:featurez.0": 4}',
            ["--policy", "unknown knob 'bits:featurez.0'"],
            id="unknown-knob",
        ),  # fmt: skip
        pytest.param('{"bits:features.0": NaN}', ["--policy", "bits:features.0"], id="nan-bits"),
    ],
)
def test_eval_with_a_bad_policy_file(capsys, tmp_path, content, expected):
    path = tmp_path / "policy.json"
    if "NaN" in content:  # every other knob valid: only the NaN is wrong
        values = {k: (8 if k.startswith("bits") else 1.0) for k in CNN_KNOBS}
        content = json.dumps(values).replace('"bits:features.0": 8', '"bits:features.0": NaN')
    path.write_text(content)
    _bad(capsys, ["eval", "--policy", str(path)], None, *expected)


def test_eval_needs_a_policy(capsys):
    _bad(capsys, ["eval"], None, "--policy")


def test_space_with_a_bad_config(capsys, tmp_path):
    _bad(capsys, ["space", _yaml(tmp_path, "space:\n  preset: transformer\n")], None,
         "unknown preset 'transformer'")  # fmt: skip


def test_space_prints_every_knob(capsys):
    assert main(["space"]) == 0
    out = capsys.readouterr().out
    for knob in CNN_KNOBS:
        assert knob in out
    assert "9 searchable knobs" in out
    assert "not pruned: group of classifier.3: cutting it changes the model's output shape" in out


def test_space_lists_skipped_layers(capsys, tmp_path):
    cfg = _yaml(tmp_path, "task: digits-lstm\nspace:\n  rules:\n    - layers: head\n"
                "      skip: true\n")  # fmt: skip
    assert main(["space", cfg]) == 0
    out = capsys.readouterr().out
    assert "bits:lstm" in out
    assert "bits:head" not in out and "skipped head" in out
    # the LSTM's hidden units feed head: cutting them would change a skipped layer
    assert "keep:lstm" not in out and "touches skipped layer head" in out


def test_eval_prints_one_json_object(capsys):
    assert main(["eval", "--policy", "uniform:8", "--json"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert {"metric", "size_bytes", "macs", "bops"} <= set(report)
    _, _, space = build_space(make_config())
    policy = Policy.uniform(space, 8)
    assert report == {**policy_cost(space, policy).as_dict(), "metric": report["metric"],
                      "policy_hash": policy.hash}  # fmt: skip
    assert 0.8 <= report["metric"] <= 1.0  # 8 bits barely hurts the digits CNN


def test_front_of_a_study(capsys, tmp_path):
    from orchestrator.results import ResultSink

    study = tmp_path / "s"
    sink = ResultSink(study)
    for trial, size, metric in [(0, 1000, 0.95), (1, 400, 0.9), (2, 500, 0.5)]:
        sink.add({"study": "s", "trial": trial, "state": "COMPLETE", "metric": metric,
                  "size_bytes": size, "macs": 10, "bops": 20, "feasible": True,
                  "policy_hash": f"h{trial}"})  # fmt: skip
    sink.flush()
    (study / "run.json").write_text(json.dumps({"base": {"size_bytes": 2000, "metric": 0.96}}))
    assert main(["front", str(study)]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]  # after header and rule
    assert [r.split()[0] for r in rows] == ["1", "0"]  # trial 2 is dominated by trial 1
    assert "5.0x" in rows[0] and "-0.0600" in rows[0]


@pytest.mark.parametrize("verb", ["run", "eval"])
def test_finetune_steps_on_a_task_without_train_batches(capsys, tmp_path, monkeypatch, verb):
    monkeypatch.chdir(tmp_path)
    name = _module(tmp_path, "import dataclasses\nfrom orchestrator.tasks.digits import digits_cnn\n"
                             "def make_task():\n    return dataclasses.replace(digits_cnn(), "
                             "train=None)\n")  # fmt: skip
    try:
        cfg = _yaml(tmp_path, f'task: "{name}:make_task"\nrecovery:\n  finetune_steps: 5\n')
        extra = ["--policy", "uniform:4"] if verb == "eval" else ["--out", "out"]
        _bad(capsys, [verb, cfg, *extra], tmp_path / "out", "recovery.finetune_steps: 5",
             "has none", "finetune_steps: 0")  # fmt: skip
    finally:
        sys.modules.pop(name, None)


def test_a_command_leaves_sys_path_and_torch_threads_as_it_found_them(capsys, tmp_path):
    import torch

    cfg = _yaml(tmp_path, "task: digits-cnn\nworkers:\n  cpus_per_worker: 1\n")
    path, threads = list(sys.path), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["eval", cfg, "--policy", "uniform:4", "--json"]) == 0
        assert sys.path == path and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()


def test_space_says_why_pruning_auto_fell_back_to_unstructured(capsys, tmp_path, monkeypatch):
    """A model none of whose groups can be cut: `space` names every group's reason."""
    monkeypatch.chdir(tmp_path)
    name = _module(tmp_path, """
import torch
from torch import nn
from orchestrator import Task

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8, proj_size=4, batch_first=True)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])

def make_task():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5, 8), torch.randint(0, 4, (32,))
    return Task(name="lstm2", model=lambda: Net().eval(), example_inputs=lambda: x[:2],
                calibration=lambda: [(x, y)], validation=lambda: [(x, y)])
""")  # fmt: skip
    try:
        assert main(["space", _yaml(tmp_path, f'task: "{name}:make_task"\n')]) == 0
    finally:
        sys.modules.pop(name, None)
    out = capsys.readouterr().out
    assert "pruning: unstructured" in out and "keep:rnn" in out  # masks, per layer
    assert "not pruned: group of rnn: member rnn: LSTM with proj_size is not sliced" in out
    assert "not pruned: group of head: cutting it changes the model's output shape" in out
