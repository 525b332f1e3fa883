"""Structured rebuild: slice a model's tensors along a pruning plan, giving a plain,
physically smaller nn.Module (no masks, no hooks) that runs on CPU and GPU alike.

Per candidate only tensors are sliced (index_select on the base tensors, variants.py)
and swapped into a module tree built once per worker, or into a copy of the tree, so no
tracing and no dependency graph happen per candidate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

from orchestrator.compress.memo import TensorCache
from orchestrator.compress.variants import Variants
from search_spaces.config import FLOAT_BITS
from search_spaces.layers import LayerType, layer_type
from search_spaces.structure import PruningPlan

_ATTRS = ("groups", "in_channels", "out_channels")  # the base's, for a fix (depthwise convs)
Fix = tuple[nn.Module, Callable[[nn.Module, dict], None], dict]  # module, fixer, old attrs


class Slicer:
    """Slices copies of one base model along one plan; made once per worker.

    Per candidate it builds only what changes: the tensor variants (variants.py) and the
    shape attributes of the modules holding them. With `reuse=True` (a worker's rebuild)
    every call returns the same scratch model, its tensors swapped or reset in place, so
    the module tree is built once (`copy.deepcopy` of the tree per candidate cost half the
    rebuild time: issue 3 benchmark); the model a call returns is valid until the next
    call. Without it, each call returns an independent clone."""

    def __init__(self, base: nn.Module, plan: PruningPlan, *, reuse: bool = False,
                 cache: TensorCache | None = None,
                 bits_choices: Mapping[str, Sequence[int]] | None = None) -> None:  # fmt: skip
        self.base, self.plan = base, plan
        self.reuse = reuse
        self._scratch: nn.Module | None = None
        self.tensors = dict(base.named_parameters())
        self.tensors.update(base.named_buffers())
        self.variants = Variants(self.tensors, plan, cache=cache, bits_choices=bits_choices)
        self.old = {n: {a: getattr(m, a, None) for a in _ATTRS} for n, m in base.named_modules()}
        self._full = {g.name: g.channels for g in plan.groups}
        self._counted = [g for g in plan.groups if g.count_attr]
        # every key a candidate may change: cut by a group, or quantized
        keys = dict.fromkeys([*self.variants.owners, *(bits_choices or {})])
        self._keys = [(k, self.variants.groups.get(k, ()), self.variants.uncut.get(k, ()))
                      for k in keys]  # fmt: skip
        self._plain = not any(is_parametrized(m) for m in base.modules())
        # per module: the attributes holding mutable containers (hook dicts, sets) a clone
        # must not share; tensor dicts are rebuilt anyway
        rebuilt = {"_parameters", "_buffers", "_modules"}
        self._containers = {
            id(m): [k for k, v in m.__dict__.items()
                    if isinstance(v, (dict, set, list)) and k not in rebuilt]
            for m in base.modules()
        }  # fmt: skip

    def __call__(self, counts: Mapping[str, int], *, bits: Mapping[str, int] | None = None,
                 shared: bool = False) -> nn.Module:  # fmt: skip
        """The model keeping `counts[group]` channels of each group, its tensors of `bits`
        (key -> bits) fake-quantized. `shared` (with `reuse`): parameters are the cached
        variants and base tensors themselves, so the caller must not write them in place
        (buffers are always the model's own)."""
        new = self._variants(counts, bits or {})
        if self.reuse and self._plain:
            model = self._refill(new, shared=shared)
            # every sliceable module: reset the shapes a previous candidate changed too
            fixes = self._fixes
        else:
            new = {k: v.clone() for k, v in new.items()}  # never the base's or the cache's
            model = self._clone(new) if self._plain else self._deepcopy(new)
            touched = {k.rpartition(".")[0] for k in new}
            fixes = self._fixes_of((name, model.get_submodule(name)) for name in touched)
        for module, fixer, old in fixes:
            fixer(module, old)
        for group in self._counted:  # counts a module keeps itself, e.g. num_heads
            owner, _, attr = group.count_attr.rpartition(".")
            setattr(model.get_submodule(owner), attr, counts.get(group.name, group.channels))
        return model

    def _variants(
        self, counts: Mapping[str, int], bits: Mapping[str, int]
    ) -> dict[str, torch.Tensor]:
        """The tensors this candidate changes, by key (the others stay the base's)."""
        full = self._full | dict(counts)
        new = {}
        for key, groups, uncut in self._keys:
            state = tuple(map(full.__getitem__, groups))
            b = bits.get(key, FLOAT_BITS)
            if state != uncut or b < FLOAT_BITS:
                new[key] = self.variants.get(key, state, b)
        return new

    def _refill(self, new: Mapping[str, torch.Tensor], *, shared: bool) -> nn.Module:
        """The scratch model with this candidate's tensors: its variants swapped in, the
        others reset to the base values (a previous candidate quantized, fine-tuned or
        re-estimated them). Shared: parameters point at the variants (cached) or base
        tensors without copies; otherwise every tensor is the scratch model's own."""
        if self._scratch is None:
            self._build_scratch()
        base = self.variants.tensors
        for param, key in self._param_slots:
            source = new.get(key, base[key])
            param.grad = None  # fine-tuning's, maybe of another shape
            # not shared: a copy of its own (a shared call may have left the
            # parameter pointing at a cached or base tensor: never write those)
            param.data = source if shared else source.clone()
        with torch.no_grad():  # buffers are the model's own: BatchNorm re-estimation writes them
            for buffers, name, key in self._buffer_slots:
                source, current = new.get(key, base[key]), buffers[name]
                if current.shape == source.shape:
                    current.copy_(source)
                else:
                    buffers[name] = source.clone()
        return self._scratch

    def _build_scratch(self) -> None:
        """The scratch model, and per tensor where it lives in it: Parameter objects stay
        for its lifetime (their .data is swapped), buffers are reset in their dicts."""
        self._scratch = self._clone({})
        modules = dict(self._scratch.named_modules())
        self._param_slots, self._buffer_slots = [], []
        for key in self.tensors:
            owner, _, name = key.rpartition(".")
            module = modules[owner]
            if name in module._parameters:
                self._param_slots.append((module._parameters[name], key))
            else:
                self._buffer_slots.append((module._buffers, name, key))
        # modules whose shapes follow their tensors, and RNNs whose weights get swapped
        # (cuDNN keeps them in one flat buffer)
        touched = {k.rpartition(".")[0] for k in self.variants.owners}
        self._fixes = self._fixes_of((n, m) for n, m in modules.items()
                                     if n in touched or isinstance(m, nn.RNNBase))  # fmt: skip

    def _fixes_of(self, modules: Iterable[tuple[str, nn.Module]]) -> list[Fix]:
        # each module's layer type sets its shape attributes (search_spaces/layers)
        return [(m, layer.fix, self.old[n]) for n, m in modules
                if (layer := layer_type(m)) is not None
                and type(layer).fix is not LayerType.fix]  # fmt: skip

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
        for key, tensor in new.items():  # fresh tensors (`__call__` cloned them)
            old = self.tensors[key]
            memo[id(old)] = (nn.Parameter(tensor, requires_grad=old.requires_grad)
                             if isinstance(old, nn.Parameter) else tensor)  # fmt: skip
        return copy.deepcopy(self.base, memo)


def slice_model(base: nn.Module, plan: PruningPlan, counts: Mapping[str, int]) -> nn.Module:
    """A copy of `base` keeping `counts[group]` channels of each group (most important)."""
    return Slicer(base, plan)(counts)
