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


# built-in name -> its `module:function` spec, imported by name like a user's task (so
# this module imports no task module, and a task module may import Task from here)
_BUILTIN_SPECS = {"digits-cnn": "orchestrator.tasks.digits:digits_cnn",
                  "digits-resnet": "orchestrator.tasks.digits:digits_resnet",
                  "digits-lstm": "orchestrator.tasks.digits:digits_lstm"}  # fmt: skip
BUILTIN_TASKS = tuple(_BUILTIN_SPECS)


def resolve_task(spec: str) -> Task:
    """The Task for a built-in name (`digits-cnn`) or a `pkg.module:function` spec.

    Raises ConfigError naming the problem and the fix.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("config key 'task' must be a built-in task name or 'pkg.module:function'")
    if ":" not in spec:
        if spec not in _BUILTIN_SPECS:
            raise ConfigError(
                f"unknown task '{spec}' (key 'task'){did_you_mean(spec, _BUILTIN_SPECS)}; built-in "
                f"tasks are {', '.join(sorted(_BUILTIN_SPECS))}, or give 'pkg.module:function' "
                "returning a Task"
            )
        return _import_task(_BUILTIN_SPECS[spec])
    return _import_task(spec)


def _import_task(spec: str) -> Task:
    from orchestrator.thirdparty import prepare_torchvision

    prepare_torchvision()  # a task importing torchvision or transformers imports beside any torch
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
