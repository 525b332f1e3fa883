"""Data-free quantization noise: for every bits knob and bits choice, the relative error
energy that quantizing its layers' weights adds, ||W - Q_b(W)||^2 / ||W||^2, with the
quantizer the rebuild uses (per output channel, symmetric).

It prices what the sensitivity phase does not measure well. Probes scored on a few
validation batches cannot resolve the small drops of 3-8 bits, but they do resolve the
large drop of a knob's lowest choice; taking a knob's metric drop as proportional to the
noise it adds (the perturbation view of HAWQ, Dong et al. 2019: drop ~ sensitivity x noise
power; AIMET's per-layer SQNR analysis ranks layers the same way), one sensitivity fitted
per knob carries the measured drops to every choice, and knobs not probed at all take the
typical sensitivity of those that were (orchestrator.proposals.LossModel). Computed once by
the driver from the base weights: no data, no worker.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.compress.quantize import fake_quantize_many
from search_spaces import SearchSpace
from search_spaces.config import FLOAT_BITS

ROWS = 256  # output channels sampled per weight (evenly spaced): the noise of a 4096-row
# layer is estimated to well under 1% from 256 of its rows, at a 16th of the cost


def bits_noise(model: nn.Module, space: SearchSpace) -> dict[str, dict[int, float]]:
    """Per bits knob, its layers' relative quantization noise at each of its choices (0 for
    float)."""
    state = model.state_dict()
    noise = {}
    for knob in space.searchable:
        if knob.kind != "bits":
            continue
        weights = [_sample(state[w.key]) for name in knob.layers
                   for w in space.profile.layer(name).weights]  # fmt: skip
        noise[knob.name] = relative_noise(weights, [int(c) for c in knob.choices])
    return noise


def relative_noise(weights: list[tuple[torch.Tensor, float]], bits: list[int]) -> dict[int, float]:
    """`weights`: (rows, weight of those rows: all rows / sampled rows)."""
    low = sorted(b for b in bits if b < FLOAT_BITS)
    energy, error = 0.0, dict.fromkeys(low, 0.0)
    with torch.no_grad():
        for rows, factor in weights:
            rows = rows.float()
            energy += factor * float(rows.double().square().sum())
            if not low or rows.numel() == 0:
                continue
            for b, q in zip(low, fake_quantize_many(rows, low), strict=True):
                error[b] += factor * float((q - rows).double().square().sum())
    return {b: (error[b] / energy if b in error and energy > 0 else 0.0) for b in bits}


def _sample(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """At most ROWS of its output rows, and how many rows each stands for."""
    rows = weight.detach().reshape(weight.shape[0], -1) if weight.dim() else weight.reshape(1, 1)
    if rows.shape[0] <= ROWS:
        return rows, 1.0
    picked = torch.linspace(0, rows.shape[0] - 1, ROWS).round().long()
    return rows[picked], rows.shape[0] / ROWS
