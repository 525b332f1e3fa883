"""Layer types as a registry (issue 13): a layer type the package has never seen becomes
searchable, priced, quantized and sliced through one registered handler. (Finding its
channel coupling is Torch-Pruning's tracing, which knows the torch.nn types only.)"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from orchestrator.compress.plan import plan_groups
from orchestrator.compress.rebuild import Rebuilder
from orchestrator.compress.structured import slice_model
from search_spaces import SpaceConfig, derive_space, profile_model
from search_spaces.cost import file_bytes, policy_cost
from search_spaces.layers import LayerType, register, unregister
from search_spaces.layers.base import rows, set_attrs, uses_per_output_channel
from search_spaces.policy import Policy
from search_spaces.structure import DimSlice, GroupPlan, PruningPlan


class Dense(nn.Module):
    """A user's own fully connected layer (no nn.Linear inside)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_features, self.out_features = cin, cout
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)

    def forward(self, x):
        return x @ self.weight.t()


class DenseType(LayerType):
    types = (Dense,)
    compressible = True
    cut_out = staticmethod(rows("weight"))

    def uses(self, module, output):
        return uses_per_output_channel(output, module.out_features)

    def cut_in(self, module):
        return [("weight", 1, 1)]

    def fix(self, module, old):
        set_attrs(module, out_features=module.weight.shape[0], in_features=module.weight.shape[1])


@pytest.fixture
def dense_type():
    layer = register(DenseType())
    yield layer
    unregister(layer)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Dense(16, 12), nn.ReLU(), Dense(12, 4)).eval()


def test_a_registered_layer_type_is_profiled_searched_and_priced(dense_type):
    model, x = _model(), torch.randn(5, 16)
    space = derive_space(profile_model(model, x), SpaceConfig(preset="none"))
    assert [k.name for k in space.knobs] == ["bits:0", "keep:0", "bits:2", "keep:2"]
    assert [layer.uses for layer in space.profile.layers] == [5, 5]  # one row per example
    float_size = policy_cost(space, Policy.uniform(space, 32)).size_bytes
    assert float_size == file_bytes((16 * 12 + 12 * 4) * 4)
    four = policy_cost(space, Policy.uniform(space, 4)).size_bytes
    assert four == file_bytes((16 * 12 + 12 * 4) // 2 + (12 + 4) * 4)  # codes + a scale per row


def test_a_registered_layer_type_is_quantized_and_cut(dense_type):
    model, x = _model(), torch.randn(5, 16)
    space = derive_space(profile_model(model, x), SpaceConfig(preset="none"))
    rebuilt = Rebuilder(model, space)(Policy.uniform(space, 2))
    assert len(torch.unique(rebuilt[0].weight[0])) <= 4  # 2 bits: four levels a row
    # Torch-Pruning cannot trace an unknown module's coupling: the plan is written out here
    # as tracing would give it, from the handler's own cuts
    index = tuple((c,) for c in range(12))
    group = GroupPlan(name="0", channels=12, members=("0", "2"), order=tuple(range(12)),
                      slices=(DimSlice(key="0.weight", dim=0, index=index),
                              DimSlice(key="2.weight", dim=1, index=index)))  # fmt: skip
    assert dense_type.cut_out(model[0]) == [("weight", 0, 1)]
    small = slice_model(model, PruningPlan(groups=(group,)), {"0": 5})
    assert small[0].out_features == 5 and small[2].in_features == 5
    assert small(x).shape == (5, 4)


def test_torch_pruning_warnings_are_summarized_in_one_line(caplog, recwarn):
    """Tracing a module Torch-Pruning does not know makes it warn ("Unwrapped parameters
    detected"): the user sees one summary line, not the raw warnings."""
    with caplog.at_level(logging.WARNING, logger="prunesearch"):
        plan_groups(_model(), torch.randn(5, 16), layer_names=["0", "2"])
    assert not [w for w in recwarn if "torch_pruning" in w.filename]
    lines = [r.getMessage() for r in caplog.records if "Torch-Pruning warned" in r.getMessage()]
    assert len(lines) == 1 and "Unwrapped parameters detected" in lines[0], lines
