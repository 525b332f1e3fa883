"""A user-style Task plugin: `task: "custom_task:make_task"` (run from this directory) or
`task: "examples.custom_task:make_task"` (run from the repository root).

Any model, data and metric work the same way: return an `orchestrator.Task` whose fields
are zero-argument callables; each worker calls them once.
"""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn

from orchestrator import Task


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    return x, y


@functools.lru_cache(maxsize=1)
def _trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # full-batch: well under a second on a laptop
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        optimizer.step()
    return model.eval()


def _batches(start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    return [(x[i : min(i + 100, stop)], y[i : min(i + 100, stop)]) for i in range(start, stop, 100)]


def balanced_accuracy(model: nn.Module, batches) -> float:
    """A custom metric (higher is better): mean per-class recall."""
    hits, counts = torch.zeros(10), torch.zeros(10)
    with torch.no_grad():
        for x, y in batches:
            pred = model(x).argmax(-1)
            counts += torch.bincount(y, minlength=10)
            hits += torch.bincount(y[pred == y], minlength=10)
    return float((hits / counts.clamp(min=1)).mean())


def make_task() -> Task:
    return Task(
        name="digits-mlp",
        model=lambda: _trained_mlp(),
        example_inputs=lambda: _data()[0][:1],
        calibration=lambda: _batches(0, 400),
        validation=lambda: _batches(1400, 1797),
        metric=balanced_accuracy,
    )
