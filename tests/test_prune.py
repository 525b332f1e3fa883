"""Magnitude masks, and the Rebuilder applying policies to the real digits-cnn model."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.compress.prune import magnitude_masks
from orchestrator.compress.quantize import fake_quantize
from orchestrator.compress.rebuild import Rebuilder
from orchestrator.task import resolve_task
from search_spaces import SpaceConfig, derive_space, profile_model
from search_spaces.policy import Policy

FEW = settings(max_examples=80, deadline=None)


@st.composite
def tensor_lists(draw) -> list[torch.Tensor]:
    n = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ties = draw(st.booleans())
    out = []
    for _ in range(n):
        shape = draw(st.sampled_from([(5,), (3, 4), (2, 3, 2), (1, 1)]))
        t = torch.randn(shape, generator=gen)
        out.append(torch.round(t * 2) if ties else t)  # few distinct magnitudes: many ties
    return out


@FEW
@given(ws=tensor_lists(), data=st.data())
def test_masks_keep_exactly_the_largest_magnitudes_over_all_tensors(ws, data):
    total = sum(w.numel() for w in ws)
    keep = data.draw(st.integers(0, total))
    masks = magnitude_masks(ws, keep)
    assert [m.shape for m in masks] == [w.shape for w in ws]
    assert all(m.dtype == torch.bool for m in masks)
    assert sum(int(m.sum()) for m in masks) == keep
    kept = torch.cat([w[m].abs().reshape(-1) for w, m in zip(ws, masks, strict=True)])
    dropped = torch.cat([w[~m].abs().reshape(-1) for w, m in zip(ws, masks, strict=True)])
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()


@FEW
@given(ws=tensor_lists(), data=st.data())
def test_masks_are_deterministic_and_break_ties_by_position(ws, data):
    total = sum(w.numel() for w in ws)
    keep = data.draw(st.integers(0, total))
    first = magnitude_masks(ws, keep)
    again = magnitude_masks([w.clone() for w in ws], keep)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    flat_w = torch.cat([w.reshape(-1).abs() for w in ws])
    flat_m = torch.cat([m.reshape(-1) for m in first])
    if 0 < keep < total:  # among equal magnitudes at the threshold, earlier ones are kept
        threshold = flat_w[flat_m].min()
        at = (flat_w == threshold).nonzero()[:, 0]
        kept_at = flat_m[at]
        assert torch.equal(kept_at, torch.sort(kept_at, descending=True, stable=True).values)


def test_masks_by_hand():
    a, b = torch.tensor([1.0, -3.0, 2.0]), torch.tensor([[3.0, 0.5]])
    ma, mb = magnitude_masks([a, b], 2)
    assert ma.tolist() == [False, True, False] and mb.tolist() == [[True, False]]
    (m,) = magnitude_masks([torch.ones(4)], 2)
    assert m.tolist() == [True, True, False, False]
    (m,) = magnitude_masks([torch.tensor([-1.0, 1.0, 1.0, -1.0])], 3)
    assert m.tolist() == [True, True, True, False]


# ---------------------------------------------------------------- Rebuilder


@functools.cache
def _cnn():
    task = resolve_task("digits-cnn")
    model = task.model()
    profile = profile_model(model, task.example_inputs())
    return model, profile


def _float_pruned(space, keep: float) -> Policy:
    return Policy.from_values(
        space, {k.name: (32 if k.kind == "bits" else keep) for k in space.knobs}
    )


def _weights(model, layer) -> list[torch.Tensor]:
    state = model.state_dict()
    return [state[w.key] for w in layer.weights]


@pytest.mark.parametrize("keep", [0.1, 0.55, 0.95])
def test_rebuild_keeps_exactly_keep_count_largest_weights(keep):
    base, profile = _cnn()
    space = derive_space(profile, SpaceConfig(preset="none"))
    for layer in profile.layers:  # precondition: the counts below are exact
        assert all(int((w == 0).sum()) == 0 for w in _weights(base, layer))
    rebuild = Rebuilder(base, space)
    policy = _float_pruned(space, keep)
    model = rebuild(policy)
    settings_ = space.layer_settings(policy)
    for layer in profile.layers:
        got, orig = _weights(model, layer), _weights(base, layer)
        assert sum(int((g != 0).sum()) for g in got) == settings_[layer.name].keep_count
        for g, o in zip(got, orig, strict=True):
            assert torch.equal(g[g != 0], o[g != 0])  # kept weights are untouched in float
        kept = torch.cat([o[g != 0].abs() for g, o in zip(got, orig, strict=True)])
        dropped = torch.cat([o[g == 0].abs() for g, o in zip(got, orig, strict=True)])
        assert kept.min() >= dropped.max()


def test_rebuild_prunes_then_quantizes_each_layer():
    base, profile = _cnn()
    space = derive_space(profile, SpaceConfig(preset="none"))
    policy = Policy.uniform(space, 4, 0.5)
    model = Rebuilder(base, space)(policy)
    settings_ = space.layer_settings(policy)
    for layer in profile.layers:
        orig = _weights(base, layer)
        masks = magnitude_masks(orig, settings_[layer.name].keep_count)
        for got, o, m in zip(_weights(model, layer), orig, masks, strict=True):
            assert torch.equal(got, fake_quantize(o * m, 4))
            assert not torch.any(got[~m])  # pruned stays pruned after quantization


def test_float_policy_after_a_candidate_restores_the_base_exactly():
    base, profile = _cnn()
    space = derive_space(profile, SpaceConfig(preset="none"))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    rebuild = Rebuilder(base, space)
    changed = rebuild(Policy.uniform(space, 2, 0.1)).state_dict()
    assert any(not torch.equal(changed[k], base_state[k]) for k in base_state)
    rebuild(Policy.uniform(space, 3, 0.3))
    restored = rebuild(Policy.uniform(space, 32, 1.0)).state_dict()
    assert restored.keys() == base_state.keys()
    assert all(torch.equal(restored[k], base_state[k]) for k in base_state)
    # the base model itself was never touched
    assert all(torch.equal(base.state_dict()[k], base_state[k]) for k in base_state)


def test_same_policy_twice_gives_the_same_weights():
    base, profile = _cnn()
    space = derive_space(profile)
    rebuild = Rebuilder(base, space)
    policy = Policy.uniform(space, 4, 0.6)
    first = {k: v.clone() for k, v in rebuild(policy).state_dict().items()}
    rebuild(Policy.uniform(space, 8, 0.2))
    second = rebuild(policy).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_skipped_layer_is_left_in_float():
    base, profile = _cnn()
    cfg = SpaceConfig.model_validate({"rules": [{"layers": "features.0", "skip": True}]})
    space = derive_space(profile, cfg)
    model = Rebuilder(base, space)(Policy.uniform(space, 2, 0.1))
    key = profile.layer("features.0").weights[0].key
    assert torch.equal(model.state_dict()[key], base.state_dict()[key])
    key3 = profile.layer("features.3").weights[0].key
    assert not torch.equal(model.state_dict()[key3], base.state_dict()[key3])
