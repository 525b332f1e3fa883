"""Built-in tasks: reproducible training, safe cached loading, the Task contract."""

from __future__ import annotations

import pytest
import torch

from orchestrator import Task, resolve_task
from orchestrator.batches import accuracy, call_model
from orchestrator.errors import ConfigError
from orchestrator.tasks import digits


def test_training_is_reproducible_and_cached(tmp_path, monkeypatch):
    states = []
    for run in ("a", "b"):
        monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path / run))
        torch.manual_seed(1234 if run == "a" else 99)  # the caller's RNG state must not matter
        model = resolve_task("digits-lstm").model()
        states.append(model.state_dict())
        assert (tmp_path / run / f"digits-lstm-v{digits.CACHE_VERSION}.pt").is_file()
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    # a second use loads the cache instead of training: same weights, no new file
    again = resolve_task("digits-lstm").model()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in states[1].items())


def test_damaged_cache_is_retrained_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNESEARCH_CACHE", str(tmp_path))
    path = tmp_path / f"digits-lstm-v{digits.CACHE_VERSION}.pt"
    path.write_bytes(b"not a checkpoint")
    task = resolve_task("digits-lstm")
    assert accuracy(task.model(), task.validation()) > 0.9
    assert torch.load(path, weights_only=True)  # replaced by a real checkpoint


@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet", "digits-lstm"])
def test_builtin_tasks_follow_the_contract(name):
    task = resolve_task(name)
    assert isinstance(task, Task) and task.name == name
    model = task.model()
    validation = list(task.validation())
    for (x1, y1), (x2, y2) in zip(validation, task.validation(), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # deterministic order
    assert sum(len(t) for _, t in validation) == digits.N_VALIDATION
    assert accuracy(model, validation) > 0.95
    out = call_model(model, task.example_inputs())
    assert out.shape == (1, 10)
    assert task.train is not None and len(list(task.train())) > 0


def test_task_specs_resolve_or_explain(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "good_task.py").write_text(
        "from orchestrator.tasks.digits import digits_lstm\n"
        "def make_task():\n    return digits_lstm()\n"
        "def not_a_task():\n    return 42\n"
    )
    assert resolve_task("good_task:make_task").name == "digits-lstm"
    with pytest.raises(ConfigError, match="expected orchestrator.Task"):
        resolve_task("good_task:not_a_task")
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        resolve_task("good_task:missing")
    with pytest.raises(ConfigError, match="did you mean 'digits-cnn'"):
        resolve_task("digits-cn")
