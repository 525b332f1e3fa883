"""Batches: how inputs reach a model, how they move between devices, top-1 accuracy."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

Inputs = Any  # a Tensor, a tuple of positional inputs, or a dict of keyword inputs
Batch = tuple[Inputs, Any]

# How each kind of inputs is passed to the model (Task contract).
_CALLERS: dict[type, Callable[[nn.Module, Any], Any]] = {
    tuple: lambda model, x: model(*x),
    list: lambda model, x: model(*x),
    dict: lambda model, x: model(**x),
}


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """`model(x)`, `model(*x)` or `model(**x)` by the kind of inputs."""
    for kind, caller in _CALLERS.items():
        if isinstance(inputs, kind):
            return caller(model, inputs)
    return model(inputs)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move every tensor inside tuples, lists and dicts to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output (first element of tuples, `logits` of dicts)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"]
    return output[0]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Top-1 accuracy over `batches`; the default Task metric."""
    correct = total = 0
    for inputs, targets in batches:
        predicted = logits_of(call_model(model, inputs)).argmax(dim=-1)
        correct += int((predicted == targets).sum())
        total += int(targets.numel())
    return correct / max(total, 1)
