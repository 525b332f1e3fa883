"""Structured rebuild: slice a model's tensors along a pruning plan, giving a plain,
physically smaller nn.Module (no masks, no hooks) that runs on CPU and GPU alike.

Per candidate only tensors are sliced (index_select on the base tensors) and the module
tree is copied with the sliced tensors substituted (`copy.deepcopy` memo), so no tracing
and no dependency graph happen per candidate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from search_spaces.structure import PruningPlan, dropped_indices


def _fix_conv(m: nn.Module, old: dict) -> None:
    if old["groups"] > 1 and old["groups"] == old["in_channels"] == old["out_channels"]:
        m.groups = m.in_channels = m.out_channels = m.weight.shape[0]  # depthwise stays so
        return
    m.out_channels = m.weight.shape[0]
    m.in_channels = m.weight.shape[1] * m.groups


def _fix_linear(m: nn.Module, old: dict) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_norm(m: nn.Module, old: dict) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    m.num_features = ref.shape[0]


def _fix_layer_norm(m: nn.Module, old: dict) -> None:
    m.normalized_shape = (m.weight.shape[0],)


def _fix_rnn(m: nn.Module, old: dict) -> None:
    m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()


_ATTRS = ("groups", "in_channels", "out_channels")
FIXERS: dict[type, Callable[[nn.Module, dict], None]] = {
    nn.Conv1d: _fix_conv, nn.Conv2d: _fix_conv, nn.Conv3d: _fix_conv, nn.Linear: _fix_linear,
    nn.BatchNorm1d: _fix_norm, nn.BatchNorm2d: _fix_norm, nn.BatchNorm3d: _fix_norm,
    nn.LayerNorm: _fix_layer_norm, nn.LSTM: _fix_rnn, nn.GRU: _fix_rnn,
}  # fmt: skip


def slice_model(base: nn.Module, plan: PruningPlan, counts: Mapping[str, int]) -> nn.Module:
    """A copy of `base` keeping `counts[group]` channels of each group (most important)."""
    dropped = dropped_indices(plan, counts)
    if not dropped:
        return copy.deepcopy(base)
    by_key: dict[str, list[tuple[int, set[int]]]] = {}
    for (key, dim), cut in dropped.items():
        by_key.setdefault(key, []).append((dim, cut))
    memo: dict[int, object] = {}
    touched: set[str] = set()
    tensors = dict(base.named_parameters())
    tensors.update(base.named_buffers())
    with torch.no_grad():
        for key, cuts in by_key.items():
            tensor = tensors[key]
            new = tensor.detach()
            for dim, cut in cuts:
                keep = [i for i in range(new.shape[dim]) if i not in cut]
                new = new.index_select(dim, torch.tensor(keep, device=new.device))
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new.clone(), requires_grad=tensor.requires_grad)
            memo[id(tensor)] = new
            touched.add(key.rpartition(".")[0])
    old = {n: {a: getattr(m, a, None) for a in _ATTRS} for n, m in base.named_modules()}
    model = copy.deepcopy(base, memo)
    for name, module in model.named_modules():
        fixer = FIXERS.get(type(module))
        if fixer is not None and name in touched:
            fixer(module, old[name])
    for group in plan.groups:  # counts a module keeps itself, e.g. attention's num_heads
        if group.count_attr:
            owner, _, attr = group.count_attr.rpartition(".")
            setattr(model.get_submodule(owner), attr, counts.get(group.name, group.channels))
    return model
