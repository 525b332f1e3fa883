"""Rebuild: apply a canonical policy to the base model, giving the model that is scored.

A Rebuilder is made once per worker and reused for every candidate.

- unstructured / none: it keeps the base weights and one working copy, restores only the
  weights the previous candidate changed, then masks and fake-quantizes each layer;
- structured: it slices a physically smaller copy of the base model along the space's
  pruning plan (planned once, by the driver) and fake-quantizes its weights. Each sliced
  and each quantized tensor is computed once per variant (its own bits and the counts of
  the groups that cut it) and then reused from a byte-bounded cache (compress/memo.py),
  unless the candidate is fine-tuned (then every tensor is a fresh copy).
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
        self.cache = TensorCache()
        self._slicer = self._new_slicer()
        self._named: tuple[nn.Module, dict[str, torch.Tensor], list[nn.RNNBase]] | None = None

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
        return Slicer(self.model, self.space.plan, reuse=True, cache=self.cache)

    def restore(self) -> None:
        """Put back every tensor a previous candidate changed (weights, BatchNorm state)."""
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
        pruned float model (recovery fine-tuning); `masks` are the unstructured masks."""
        self.restore()
        settings = self._settings(policy)
        # shared: parameters are cached tensors, never written; fine-tuning writes them
        shared = self._slicer is not None and before_quantize is None
        if self._slicer is not None:
            model = self._slicer(self.space.channel_counts(policy), shared=shared)
            masks: dict[str, torch.Tensor] = {}
        else:
            model, masks = self.model, self._mask(settings)
        if before_quantize is not None:
            before_quantize(model, masks)
            if model is self.model:
                self._dirty.update(self._params)  # training touched every tensor
            model.eval()
        if shared:
            self._quantize_shared(model, settings)
        else:
            self._quantize(model, settings)
        return model  # in eval mode, as the base model copies are

    def _settings(self, policy: Mapping[str, int | float]) -> Mapping[str, LayerSetting]:
        if self.space.plan is None:
            return self.space.layer_settings(policy)
        # sliced models need only the bits (their shapes come from the slicer)
        bits = self.space.layer_bits(policy)
        return {name: LayerSetting(bits=b, keep_count=0) for name, b in bits.items()}

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
    def _quantize_shared(self, model: nn.Module, settings: Mapping[str, LayerSetting]) -> None:
        """Point each quantized weight at its cached fake-quantized variant."""
        tensors = self._tensors(model)
        states = self._slicer.states
        for layer in self.space.profile.layers:
            bits = settings[layer.name].bits
            if bits >= FLOAT_BITS:
                continue
            for w in layer.weights:
                param = tensors[w.key]
                key = ("quant", w.key, states.get(w.key, ()), bits)
                quantized = self.cache.get(key)
                if quantized is None:
                    quantized = self.cache.put(key, fake_quantize(param.data, bits))
                param.data = quantized
        for module in self._rnns(model):  # cuDNN keeps RNN weights in one flat buffer
            if module.weight_hh_l0.is_cuda:  # elsewhere it holds the same Parameters
                module._init_flat_weights()

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # the working copy and the slicer's scratch model keep their Parameter objects
        if self._named is None or self._named[0] is not model:
            rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
            self._named = (model, dict(model.named_parameters()), rnns)
        return self._named[1]

    def _rnns(self, model: nn.Module) -> list[nn.RNNBase]:
        self._tensors(model)
        return self._named[2]

    @torch.no_grad()
    def _quantize(self, model: nn.Module, settings: Mapping[str, LayerSetting]) -> None:
        tensors = self._tensors(model)
        for layer in self.space.profile.layers:
            bits = settings[layer.name].bits
            if bits >= FLOAT_BITS:
                continue
            for w in layer.weights:
                tensor = tensors[w.key]
                if tensor.dtype == torch.float32 and tensor.is_contiguous():
                    fake_quantize_(tensor.data, bits)  # the rebuild owns it: no copies
                else:
                    tensor.copy_(fake_quantize(tensor, bits))
            if model is self.model:
                self._dirty.update(w.key for w in layer.weights)
