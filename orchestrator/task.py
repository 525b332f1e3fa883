"""The Task contract and how a task spec (built-in name or `pkg.module:function`) resolves."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from orchestrator.batches import Batch, Inputs, accuracy
from orchestrator.errors import ConfigError, did_you_mean


@dataclass(frozen=True, kw_only=True)
class Task:
    """What is compressed and how it is scored.

    Every field but `name` and `metric` is a zero-argument callable, so a Task is cheap to
    build and each worker loads the model and data itself, once.

    `example_inputs` should be one sample (a batch of one): `macs` and `bops` are counted
    for one forward pass over it.
    """

    name: str
    model: Callable[[], nn.Module]
    example_inputs: Callable[[], Inputs]
    calibration: Callable[[], Iterable[Batch]]
    validation: Callable[[], Iterable[Batch]]
    metric: Callable[[nn.Module, Iterable[Batch]], float] = accuracy
    train: Callable[[], Iterable[Batch]] | None = None
    # recovery fine-tuning's loss on (model output, targets); default cross-entropy
    loss: Callable[[Any, Any], Any] = nn.functional.cross_entropy


def _builtin_tasks() -> dict[str, Callable[[], Task]]:
    from orchestrator.tasks import digits

    return dict(digits.TASKS)


BUILTIN_TASKS = ("digits-cnn", "digits-resnet", "digits-lstm")


def resolve_task(spec: str) -> Task:
    """The Task for a built-in name (`digits-cnn`) or a `pkg.module:function` spec.

    Raises ConfigError naming the problem and the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("config key 'task' must be a built-in task name or 'pkg.module:function'")
    if ":" not in spec:
        builtins = _builtin_tasks()
        if spec not in builtins:
            raise ConfigError(
                f"unknown task '{spec}' (key 'task'){did_you_mean(spec, builtins)}; built-in tasks "
                f"are {', '.join(sorted(builtins))}, or give 'pkg.module:function' returning a Task"
            )
        return builtins[spec]()
    return _import_task(spec)


def _import_task(spec: str) -> Task:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error in user code is the user's to see, in one line
        raise ConfigError(
            f"task '{spec}': importing module '{module_name}' failed with "
            f"{type(exc).__name__}: {exc}; check that it is importable from this directory"
        ) from exc
    factory: Any = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"task '{spec}': module '{module_name}' has no function '{attr}'")
    try:
        task = factory()
    except Exception as exc:
        raise ConfigError(f"task '{spec}': {attr}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise ConfigError(
            f"task '{spec}': {attr}() returned {type(task).__name__}, expected orchestrator.Task"
        )
    return task
