"""Planning structured pruning: which channels must be cut together, found once per
model by the driver (prepare) and kept as plain data (search_spaces.structure).

Torch-Pruning's DependencyGraph finds which channels must be cut together (a conv with
its BatchNorm and every consumer's inputs, all members of a residual sum, depthwise
convs with their producer, flatten -> Linear, concatenation offsets, LSTM hidden units).
We use it for that coupling only: the plan is turned into plain data and our own slicer
(compress/structured.py) rebuilds models from it, so a worker never traces and the cost
model never builds a model.

Every group is tried once at planning (cut to half its channels, run the example
inputs): a group whose rebuilt model fails or changes the output shape is left out of
the space with the reason, as is one that touches a module type we cannot slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from orchestrator.batches import call_model
from orchestrator.compress.structured import slice_model
from search_spaces.layers import LAYERS, layer_type
from search_spaces.structure import DimSlice, GroupPlan, PruningPlan

_BN = nn.modules.batchnorm._BatchNorm
LOG = logging.getLogger("prunesearch")


# what cutting a module's output or input channels touches: its layer type says
# (search_spaces/layers); the roots of groups are the compressible types
ROOTS = tuple(t for t, layer in LAYERS.items() if layer.compressible)


# -- planning -----------------------------------------------------------------------


@contextlib.contextmanager
def _gru_traced_as_lstm():
    """Torch-Pruning traces LSTM outputs (a tuple) specially but not GRU's, and its
    generic path fails on GRU's output; both expose input and hidden channels the same
    way, so while the graph is built a GRU is typed as an LSTM. Only channel counts are
    read from its pruner; our own handlers slice the tensors (3 gates, not 4)."""
    import torch_pruning as tp

    saved = tp.ops.TORCH_LSTM
    tp.ops.TORCH_LSTM = (nn.LSTM, nn.GRU)
    try:
        yield
    finally:
        tp.ops.TORCH_LSTM = saved


def _handler_role(dep: Any) -> str:
    return "out" if "out" in getattr(dep.handler, "__name__", str(dep.handler)) else "in"


def _member_slices(module: nn.Module, name: str, role: str, per_channel: dict[int, list[int]],
                   channels: int) -> list[DimSlice]:  # fmt: skip
    layer = layer_type(module)
    cuts = (
        None if layer is None else layer.cut_out(module) if role == "out" else layer.cut_in(module)
    )
    if cuts is None:
        raise _Unsliceable(f"member {name or 'model'} ({type(module).__name__}) cannot be sliced")
    prefix = f"{name}." if name else ""
    slices = []
    for tensor, dim, gates in cuts:
        size = getattr(module, tensor).shape[dim]
        step = size // gates
        index = tuple(
            tuple(g * step + i for g in range(gates) for i in per_channel[c])
            for c in range(channels)
        )
        slices.append(DimSlice(key=prefix + tensor, dim=dim, index=index))
    return slices


class _Unsliceable(Exception):
    pass


def _group_plan(group: Any, names: dict[nn.Module, str], root_name: str) -> GroupPlan:
    root_channels = None
    slices: list[DimSlice] = []
    members: list[str] = []
    for item in group:
        dep = item.dep
        module = dep.target.module
        if not isinstance(module, nn.Module) or module not in names:
            continue  # element-wise, reshape, concat nodes: no tensors of their own
        name = names[module]
        layer = layer_type(module)
        reason = layer.unsupported(module) if layer is not None else None
        if reason:
            raise _Unsliceable(f"member {name}: {reason}")
        per_channel: dict[int, list[int]] = {}
        for idx, root in zip(item.idxs, item.root_idxs, strict=True):
            per_channel.setdefault(int(root), []).append(int(idx))
        channels = len(per_channel)
        root_channels = root_channels or channels
        if channels != root_channels or len({len(v) for v in per_channel.values()}) != 1:
            raise _Unsliceable(f"member {name} maps channels unevenly")
        per_channel = {c: sorted(v) for c, v in per_channel.items()}
        slices += _member_slices(module, name, _handler_role(dep), per_channel, channels)
        members.append(name)
    keys = [(s.key, s.dim) for s in slices]
    if len(keys) != len(set(keys)):
        slices = list({(s.key, s.dim): s for s in slices}.values())  # a node listed twice
    return GroupPlan(name=root_name, channels=root_channels or 0, members=tuple(dict.fromkeys(members)),
                     order=(), slices=tuple(slices))  # fmt: skip


def plan_groups(model: nn.Module, example_inputs: Any, *, layer_names: list[str],
                importance: str = "l1") -> PruningPlan:  # fmt: skip
    """The coupling groups of `model` rooted at its compressible layers, with importance
    order. Torch-Pruning's warnings (about its own defaults, which our handlers replace)
    are summarized in one logged line, not printed raw."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = _plan_groups(model, example_inputs, layer_names=layer_names, importance=importance)
    _summarize(caught)
    return plan


def _summarize(caught: list[warnings.WarningMessage]) -> None:
    """Torch-Pruning's warnings as one line (count and the first's first line); any other
    warning passes through as it was."""
    ours = [w for w in caught if "torch_pruning" in w.filename]
    for w in caught:
        if w not in ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if ours:
        first = str(ours[0].message).splitlines()[0]
        LOG.warning(
            "planning: Torch-Pruning warned %d time(s) while tracing (first: %s)", len(ours), first
        )


def _plan_groups(model: nn.Module, example_inputs: Any, *, layer_names: list[str],
                 importance: str) -> PruningPlan:  # fmt: skip
    import torch_pruning as tp

    model = model.eval()
    names = {m: n for n, m in model.named_modules()}
    excluded: dict[str, str] = {}
    modules = dict(model.named_modules())
    with _gru_traced_as_lstm():
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, forward_fn=call_model
        )
        traced = list(_groups(graph, ROOTS, names, excluded))
    groups, claimed = [], set()
    with torch.no_grad():
        reference = _output_shapes(call_model(model, example_inputs))
    candidates = [(g.name, g) for g in _head_groups(model)] + traced
    for root_name, group in candidates:
        if root_name not in layer_names:
            continue
        if any(g.name == root_name for g in groups):
            continue  # an attention-head group already cuts this layer's outputs
        try:
            plan = group if isinstance(group, GroupPlan) else _group_plan(group, names, root_name)
            owned = {(s.key, s.dim, i) for s in plan.slices for idx in s.index for i in idx}
            if owned & claimed:
                raise _Unsliceable(f"{sorted(owned & claimed)[0][0]} is cut by another group too")
            _try_group(model, plan, example_inputs, reference)
        except _Unsliceable as exc:
            excluded[root_name] = str(exc)
            continue
        except Exception as exc:  # the trial rebuild failed: left out, with why
            excluded[root_name] = f"rebuilt model failed: {type(exc).__name__}: {exc}"
            continue
        claimed |= owned
        excluded.pop(root_name, None)
        order = channel_order(model.state_dict(), plan, importance, modules)
        groups.append(dataclasses.replace(plan, order=order))
    return PruningPlan(groups=tuple(groups), excluded=excluded, importance=importance)


HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _head_groups(model: nn.Module) -> list[GroupPlan]:
    """Whole attention heads, where the model allows: a module with an integer `num_heads`
    and separate q/k/v/out Linear projections (the Hugging Face layout) that reads
    `self.num_heads` in its forward. Head h owns rows h*d..(h+1)*d-1 of q, k and v and
    the same columns of out_proj. (nn.MultiheadAttention packs q, k, v and ties heads
    to the model width: its heads are not cut.)"""
    groups = []
    for name, module in model.named_modules():
        heads = getattr(module, "num_heads", None)
        projections = [getattr(module, p, None) for p in HEAD_PROJECTIONS]
        if not isinstance(heads, int) or not all(isinstance(p, nn.Linear) for p in projections):
            continue
        q, k, v, out = projections
        width = q.out_features
        if (
            heads < 2
            or width % heads
            or not k.out_features == v.out_features == out.in_features == width
        ):
            continue  # grouped-query layouts and odd widths are left alone
        d = width // heads
        index = tuple(tuple(range(h * d, (h + 1) * d)) for h in range(heads))
        prefix = f"{name}." if name else ""
        slices = [DimSlice(key=f"{prefix}{p}.{t}", dim=0, index=index)
                  for p in HEAD_PROJECTIONS[:3] for t in ("weight", "bias")
                  if getattr(getattr(module, p), t) is not None]  # fmt: skip
        slices.append(DimSlice(key=f"{prefix}out_proj.weight", dim=1, index=index))
        groups.append(GroupPlan(name=f"{prefix}q_proj", channels=heads, unit="heads",
                                members=tuple(prefix + p for p in HEAD_PROJECTIONS),
                                order=tuple(range(heads)), slices=tuple(slices),
                                count_attr=f"{prefix}num_heads"))  # fmt: skip
    return groups


def _groups(graph: Any, roots: tuple[type, ...], names: dict[nn.Module, str],
            excluded: dict[str, str]):  # fmt: skip
    """(root name, group) for each root layer's output channels, as the graph's
    get_all_groups does, but one group failing to trace leaves out that group only."""
    visited: set[nn.Module] = set()
    for module in list(graph.module2node):
        if not isinstance(module, roots) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
            )
        except Exception as exc:
            excluded[names.get(module, "?")] = f"tracing its coupling failed: {type(exc).__name__}"
            continue
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
        yield names.get(module, "?"), group


def _output_shapes(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, Mapping):
        return {k: _output_shapes(v) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return tuple(_output_shapes(v) for v in output)
    return None


def _try_group(model: nn.Module, plan: GroupPlan, example_inputs: Any, reference: Any) -> None:
    if plan.channels < 2:
        raise _Unsliceable("has a single channel")
    trial = dataclasses.replace(plan, order=tuple(range(plan.channels)))
    small = slice_model(model, PruningPlan(groups=(trial,)), {plan.name: plan.channels // 2})
    with torch.no_grad():
        shapes = _output_shapes(call_model(small.eval(), example_inputs))
    if shapes != reference:
        raise _Unsliceable("cutting it changes the model's output shape")


def channel_order(state: Mapping[str, torch.Tensor], plan: GroupPlan, importance: str,
                  modules: Mapping[str, nn.Module]) -> tuple[int, ...]:  # fmt: skip
    """Channels by importance, most important first (ties: lower index first).

    l1 / l2: the p-norm of every weight slice of the channel across the whole group
    (Li et al. 2017, "Pruning Filters for Efficient ConvNets"; grouped as Fang et al. 2023,
    "DepGraph"). bn_scale: |gamma| of the group's BatchNorms, the network-slimming
    criterion (Liu et al. 2017); groups without BatchNorm fall back to l1.
    """
    scores = torch.zeros(plan.channels, dtype=torch.float64)
    bn_keys = {f"{n}.weight" for n, m in modules.items() if isinstance(m, _BN)}
    use_bn = importance == "bn_scale" and any(s.key in bn_keys for s in plan.slices)
    power = 2 if importance == "l2" else 1
    for s in plan.slices:
        if not s.key.split(".")[-1].startswith("weight"):
            continue  # biases and running statistics say little about importance
        if use_bn != (s.key in bn_keys):
            continue
        tensor = state[s.key].detach().double().abs() ** power
        for c, idx in enumerate(s.index):
            scores[c] += tensor.index_select(s.dim, torch.tensor(idx)).sum()
    order = sorted(range(plan.channels), key=lambda c: (-float(scores[c]), c))
    return tuple(order)
