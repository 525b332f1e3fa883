"""Batches: how inputs reach a model, how they move between devices, top-1 accuracy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from search_spaces.profile import (
    call_model,  # the Task contract's one caller; profiling uses it too
)

Inputs = Any  # a Tensor, a tuple of positional inputs, or a dict of keyword inputs
Batch = tuple[Inputs, Any]


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
