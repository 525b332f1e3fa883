"""A toy third knob kind for tests/test_kinds.py, registered when this module is imported
(the driver imports it through its task spec, and so does every worker): `flip` on the
model's last layer, 1 negating the logits. No other module knows of it."""

from __future__ import annotations

from torch import nn

from orchestrator.tasks.digits import digits_cnn
from search_spaces.kinds import KnobKind, Targets, register


class _Flipped(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return -self.model(*args, **kwargs)


class Flip(KnobKind):
    name = "flip"
    reference = 0
    default_choices = (0, 1)

    def targets(self, where: Targets) -> list[tuple[str, int]]:
        return [(where.active[-1], 1)]

    def apply(self, model, space, knob, value):
        return _Flipped(model) if value else model

    def prior_loss(self, value) -> float:
        return float(value)


FLIP = register(Flip())


def task():
    return digits_cnn()
