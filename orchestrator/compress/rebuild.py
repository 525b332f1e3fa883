"""Rebuild: apply a canonical policy to the base model, giving the model that is scored.

A Rebuilder is made once per worker and reused for every candidate.

- unstructured / none: it keeps the base weights and one working copy, restores only the
  weights the previous candidate changed, then masks and fake-quantizes each layer;
- structured: it slices a physically smaller copy of the base model along the space's
  pruning plan (planned once, by the driver) and fake-quantizes its weights. Each sliced
  and each quantized tensor is computed once per variant (its own bits and the counts of
  the groups that cut it) and then reused from a byte-bounded cache (compress/variants.py,
  memo.py), unless the candidate is fine-tuned (then every tensor is a fresh copy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from orchestrator.compress.memo import TensorCache
from orchestrator.compress.prune import magnitude_masks
from orchestrator.compress.quantize import fake_quantize, fake_quantize_
from orchestrator.compress.structured import Slicer
from search_spaces import LayerInfo, LayerSetting, SearchSpace
from search_spaces.config import FLOAT_BITS
from search_spaces.kinds import BITS, KnobKind, kind_of, layer_act_bits

PruneStep = Callable[[LayerInfo, list[torch.Tensor], LayerSetting], list[torch.Tensor]]


def _prune_unstructured(
    layer: LayerInfo, weights: list[torch.Tensor], setting: LayerSetting
) -> list[torch.Tensor]:
    if setting.keep_count >= layer.numel:
        return weights
    masks = magnitude_masks(weights, setting.keep_count)
    return [w * m for w, m in zip(weights, masks, strict=True)]


def _prune_none(
    layer: LayerInfo, weights: list[torch.Tensor], setting: LayerSetting
) -> list[torch.Tensor]:
    return weights


# structured pruning slices instead (see `Rebuilder.__call__`); its weights are never masked
PRUNE_STEPS: dict[str, PruneStep] = {"unstructured": _prune_unstructured, "none": _prune_none,
                                     "structured": _prune_none}  # fmt: skip


class Rebuilder:
    def __init__(self, base: nn.Module, space: SearchSpace) -> None:
        self.space = space
        self.model = copy.deepcopy(base).eval()
        self._params = dict(self.model.named_parameters())
        self._params.update(self.model.named_buffers())
        self._base = {k: v.detach().clone() for k, v in self._params.items()}
        self._prune = PRUNE_STEPS[space.pruning]
        self._dirty: set[str] = set()
        weights = {layer.name: [w.key for w in layer.weights] for layer in space.profile.layers}
        # per bits knob: the weights it quantizes
        self._bits_knobs = [(k.name, [key for name in k.layers for key in weights[name]])
                            for k in space.knobs if k.kind == BITS.name]  # fmt: skip
        # knobs whose kind changes the model itself (not through the layer settings)
        self._applied = [(k, kind_of(k)) for k in space.knobs
                         if type(kind_of(k)).apply is not KnobKind.apply]  # fmt: skip
        self.cache = TensorCache()
        self._slicer = self._new_slicer()
        self._named: tuple[nn.Module, dict[str, torch.Tensor]] | None = None

    def to(self, device: torch.device | str) -> Rebuilder:
        self.model.to(device)
        self._params = dict(self.model.named_parameters())
        self._params.update(self.model.named_buffers())
        self._base = {k: v.to(device) for k, v in self._base.items()}
        self.cache.clear()
        self._slicer = self._new_slicer()  # now on `device`
        return self

    def _new_slicer(self) -> Slicer | None:
        if self.space.plan is None:
            return None
        choices = {key: self.space.by_name[knob].choices
                   for knob, keys in self._bits_knobs for key in keys}  # fmt: skip
        return Slicer(self.model, self.space.plan, reuse=True, cache=self.cache,
                      bits_choices=choices)  # fmt: skip

    def restore(self) -> None:
        """Put back every tensor a previous candidate changed (weights, BatchNorm state)."""
        if not self._dirty:  # structured rebuilds never dirty the working copy
            return
        with torch.no_grad():
            for key in self._dirty:
                self._params[key].copy_(self._base[key])
        self._dirty.clear()

    def mark_dirty(self, keys: set[str]) -> None:
        self._dirty |= keys

    def __call__(
        self,
        policy: Mapping[str, int | float],
        *,
        before_quantize: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
    ) -> nn.Module:
        """The compressed model of `policy`. `before_quantize(model, masks)` runs on the
        pruned float model (recovery fine-tuning); `masks` are the unstructured masks.
        Kinds applied outside the layer settings (`KnobKind.apply`) come last."""
        model = self._compressed(policy, before_quantize)
        for knob, kind in self._applied:
            model = kind.apply(model, self.space, knob, policy[knob.name])
        return model

    def _compressed(self, policy: Mapping[str, int | float],
                    before_quantize: Callable | None) -> nn.Module:  # fmt: skip
        self.restore()
        if self._slicer is not None:
            return self._sliced(policy, before_quantize)
        settings = self.space.layer_settings(policy)
        masks = self._mask(settings)
        if before_quantize is not None:
            before_quantize(self.model, masks)
            self._dirty.update(self._params)  # training touched every tensor
            self.model.eval()
        self._quantize(self.model, self.weight_bits(policy))
        return self.model  # in eval mode, as the base model copies are

    def _sliced(self, policy: Mapping[str, int | float],
                before_quantize: Callable | None) -> nn.Module:  # fmt: skip
        counts = self.space.channel_counts(policy)
        bits = self.weight_bits(policy)
        if before_quantize is None:  # every weight a cached variant, never written
            return self._slicer(counts, bits=bits, shared=True)
        model = self._slicer(counts)  # float tensors of its own: fine-tuning writes them
        before_quantize(model, {})
        model.eval()
        self._quantize(model, bits)
        return model

    def weight_bits(self, policy: Mapping[str, int | float]) -> dict[str, int]:
        """Bits of each weight tensor the policy quantizes, by key: a bits knob's value
        holds for its layers' weights (`SearchSpace.layer_bits`, without the float ones)."""
        bits: dict[str, int] = {}
        for knob, keys in self._bits_knobs:
            value = int(policy[knob])
            if value < FLOAT_BITS:
                bits.update(dict.fromkeys(keys, value))
        return bits

    def activation_bits(self, policy: Mapping[str, int | float]) -> dict[str, int]:
        """Bits of the layers whose activations the policy quantizes, by layer (module)
        name (orchestrator/compress/activations.py calibrates and applies them)."""
        return layer_act_bits(self.space, policy)

    @torch.no_grad()
    def _mask(self, settings: Mapping[str, LayerSetting]) -> dict[str, torch.Tensor]:
        """Magnitude masks on the working copy; returns them (for fine-tuning to keep)."""
        masks = {}
        for layer in self.space.profile.layers:
            setting = settings[layer.name]
            if setting.keep_count >= layer.numel:
                continue
            keys = [w.key for w in layer.weights]
            pruned = self._prune(layer, [self._base[k] for k in keys], setting)
            for key, value in zip(keys, pruned, strict=True):
                self._params[key].copy_(value)
                masks[key] = value != 0
            self._dirty.update(keys)
        return masks

    @torch.no_grad()
    def _quantize(self, model: nn.Module, bits: Mapping[str, int]) -> None:
        """Fake-quantize `model`'s own weights in place (key -> bits)."""
        tensors = self._tensors(model)
        for key, b in bits.items():
            tensor = tensors[key]
            if tensor.dtype == torch.float32 and tensor.is_contiguous():
                fake_quantize_(tensor.data, b)  # the rebuild owns it: no copies
            else:
                tensor.copy_(fake_quantize(tensor, b))
        if model is self.model:
            self._dirty.update(bits)

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # the working copy and the slicer's scratch model keep their Parameter objects
        if self._named is None or self._named[0] is not model:
            self._named = (model, dict(model.named_parameters()))
        return self._named[1]
