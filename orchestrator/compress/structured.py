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
from torch.nn.utils.parametrize import is_parametrized

from orchestrator.compress.memo import TensorCache
from search_spaces.structure import DimSlice, GroupPlan, PruningPlan


def _set(m: nn.Module, **attrs: object) -> None:
    # plain int attributes: Module.__setattr__'s parameter checks cost more than the rebuild
    m.__dict__.update(attrs)


def _fix_conv(m: nn.Module, old: dict) -> None:
    out, per_group = m.weight.shape[:2]
    if old["groups"] > 1 and old["groups"] == old["in_channels"] == old["out_channels"]:
        _set(m, groups=out, in_channels=out, out_channels=out)  # depthwise stays so
        return
    _set(m, out_channels=out, in_channels=per_group * m.groups)


def _fix_linear(m: nn.Module, old: dict) -> None:
    out, inp = m.weight.shape
    _set(m, out_features=out, in_features=inp)


def _fix_norm(m: nn.Module, old: dict) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    _set(m, num_features=ref.shape[0])


def _fix_layer_norm(m: nn.Module, old: dict) -> None:
    _set(m, normalized_shape=(m.weight.shape[0],))


def _fix_rnn(m: nn.Module, old: dict) -> None:
    _set(m, hidden_size=m.weight_hh_l0.shape[1], input_size=m.weight_ih_l0.shape[1])
    m._init_flat_weights()  # new shapes: cuDNN's flat buffer (GPU) is rebuilt


_ATTRS = ("groups", "in_channels", "out_channels")
FIXERS: dict[type, Callable[[nn.Module, dict], None]] = {
    nn.Conv1d: _fix_conv, nn.Conv2d: _fix_conv, nn.Conv3d: _fix_conv, nn.Linear: _fix_linear,
    nn.BatchNorm1d: _fix_norm, nn.BatchNorm2d: _fix_norm, nn.BatchNorm3d: _fix_norm,
    nn.LayerNorm: _fix_layer_norm, nn.LSTM: _fix_rnn, nn.GRU: _fix_rnn,
}  # fmt: skip


class Slicer:
    """Slices copies of one base model along one plan; made once per worker.

    Per candidate it builds only what changes: index tensors (cached per group count) and
    sliced tensors. With `reuse=True` (a worker's rebuild) every call returns the same
    scratch model, its tensors swapped or reset in place, so the module tree is built once
    (`copy.deepcopy` of the tree per candidate cost half the rebuild time: issue 3
    benchmark); the model a call returns is valid until the next call. Without it, each
    call returns an independent clone."""

    def __init__(self, base: nn.Module, plan: PruningPlan, *, reuse: bool = False,
                 cache: TensorCache | None = None) -> None:  # fmt: skip
        self.base, self.plan = base, plan
        self.reuse, self.cache = reuse, cache
        self.states: dict[str, tuple[int, ...]] = {}
        self._scratch: nn.Module | None = None
        self.tensors = dict(base.named_parameters())
        self.tensors.update(base.named_buffers())
        self.old = {n: {a: getattr(m, a, None) for a in _ATTRS} for n, m in base.named_modules()}
        self._index: dict[tuple[str, int, tuple[int, ...]], torch.Tensor | None] = {}
        self._tables: dict[tuple[str, str, int], tuple[torch.Tensor, bool]] = {}
        self._kept_channels: dict[tuple[str, int], torch.Tensor] = {}
        self._owners: dict[str, list[tuple[GroupPlan, DimSlice]]] = {}
        for g in plan.groups:
            for s in g.slices:
                self._owners.setdefault(s.key, []).append((g, s))
        self._plain = not any(is_parametrized(m) for m in base.modules())
        # per module: the attributes holding mutable containers (hook dicts, sets) a clone
        # must not share; tensor dicts are rebuilt anyway
        rebuilt = {"_parameters", "_buffers", "_modules"}
        self._containers = {
            id(m): [k for k, v in m.__dict__.items()
                    if isinstance(v, (dict, set, list)) and k not in rebuilt]
            for m in base.modules()
        }  # fmt: skip

    def __call__(self, counts: Mapping[str, int], *, shared: bool = False) -> nn.Module:
        """The model keeping `counts[group]` channels of each group. `shared` (with `reuse`
        and a cache): parameters share the cached sliced tensors and the base tensors, so
        the caller must not write them in place (buffers are always fresh copies);
        `self.states` then names each sliced tensor's variant for the caller's caches."""
        new: dict[str, torch.Tensor] = {}
        touched: set[str] = set()
        self.states = {}
        with torch.no_grad():
            for key, owners in self._owners.items():
                state = tuple(counts.get(g.name, g.channels) for g, _ in owners)
                if all(c >= g.channels for c, (g, _) in zip(state, owners, strict=True)):
                    continue  # nothing cut (the least important channels beyond a count go)
                tensor = self._sliced(key, owners, counts, state)
                if tensor is not None:
                    new[key] = tensor
                    self.states[key] = state
                    touched.add(key.rpartition(".")[0])
        if self.reuse and self._plain:
            model = self._refill(new, shared=shared and self.cache is not None)
            # every sliceable module: reset the shapes a previous candidate changed too
            fixes = self._fixes
        else:
            new = {k: v.clone() for k, v in new.items()} if self.cache is not None else new
            model = self._clone(new) if self._plain else self._deepcopy(new)
            fixes = [(model.get_submodule(name), name) for name in touched]
        for module, name in fixes:
            fixer = FIXERS.get(type(module))
            if fixer is not None:
                fixer(module, self.old[name])
        for group in self.plan.groups:  # counts a module keeps itself, e.g. num_heads
            if group.count_attr:
                owner, _, attr = group.count_attr.rpartition(".")
                setattr(model.get_submodule(owner), attr, counts.get(group.name, group.channels))
        return model

    def _sliced(self, key: str, owners: list[tuple[GroupPlan, DimSlice]],
                counts: Mapping[str, int], state: tuple[int, ...]) -> torch.Tensor | None:  # fmt: skip
        """`key`'s tensor with the cut channels of every owning group removed (None: none
        cut); cached per the owning groups' counts."""
        cached = self.cache.get(("slice", key, state)) if self.cache is not None else None
        if cached is not None:
            return cached
        tensor = original = self.tensors[key].detach()
        for dim in sorted({s.dim for _, s in owners}):
            index = self._kept(key, dim, [(g, s) for g, s in owners if s.dim == dim], counts,
                               tensor.shape[dim])  # fmt: skip
            if index is not None:
                tensor = tensor.index_select(dim, index)
        if tensor is original:
            return None
        # a view would share the base's storage; index_select gave a new tensor
        return self.cache.put(("slice", key, state), tensor) if self.cache is not None else tensor

    def _kept(
        self,
        key: str,
        dim: int,
        owners: list[tuple[GroupPlan, DimSlice]],
        counts: Mapping[str, int],
        size: int,
    ) -> torch.Tensor | None:
        """Indices of `dim` the counts keep (None: all), cached per owning groups' counts.
        Indices no group owns (another branch of a concatenation) always stay."""
        state = tuple(counts.get(g.name, g.channels) for g, _ in owners)
        cache_key = (key, dim, state)
        if cache_key not in self._index:
            (group, sl), count = owners[0], state[0]
            if len(owners) == 1 and group.channels * sl.multiplicity == size:
                # one group owns the whole dimension: its channels in importance order
                if count >= group.channels:
                    index = None
                else:
                    table, monotone = self._table(group, sl)
                    index = table.index_select(0, self._channels(group, count)).reshape(-1)
                    if not monotone:  # e.g. LSTM gates: h, H+h, 2H+h, 3H+h
                        index = index.sort().values
            else:
                cut: set[int] = set()
                for (group, sl), count in zip(owners, state, strict=True):
                    for channel in group.order[count:]:  # the least important channels go
                        cut.update(sl.index[channel])
                keep = [i for i in range(size) if i not in cut]
                index = torch.tensor(keep, device=self.tensors[key].device) if cut else None
            self._index[cache_key] = index
        return self._index[cache_key]

    def _table(self, group: GroupPlan, sl: DimSlice) -> tuple[torch.Tensor, bool]:
        """(channels, multiplicity) indices of the slice by channel, and whether reading
        its rows in channel order gives sorted indices (then no sort per candidate)."""
        key = (group.name, sl.key, sl.dim)
        if key not in self._tables:
            flat = [i for row in sl.index for i in row]
            table = torch.tensor(sl.index, device=self.tensors[sl.key].device)
            self._tables[key] = (table, flat == sorted(flat))
        return self._tables[key]

    def _channels(self, group: GroupPlan, count: int) -> torch.Tensor:
        """The `count` most important channels of a group, in channel order."""
        key = (group.name, count)
        if key not in self._kept_channels:
            device = next(iter(self.tensors.values())).device
            self._kept_channels[key] = torch.tensor(group.kept_channels(count), device=device)
        return self._kept_channels[key]

    def _refill(self, new: Mapping[str, torch.Tensor], *, shared: bool) -> nn.Module:
        """The scratch model with this candidate's tensors: sliced ones swapped in, the
        others reset to the base values (a previous candidate quantized, fine-tuned or
        re-estimated them). Shared: parameters point at the sliced (cached) or base tensors
        without copies; otherwise every tensor is the scratch model's own."""
        if self._scratch is None:
            self._scratch = self._clone({})
            modules = dict(self._scratch.named_modules())
            self._slots = [(modules[k.rpartition(".")[0]], k.rpartition(".")[2], k)
                           for k in self.tensors]  # fmt: skip
            self._fixes = [
                (modules[n], n) for n in sorted({k.rpartition(".")[0] for k in self._owners})
            ]
        with torch.no_grad():
            for module, name, key in self._slots:
                source = new.get(key)
                source = self.tensors[key].detach() if source is None else source
                if name in module._parameters:
                    param = module._parameters[name]
                    param.grad = None
                    # not shared: a copy of its own (a shared call may have left the
                    # parameter pointing at a cached or base tensor: never write those)
                    param.data = source if shared else source.clone()
                else:  # buffers are always the scratch model's own (BatchNorm writes them)
                    current = module._buffers[name]
                    if current.shape == source.shape:
                        current.copy_(source)
                    else:
                        module._buffers[name] = source.clone()
        return self._scratch

    def _clone(self, new: Mapping[str, torch.Tensor]) -> nn.Module:
        """The module tree, every module a new object, every tensor fresh (sliced or copied),
        so BatchNorm re-estimation or fine-tuning never touches the base model."""

        def fresh(key: str, tensor: torch.Tensor) -> torch.Tensor:
            return new[key] if key in new else tensor.detach().clone()  # sliced ones are new

        def clone(module: nn.Module, prefix: str) -> nn.Module:
            state = module.__dict__.copy()  # C-level copy; then fresh mutable containers
            for key in self._containers[id(module)]:
                state[key] = state[key].copy()
            state["_parameters"] = {
                n: None if p is None
                else nn.Parameter(fresh(prefix + n, p), requires_grad=p.requires_grad)
                for n, p in module._parameters.items()
            }  # fmt: skip
            state["_buffers"] = {n: None if b is None else fresh(prefix + n, b)
                                 for n, b in module._buffers.items()}  # fmt: skip
            state["_modules"] = {n: None if m is None else clone(m, f"{prefix}{n}.")
                                 for n, m in module._modules.items()}  # fmt: skip
            copy_ = module.__class__.__new__(module.__class__)
            object.__setattr__(copy_, "__dict__", state)  # not Module.__setattr__: hot path
            if isinstance(copy_, nn.RNNBase):
                copy_._init_flat_weights()
            return copy_

        return clone(self.base, "")

    def _deepcopy(self, new: Mapping[str, torch.Tensor]) -> nn.Module:
        memo: dict[int, object] = {}
        for key, tensor in new.items():
            old = self.tensors[key]
            memo[id(old)] = (nn.Parameter(tensor.clone(), requires_grad=old.requires_grad)
                             if isinstance(old, nn.Parameter) else tensor.clone())  # fmt: skip
        return copy.deepcopy(self.base, memo)


def slice_model(base: nn.Module, plan: PruningPlan, counts: Mapping[str, int]) -> nn.Module:
    """A copy of `base` keeping `counts[group]` channels of each group (most important)."""
    return Slicer(base, plan)(counts)
