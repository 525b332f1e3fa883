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
import functools
import hashlib
import json
import logging
import random
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.atomic import atomic_write_json
from orchestrator.batches import call_model
from orchestrator.compress.structured import slice_model
from search_spaces.layers import layer_type
from search_spaces.structure import DimSlice, GroupPlan, PruningPlan

_BN = nn.modules.batchnorm._BatchNorm
LOG = logging.getLogger("prunesearch")


# what cutting a module's output or input channels touches: its layer type says
# (search_spaces/layers); the roots of groups are the compressible layers


def _is_root(module: Any) -> bool:
    layer = layer_type(module) if isinstance(module, nn.Module) else None
    return layer is not None and layer.compressible


# -- planning -----------------------------------------------------------------------


@contextlib.contextmanager
def _gru_traced_as_lstm():
    """Torch-Pruning traces LSTM outputs (a tuple) specially but not GRU's, and its
    generic path fails on GRU's output; both expose input and hidden channels the same
    way, so while the graph is built a GRU is typed as an LSTM. Only channel counts are
    read from its pruner (the output's: both directions of a bidirectional one); our own
    handlers slice the tensors (3 gates, not 4)."""
    import torch_pruning as tp

    saved = tp.ops.TORCH_LSTM
    pruner = type(tp.pruner.function.PrunerBox[tp.ops.OPTYPE.LSTM])
    counted = pruner.get_out_channels
    tp.ops.TORCH_LSTM = (nn.LSTM, nn.GRU)
    # Torch-Pruning counts one direction of a bidirectional output
    pruner.get_out_channels = lambda self, rnn: _rnn_width(rnn)
    try:
        yield
    finally:
        tp.ops.TORCH_LSTM = saved
        pruner.get_out_channels = counted


@contextlib.contextmanager
def _tolerant_index_mapping(broken: set[int]):
    """Torch-Pruning fails the whole trace when it cannot map channel indices through one
    reshape, concat, split, ... node (ShuffleNet's channel shuffle: ZeroDivisionError).
    While the graph is built, such a node is recorded in `broken` (by id) instead, and
    every group passing through it is left out (per group, not the whole model)."""
    from torch_pruning.dependency import index_mapping

    names = [n for n in dir(index_mapping) if n.startswith("update_") and n.endswith("_mapping")
             and n != "update_index_mapping"]  # fmt: skip
    saved = {n: getattr(index_mapping, n) for n in names}

    def tolerant(original):
        def update(graph, node):
            try:
                return original(graph, node)
            except Exception:  # its index mapping is unknown: the node breaks coupling
                broken.add(id(node.module))

        return update

    for n, fn in saved.items():
        setattr(index_mapping, n, tolerant(fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(index_mapping, n, fn)


# Bounds on tracing one group (Torch-Pruning revisits nodes whose index lists differ only
# in order; on Swin-T one group grew past 20 GB): items and indices held by the group
TRACE_ITEMS, TRACE_INDICES = 4000, 2_000_000
PLAN_SECONDS = 120.0  # groups not traced by then are left out, with why


class _TraceTooLarge(Exception):
    pass


@contextlib.contextmanager
def _bounded_tracing():
    """While planning: Torch-Pruning's group tracing stops (for that group) past the
    bounds above, and its index maps are computed once per graph, not again for every
    group (the same result: it was most of densenet121's planning time)."""
    from torch_pruning.dependency import graph as graph_module
    from torch_pruning.dependency.group import Group

    add_dep, update = Group.add_dep, graph_module.index_mapping.update_index_mapping
    updated: set[int] = set()

    def bounded_add_dep(self, dep, idxs):
        held = getattr(self, "_held", 0) + len(idxs)
        if len(self._group) >= TRACE_ITEMS or held > TRACE_INDICES:
            raise _TraceTooLarge(f"its coupling grew past {len(self._group):,} dependencies "
                                 f"and {held:,} indices while being traced")  # fmt: skip
        self._held = held
        add_dep(self, dep, idxs)

    def update_once(graph):
        if id(graph) not in updated:
            updated.add(id(graph))
            update(graph)

    Group.add_dep = bounded_add_dep
    graph_module.index_mapping.update_index_mapping = update_once
    try:
        yield
    finally:
        Group.add_dep = add_dep
        graph_module.index_mapping.update_index_mapping = update


def _rnn_width(rnn: nn.RNNBase) -> int:
    """An LSTM/GRU's output width: each direction's hidden units."""
    return rnn.hidden_size * (2 if rnn.bidirectional else 1)


def _foreign_layers(model: nn.Module) -> dict[type, Any]:
    """Layer types known to us but not to Torch-Pruning (registered by class name, e.g.
    transformers' Conv1D), as nodes of its graph: it reads only their channel counts from
    these pruners (our handlers slice the tensors), and without them their weights would
    be traced as bare parameters, whose groups cannot be cut."""
    import torch_pruning as tp

    class Counts(tp.pruner.function.BasePruningFunc):
        # never called (our handlers slice); their names give a member's role
        def prune_out_channels(self, layer: nn.Module, idxs: list) -> nn.Module:
            raise NotImplementedError("prunesearch slices the tensors itself")

        def prune_in_channels(self, layer: nn.Module, idxs: list) -> nn.Module:
            raise NotImplementedError("prunesearch slices the tensors itself")

        def get_out_channels(self, layer: nn.Module) -> int:
            return _first_cut_size(layer, layer_type(layer).cut_out(layer))

        def get_in_channels(self, layer: nn.Module) -> int:
            return _first_cut_size(layer, layer_type(layer).cut_in(layer))

    unknown = tp.ops.OPTYPE.ELEMENTWISE  # what Torch-Pruning calls a module it does not know
    foreign = {type(m) for m in model.modules()
               if tp.ops.module2type(m) == unknown and (layer := layer_type(m)) is not None
               and layer.compressible and layer.cut_out(m) and layer.cut_in(m)}  # fmt: skip
    return {t: Counts() for t in foreign}


def _first_cut_size(module: nn.Module, cuts: list) -> int:
    tensor, dim, gates = cuts[0]
    return getattr(module, tensor).shape[dim] // gates


def _handler_role(dep: Any) -> str:
    return "out" if "out" in getattr(dep.handler, "__name__", str(dep.handler)) else "in"


class _Unsliceable(Exception):
    pass


def _member_cuts(module: nn.Module, name: str, role: str) -> list:
    layer = layer_type(module)
    cuts = (
        None if layer is None else layer.cut_out(module) if role == "out" else layer.cut_in(module)
    )
    if cuts is None:
        why = f": {layer.uncut_why}" if layer is not None and layer.uncut_why else ""
        raise _Unsliceable(f"member {name or 'model'} ({type(module).__name__}) cannot be "
                           f"sliced{why}")  # fmt: skip
    return cuts


def _fold(members: list[tuple], channels: int) -> list[list[int]]:
    """The group's channels as lists of root channels cut together. A member whose
    channels fall into G equal groups (a grouped conv, GroupNorm) must keep the same count
    in each: its channels at one position in every group are cut together, so the root
    channels mapping to them are one channel of the plan."""
    parent = list(range(channels))

    def find(c: int) -> int:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for _, _, _, per_channel, groups, size in members:
        if groups == 1:
            continue
        width = size // groups
        at: dict[int, int] = {}
        for root, idx in per_channel.items():
            for i in idx:
                first = at.setdefault(i % width, root)
                parent[find(root)] = find(first)
    folded: dict[int, list[int]] = {}
    for c in range(channels):
        folded.setdefault(find(c), []).append(c)
    units = list(folded.values())
    if len({len(u) for u in units}) != 1:
        raise _Unsliceable("its grouped members split its channels unevenly")
    for name, _, _, per_channel, groups, size in members:
        if groups > 1 and any(len({i // (size // groups) for r in u for i in per_channel[r]})
                              != groups for u in units):  # fmt: skip
            raise _Unsliceable(f"member {name}: a cut would not take one channel of each group")
    return units


def _group_plan(group: Any, names: dict[Any, str], root_name: str,
                broken: set[int] = frozenset()) -> GroupPlan:  # fmt: skip
    """The group as plain data: per member (module, or a parameter of a module no layer
    type knows, e.g. ConvNeXt's layer_scale) the tensor dimensions its channels cut."""
    import torch_pruning as tp

    members: list[tuple] = []  # (name, module or None, cuts, per root channel, groups, size)
    for item in group:
        dep = item.dep
        target = dep.target.module
        if id(target) in broken:
            raise _Unsliceable(f"its channels pass through a {dep.target.type.name.lower()} "
                               "whose channel mapping is unknown (e.g. a channel shuffle)")  # fmt: skip
        if target not in names:
            continue  # element-wise, reshape, concat nodes: no tensors of their own
        name = names[target]
        if dep.target.type == tp.ops.OPTYPE.PARAMETER:  # an unwrapped parameter
            module, cuts = None, [("", dep.target.pruning_dim, 1)]
            groups, size = 1, target.shape[dep.target.pruning_dim]
        else:
            module = target
            layer = layer_type(module)
            reason = layer.unsupported(module) if layer is not None else None
            if reason:
                raise _Unsliceable(f"member {name}: {reason}")
            role = _handler_role(dep)
            cuts = _member_cuts(module, name, role)
            groups = layer.channel_groups(module, role) if layer is not None else 1
            size = _channel_count(module, role, cuts)
        per_channel: dict[int, list[int]] = {}
        for idx, root in zip(item.idxs, item.root_idxs, strict=True):
            per_channel.setdefault(int(root), []).append(int(idx))
        members.append((name, module, cuts, per_channel, groups, size))
    if not members:
        raise _Unsliceable("no member holds tensors")
    channels = len(members[0][3])
    for name, _, _, per_channel, _, _ in members:
        if len(per_channel) != channels or len({len(v) for v in per_channel.values()}) != 1:
            raise _Unsliceable(f"member {name} maps channels unevenly")
    units = _fold(members, channels)
    slices: list[DimSlice] = []
    for name, module, cuts, per_channel, groups, size in members:
        prefix = f"{name}." if name and module is not None else name
        width = size // groups
        for tensor, dim, gates in cuts:
            full = getattr(module, tensor) if module is not None else None
            step = (full.shape[dim] if full is not None else size) // gates
            index = []
            for unit in units:
                idx = sorted(i for r in unit for i in per_channel[r])
                if groups > 1 and step == width:  # the tensor holds one group's channels (a
                    idx = sorted({i % width for i in idx})  # grouped conv's inputs): positions
                index.append(tuple(g * step + i for g in range(gates) for i in idx))
            slices.append(DimSlice(key=f"{prefix}{tensor}" if module is not None else name,
                                   dim=dim, index=tuple(index)))  # fmt: skip
    keys = [(s.key, s.dim) for s in slices]
    if len(keys) != len(set(keys)):
        slices = list({(s.key, s.dim): s for s in slices}.values())  # a node listed twice
    return GroupPlan(name=root_name, channels=len(units),
                     members=tuple(dict.fromkeys(m[0] for m in members)),
                     order=(), slices=tuple(slices))  # fmt: skip


def _channel_count(module: nn.Module, role: str, cuts: list) -> int:
    """How many channels the member has on the cut side (a grouped conv: all groups')."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if role == "out" else module.in_channels
    if isinstance(module, nn.RNNBase) and role == "out":
        return _rnn_width(module)
    for tensor, dim, gates in cuts:
        return getattr(module, tensor).shape[dim] // gates
    return 0


def plan_groups(model: nn.Module, example_inputs: Any, *, layer_names: list[str],
                importance: str = "l1", cache: Path | None = None) -> PruningPlan:  # fmt: skip
    """The coupling groups of `model` rooted at its compressible layers, with importance
    order. Torch-Pruning's warnings (about its own defaults, which our handlers replace)
    are summarized in one logged line, not printed raw.

    With `cache` (a directory), the structure found (groups, index maps, what was left
    out and why) is kept under a key of the model's structure (module types, state-dict
    shapes, example input shapes, the layers planned) and of the code that plans; a later
    call with the same key reads it back and only orders the channels by importance
    (which follows the weights, so fine-tuned weights of the same model reuse the plan)."""
    model = model.eval()
    path = None if cache is None else cache / f"{plan_key(model, example_inputs, layer_names)}.json"
    if path is not None and path.is_file():
        with contextlib.suppress(Exception):  # unreadable: planned again and rewritten
            return _ordered(model, PruningPlan.from_dict(json.loads(path.read_text())), importance)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = _plan_groups(model, example_inputs, layer_names=layer_names, importance=importance)
    _summarize(caught)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, plan.to_dict())
        except OSError as exc:  # a read-only cache costs the next run a new plan, no more
            LOG.warning("planning: could not cache the plan in %s (%s)", path.parent, exc)
    return _ordered(model, plan, importance)


def _ordered(model: nn.Module, plan: PruningPlan, importance: str) -> PruningPlan:
    state, modules = model.state_dict(), dict(model.named_modules())
    groups = tuple(dataclasses.replace(g, order=channel_order(state, g, importance, modules))
                   for g in plan.groups)  # fmt: skip
    return dataclasses.replace(plan, groups=groups, importance=importance)


# the code whose behaviour a cached plan records: a change to it plans again
_PLANNING_CODE = ("orchestrator/compress/plan.py", "orchestrator/compress/structured.py",
                  "search_spaces/structure.py", "search_spaces/layers")  # fmt: skip


@functools.cache
def _code_hash() -> str:
    import torch_pruning as tp

    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256(f"{tp.__version__} {torch.__version__}".encode())
    for rel in _PLANNING_CODE:
        target = root / rel
        for file in sorted(target.glob("*.py")) if target.is_dir() else [target]:
            digest.update(file.read_bytes())
    return digest.hexdigest()


def plan_key(model: nn.Module, example_inputs: Any, layer_names: list[str]) -> str:
    """A hash of what determines the plan: the model's structure, not its weights."""
    structure = {
        "code": _code_hash(),
        "modules": [(n, f"{type(m).__module__}.{type(m).__qualname__}")
                    for n, m in model.named_modules()],
        "state": [(k, list(t.shape), str(t.dtype)) for k, t in model.state_dict().items()],
        "inputs": _output_shapes(example_inputs),
        "layers": sorted(layer_names),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(structure, default=str).encode()).hexdigest()[:32]


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
    names: dict[Any, str] = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})  # unwrapped ones are members
    excluded: dict[str, str] = {}
    broken: set[int] = set()
    with _gru_traced_as_lstm(), _tolerant_index_mapping(broken), _bounded_tracing():
        graph = tp.DependencyGraph().build_dependency(
            model,
            example_inputs=example_inputs,
            forward_fn=call_model,
            customized_pruners=_foreign_layers(model),
        )
        traced = list(_groups(graph, names, excluded))
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
            plan = (group if isinstance(group, GroupPlan)
                    else _group_plan(group, names, root_name, broken))  # fmt: skip
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
        # channels in their own order here: plan_groups orders them by importance
        groups.append(dataclasses.replace(plan, order=tuple(range(plan.channels))))
    groups = _check_together(model, groups, example_inputs, reference, excluded)
    return PruningPlan(groups=tuple(groups), excluded=excluded, importance=importance)


TOGETHER_DRAWS = 6  # cuts of every group at once: each at one channel, at half, then random


def _check_together(model: nn.Module, groups: list[GroupPlan], example_inputs: Any,
                    reference: Any, excluded: dict[str, str]) -> list[GroupPlan]:  # fmt: skip
    """Each group passed its own test cut; cut together, groups may still break the model
    (two cuts whose widths must agree). Every group is cut at once at a few channel
    counts; a failing draw is narrowed (by bisection over the groups in order) to the
    group whose cut breaks it, which is left out with why, until every draw runs."""
    rng = random.Random(0)
    draws = [{g.name: 1 for g in groups}, {g.name: max(1, g.channels // 2) for g in groups}]
    draws += [{g.name: rng.randint(1, g.channels) for g in groups}
              for _ in range(TOGETHER_DRAWS - 2)]  # fmt: skip
    for counts in draws:
        while groups and (error := _cut_error(model, groups, counts, example_inputs, reference)):
            lo, hi = 0, len(groups) - 1  # the shortest failing prefix ends at the guilty group
            while lo < hi:
                mid = (lo + hi) // 2
                if _cut_error(model, groups[: mid + 1], counts, example_inputs, reference):
                    hi = mid
                else:
                    lo = mid + 1
            guilty = groups.pop(lo)
            excluded[guilty.name] = f"cut together with the other groups, the model failed: {error}"
    return groups


def _cut_error(model: nn.Module, groups: list[GroupPlan], counts: Mapping[str, int],
               example_inputs: Any, reference: Any) -> str | None:  # fmt: skip
    try:
        small = slice_model(model, PruningPlan(groups=tuple(groups)), counts)
        with torch.no_grad():
            shapes = _output_shapes(call_model(small.eval(), example_inputs))
    except Exception as exc:  # any failure of the rebuilt model
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None if shapes == reference else "cutting changes the model's output shape"


HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _head_groups(model: nn.Module) -> list[GroupPlan]:
    """Whole attention heads, where the model allows: nn.MultiheadAttention (packed or
    separate q/k/v weights), and a module with an integer `num_heads` and separate
    q/k/v/out Linear projections (the Hugging Face layout) that reads `self.num_heads` in
    its forward. Head h owns rows h*d..(h+1)*d-1 of q, k and v and the same columns of
    out_proj."""
    groups = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        found = (_torch_heads(module, prefix) if isinstance(module, nn.MultiheadAttention)
                 else _projection_heads(module, prefix))  # fmt: skip
        if found is None:
            continue
        root, heads, members, slices = found
        groups.append(GroupPlan(name=root, channels=heads, unit="heads", members=members,
                                order=tuple(range(heads)), slices=tuple(slices),
                                count_attr=f"{prefix}num_heads"))  # fmt: skip
    return groups


def _head_index(heads: int, d: int, parts: int = 1, stride: int = 0) -> tuple:
    """Per head, its d indices in each of `parts` blocks `stride` apart (packed q/k/v)."""
    return tuple(tuple(p * stride + h * d + i for p in range(parts) for i in range(d))
                 for h in range(heads))  # fmt: skip


def _torch_heads(module: nn.MultiheadAttention, prefix: str) -> tuple | None:
    layer = layer_type(module)
    if module.num_heads < 2 or layer is None or layer.unsupported(module):
        return None  # left to the traced groups, which say why it is not cut
    heads, d, width = module.num_heads, module.head_dim, module.embed_dim
    index, packed = _head_index(heads, d), _head_index(heads, d, 3, width)  # q, k, v at 0, E, 2E
    if module.in_proj_weight is not None:
        slices = [DimSlice(key=f"{prefix}in_proj_weight", dim=0, index=packed)]
    else:
        slices = [DimSlice(key=f"{prefix}{p}_proj_weight", dim=0, index=index) for p in "qkv"]
    if module.in_proj_bias is not None:
        slices.append(DimSlice(key=f"{prefix}in_proj_bias", dim=0, index=packed))
    slices.append(DimSlice(key=f"{prefix}out_proj.weight", dim=1, index=index))
    name = prefix.rstrip(".")
    return name, heads, (name, f"{prefix}out_proj"), slices


def _projection_heads(module: nn.Module, prefix: str) -> tuple | None:
    heads = getattr(module, "num_heads", None)
    projections = [getattr(module, p, None) for p in HEAD_PROJECTIONS]
    if not isinstance(heads, int) or not all(isinstance(p, nn.Linear) for p in projections):
        return None
    q, k, v, out = projections
    width = q.out_features
    if (
        heads < 2
        or width % heads
        or not k.out_features == v.out_features == out.in_features == width
    ):
        return None  # grouped-query layouts and odd widths are left alone
    index = _head_index(heads, width // heads)
    slices = [DimSlice(key=f"{prefix}{p}.{t}", dim=0, index=index)
              for p in HEAD_PROJECTIONS[:3] for t in ("weight", "bias")
              if getattr(getattr(module, p), t) is not None]  # fmt: skip
    slices.append(DimSlice(key=f"{prefix}out_proj.weight", dim=1, index=index))
    return f"{prefix}q_proj", heads, tuple(prefix + p for p in HEAD_PROJECTIONS), slices


def _groups(graph: Any, names: dict[nn.Module, str],
            excluded: dict[str, str]):  # fmt: skip
    """(root name, group) for each root layer's output channels, as the graph's
    get_all_groups does, but one group failing to trace leaves out that group only."""
    visited: set[nn.Module] = set()
    deadline = time.monotonic() + PLAN_SECONDS
    for module in list(graph.module2node):
        if not _is_root(module) or module in visited:
            continue
        if time.monotonic() > deadline:
            excluded[names.get(module, "?")] = (f"not traced: planning stopped after "
                                                f"{PLAN_SECONDS:.0f} s")  # fmt: skip
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            excluded[names.get(module, "?")] = (f"Torch-Pruning does not trace "
                                                f"{type(module).__name__}'s channels")  # fmt: skip
            continue
        try:
            group = graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
            )
        except Exception as exc:
            excluded[names.get(module, "?")] = (f"tracing its coupling failed: "
                                                f"{type(exc).__name__}: {str(exc)[:120]}")  # fmt: skip
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
        if "weight" not in s.key.rpartition(".")[2]:  # weight, weight_ih_l0, in_proj_weight
            continue  # biases and running statistics say little about importance
        if use_bn != (s.key in bn_keys):
            continue
        tensor = state[s.key].detach().double().abs() ** power
        for c, idx in enumerate(s.index):
            scores[c] += tensor.index_select(s.dim, torch.tensor(idx)).sum()
    order = sorted(range(plan.channels), key=lambda c: (-float(scores[c]), c))
    return tuple(order)
