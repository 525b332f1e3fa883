"""Cost model: pure functions from (profile, policy) to size_bytes, macs and bops.

Property tests run over random profiles built directly (no torch model) and over the
real digits-cnn / digits-lstm spaces; known answers are computed by hand. size_bytes is
the model file's size: the payload (the tensors) plus the file's header, whose exact
bytes are checked against what safetensors itself writes.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from orchestrator.task import resolve_task
from search_spaces import (
    LayerInfo,
    LayerSetting,
    ModelProfile,
    SearchSpace,
    SpaceConfig,
    WeightInfo,
    derive_space,
    profile_model,
)
from search_spaces.cost import (
    ACTIVATION_BITS,
    FILE_ENTRY,
    FILE_FORMAT,
    SCALE_BYTES,
    cost_of_settings,
    file_bytes,
    file_header,
    header_bytes,
    layer_bytes,
    policy_cost,
)
from search_spaces.policy import Policy

FEW = settings(max_examples=80, deadline=None)
QUANT_BITS = tuple(range(2, 17))
ALL_BITS = (*QUANT_BITS, 32)
TASKS = ("digits-cnn", "digits-lstm")


@functools.cache
def _digits(name: str):
    task = resolve_task(name)
    model = task.model()
    profile = profile_model(model, task.example_inputs())
    return model, profile, derive_space(profile)


# ---------------------------------------------------------------- random profiles

_dims = st.integers(1, 12)
_shapes = st.one_of(
    st.tuples(_dims, _dims),  # Linear
    st.tuples(_dims, _dims, st.integers(1, 3), st.integers(1, 3)),  # Conv2d
)


@st.composite
def layers(draw, name: str = "l0") -> LayerInfo:
    shapes = draw(st.lists(_shapes, min_size=1, max_size=2))  # two weights: LSTM-like
    weights = tuple(WeightInfo(key=f"{name}.w{i}", shape=s) for i, s in enumerate(shapes))
    return LayerInfo(name=name, kind=draw(st.sampled_from(["Linear", "Conv2d", "LSTM"])),
                     weights=weights, uses=draw(st.integers(1, 64)),
                     dtype_bytes=draw(st.sampled_from([2, 4, 8])))  # fmt: skip


@st.composite
def profiles(draw) -> ModelProfile:
    n = draw(st.integers(1, 4))
    return ModelProfile(layers=tuple(draw(layers(f"l{i}")) for i in range(n)),
                        other_bytes=draw(st.integers(0, 5000)), has_batchnorm=False,
                        family="mlp")  # fmt: skip


@st.composite
def settings_for(draw, profile: ModelProfile, bits=ALL_BITS) -> dict[str, LayerSetting]:
    return {
        layer.name: LayerSetting(bits=draw(st.sampled_from(bits)),
                                 keep_count=draw(st.integers(1, layer.numel)))
        for layer in profile.layers
    }  # fmt: skip


def _space(profile: ModelProfile) -> SearchSpace:
    return SearchSpace(profile=profile, knobs=(), pruning="unstructured")


@FEW
@given(data=st.data())
def test_fewer_quantized_bits_never_increase_size_or_bops(data):
    profile = data.draw(profiles())
    settings_ = data.draw(settings_for(profile, QUANT_BITS))
    name = data.draw(st.sampled_from([layer.name for layer in profile.layers]))
    lower = data.draw(st.sampled_from([b for b in QUANT_BITS if b <= settings_[name].bits]))
    fewer = {**settings_, name: LayerSetting(bits=lower, keep_count=settings_[name].keep_count)}
    before, after = (cost_of_settings(_space(profile), s) for s in (settings_, fewer))
    assert after.size_bytes <= before.size_bytes
    assert after.bops <= before.bops
    assert after.macs == before.macs  # bits never change the multiply count


def _linear(rows: int, cols: int, dtype_bytes: int = 4) -> LayerInfo:
    return LayerInfo(name="fc", kind="Linear", weights=(WeightInfo(key="fc.weight",
                     shape=(rows, cols)),), uses=1, dtype_bytes=dtype_bytes)  # fmt: skip


@FEW
@example(layer=_linear(10, 64), keep_count=1, high=32, low=8)  # 4+80 B float, 1+40+80 B at 8
@example(layer=_linear(10, 1, dtype_bytes=2), keep_count=10, high=32, low=8)  # float16 model
@given(
    layer=layers(),
    keep_count=st.integers(1, 10**6),
    high=st.one_of(st.just(32), st.sampled_from(ALL_BITS)),
    low=st.sampled_from(ALL_BITS),
)
def test_fewer_bits_never_increase_size_even_from_float(layer, keep_count, high, low):
    """Size is monotone (cost.py): fewer bits never increases size, including float (32) -> quantized.

    Quantizing adds one float32 scale per row; with few kept elements (or small rows, or
    a float16 model) that overhead can exceed what the narrower values save.
    """
    keep_count = min(keep_count, layer.numel)
    low = min(low, high)
    size = {b: layer_bytes(layer, LayerSetting(bits=b, keep_count=keep_count)) for b in (low, high)}
    assert size[low] <= size[high], (layer, keep_count, size)


@FEW
@given(data=st.data())
def test_lower_keep_never_increases_macs_or_bops(data):
    profile = data.draw(profiles())
    settings_ = data.draw(settings_for(profile))
    name = data.draw(st.sampled_from([layer.name for layer in profile.layers]))
    less = data.draw(st.integers(1, settings_[name].keep_count))
    pruned = {**settings_, name: LayerSetting(bits=settings_[name].bits, keep_count=less)}
    before, after = (cost_of_settings(_space(profile), s) for s in (settings_, pruned))
    assert after.macs <= before.macs
    assert after.bops <= before.bops


@FEW
@given(data=st.data())
def test_lower_keep_never_increases_size_among_pruned_layers(data):
    """Below keep 1.0 the bitmap is always paid: fewer kept elements never cost more."""
    layer = data.draw(layers().filter(lambda lay: lay.numel > 1))
    bits = data.draw(st.sampled_from(ALL_BITS))
    high = data.draw(st.integers(1, layer.numel - 1))
    low = data.draw(st.integers(1, high))
    sizes = [layer_bytes(layer, LayerSetting(bits=bits, keep_count=k)) for k in (low, high)]
    assert sizes[0] <= sizes[1]


@FEW
@example(layer=_linear(10, 64), bits=8, high=640, low=639)  # 640+40 B, then 639+40+80 B
@given(
    layer=layers(),
    bits=st.sampled_from(ALL_BITS),
    high=st.integers(1, 10**6),
    low=st.integers(1, 10**6),
)
def test_lower_keep_never_increases_size(layer, bits, high, low):
    """Size is monotone (cost.py): lower keep never increases size, including from keep 1.0 (no bitmap)
    to just below it (a bitmap of numel/8 bytes that the few dropped values do not pay for).
    """
    high = min(high, layer.numel)
    low = min(low, high)
    sizes = [layer_bytes(layer, LayerSetting(bits=bits, keep_count=k)) for k in (low, high)]
    assert sizes[0] <= sizes[1], (layer, bits, low, high, sizes)


@FEW
@given(profile=profiles())
def test_float_unpruned_size_is_the_profiles_float_bytes(profile):
    full = {layer.name: LayerSetting(bits=32, keep_count=layer.numel) for layer in profile.layers}
    cost = cost_of_settings(_space(profile), full)
    assert cost.size_bytes == file_bytes(profile.float_bytes)
    assert cost.size_bytes - header_bytes(profile.float_bytes) == profile.other_bytes + sum(
        w.numel * layer.dtype_bytes for layer in profile.layers for w in layer.weights
    )
    assert cost.macs == sum(layer.numel * layer.uses for layer in profile.layers)
    assert cost.bops == cost.macs * 32 * ACTIVATION_BITS


@FEW
@given(layer=layers(), data=st.data())
def test_layer_bytes_formula(layer, data):
    """Packed codes + one float32 scale per row (+ a bitmap when pruned), wherever that is
    the compact encoding (at the extremes float values, or no bitmap, can be smaller)."""
    bits = data.draw(st.sampled_from(QUANT_BITS))
    kept = data.draw(st.integers(1, layer.numel))
    scales = layer.rows * SCALE_BYTES
    bitmap = math.ceil(layer.numel / 8) if kept < layer.numel else 0
    expected = math.ceil(kept * bits / 8) + scales + bitmap
    others = (
        layer.numel * layer.dtype_bytes,
        kept * layer.dtype_bytes + bitmap,
        math.ceil(layer.numel * bits / 8) + scales,
    )  # dense float, sparse float, dense codes
    assume(expected <= min(others))
    assert layer_bytes(layer, LayerSetting(bits=bits, keep_count=kept)) == expected


# ---------------------------------------------------------------- real spaces


def _policies(space: SearchSpace):
    return st.fixed_dictionaries({k.name: st.sampled_from(k.choices) for k in space.knobs})


def _lower(data, space: SearchSpace, values: dict, kind: str) -> dict:
    knob = data.draw(st.sampled_from([k for k in space.knobs if k.kind == kind]))
    lower = data.draw(st.sampled_from([c for c in knob.choices if c <= values[knob.name]]))
    return {**values, knob.name: lower}


@pytest.mark.parametrize("task", TASKS)
@FEW
@given(data=st.data())
def test_real_space_fewer_bits_never_increase_size_or_bops(task, data):
    _, _, space = _digits(task)
    values = data.draw(_policies(space))
    fewer = _lower(data, space, values, "bits")
    before = policy_cost(space, Policy.from_values(space, values))
    after = policy_cost(space, Policy.from_values(space, fewer))
    assert after.size_bytes <= before.size_bytes
    assert after.bops <= before.bops
    assert after.macs == before.macs


@pytest.mark.parametrize("task", TASKS)
@FEW
@given(data=st.data())
def test_real_space_lower_keep_never_increases_macs(task, data):
    _, _, space = _digits(task)
    values = data.draw(_policies(space))
    less = _lower(data, space, values, "keep")
    before = policy_cost(space, Policy.from_values(space, values))
    after = policy_cost(space, Policy.from_values(space, less))
    assert after.macs <= before.macs
    assert after.bops <= before.bops


@pytest.mark.parametrize("task", TASKS)
@FEW
@given(data=st.data())
def test_real_space_lower_keep_never_increases_size(task, data):
    _, _, space = _digits(task)
    values = data.draw(_policies(space))
    less = _lower(data, space, values, "keep")
    before = policy_cost(space, Policy.from_values(space, values))
    after = policy_cost(space, Policy.from_values(space, less))
    assert after.size_bytes <= before.size_bytes, (values, less)


@pytest.mark.parametrize("task", TASKS)
def test_float_policy_costs_exactly_the_state_dict(task):
    model, profile, space = _digits(task)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cost = policy_cost(space, Policy.uniform(space, 32, 1.0))
    assert profile.float_bytes == state_bytes
    assert cost.size_bytes == file_bytes(state_bytes) == state_bytes + header_bytes(state_bytes)


@pytest.mark.parametrize(
    ("task", "macs"),
    [
        # conv 16x1x3x3 and 32x16x3x3 at 8x8 positions, 32x32x3x3 at 4x4, then 512->64, 64->10
        ("digits-cnn", 144 * 64 + 4608 * 64 + 9216 * 16 + 512 * 64 + 64 * 10),
        # 8 steps of (256x8 input + 256x64 recurrent) gate weights, then 64->10
        ("digits-lstm", 8 * (256 * 8 + 256 * 64) + 64 * 10),
    ],
)
def test_float_macs_counted_by_hand(task, macs):
    _, _, space = _digits(task)
    cost = policy_cost(space, Policy.uniform(space, 32, 1.0))
    assert cost.macs == macs
    assert cost.bops == macs * 32 * 32


@pytest.mark.parametrize("task", TASKS)
def test_uniform_baselines_shrink_with_bits(task):
    _, profile, space = _digits(task)
    sizes = [policy_cost(space, Policy.uniform(space, b)).size_bytes for b in (32, 8, 4, 2)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    assert sizes[0] == file_bytes(profile.float_bytes)


# ---------------------------------------------------------------- a case by hand


@functools.cache
def _one_linear() -> SearchSpace:
    model = nn.Sequential(nn.Linear(64, 10))  # weight 10x64, bias 10 float32
    profile = profile_model(model, torch.zeros(1, 64))
    return derive_space(profile, SpaceConfig(preset="none"))


@pytest.mark.parametrize(
    ("bits", "keep", "size"),
    [
        (4, 1.0, math.ceil(640 * 4 / 8) + 10 * 4 + 10 * 4),
        (4, 0.5, math.ceil(320 * 4 / 8) + 10 * 4 + math.ceil(640 / 8) + 10 * 4),
        (3, 0.3, math.ceil(192 * 3 / 8) + 10 * 4 + math.ceil(640 / 8) + 10 * 4),
        (3, 213 / 640, math.ceil(213 * 3 / 8) + 10 * 4 + math.ceil(640 / 8) + 10 * 4),
        (32, 1.0, 640 * 4 + 10 * 4),
        (32, 0.25, 160 * 4 + math.ceil(640 / 8) + 10 * 4),
    ],
)
def test_one_linear_by_hand(bits, keep, size):
    space = _one_linear()
    assert [k.name for k in space.knobs] == ["bits:0", "keep:0"]
    cost = policy_cost(space, Policy.from_values(space, {"bits:0": bits, "keep:0": keep}))
    kept = round(keep * 640)
    assert cost.size_bytes == size + 128  # a payload of 3 to 6 digits: a 128-byte header
    assert cost.macs == kept  # one use per weight element for a batch of one
    assert cost.bops == kept * bits * ACTIVATION_BITS


def test_as_dict_names_the_trial_columns():
    space = _one_linear()
    cost = policy_cost(space, Policy.uniform(space, 8))
    assert cost.as_dict() == {"size_bytes": 640 + 40 + 40 + 128, "macs": 640, "bops": 640 * 8 * 32,
                              "params": 640 + 10}  # fmt: skip


# ---------------------------------------------------------------- the model file's header


def _safetensors_file(payload: int) -> bytes:
    """What safetensors itself writes for the model file's one uint8 entry."""
    from safetensors.torch import save

    return save({FILE_ENTRY: torch.zeros(payload, dtype=torch.uint8)},
                metadata={"format": FILE_FORMAT})  # fmt: skip


@settings(max_examples=60, deadline=None)
@example(payload=0)
@example(payload=99)
@example(payload=100)
@example(payload=999_999)
@example(payload=1_000_000)
@given(payload=st.integers(0, 2_000_000))
def test_header_is_byte_for_byte_what_safetensors_writes(payload):
    """The cost model's header term is the real header: the file is exactly file_bytes."""
    data = _safetensors_file(payload)
    assert len(data) == file_bytes(payload) == payload + header_bytes(payload)
    assert data[: header_bytes(payload)] == file_header(payload)


@pytest.mark.parametrize(
    ("payload", "header"),
    # 8 length bytes + the 108-character index + 2 x the payload's digits, padded to 8
    [(0, 120), (99, 120), (100, 128), (999_999, 128), (10**6, 136), (10**9, 136),
     (10**10, 144)],
)  # fmt: skip
def test_header_bytes_by_hand(payload, header):
    assert header_bytes(payload) == header


@given(st.integers(0, 10**15), st.integers(0, 10**15))
def test_header_never_shrinks_and_file_bytes_strictly_grow(a, b):
    """What keeps size monotone in bits and keep: a smaller payload is a smaller file."""
    low, high = min(a, b), max(a, b)
    assert header_bytes(low) <= header_bytes(high) <= 152
    assert header_bytes(low) % 8 == 0
    if low < high:
        assert file_bytes(low) < file_bytes(high)


@FEW
@given(data=st.data())
def test_size_is_the_payload_plus_its_header(data):
    """Every layer's encoding and every other tensor, plus the header of their total."""
    profile = data.draw(profiles())
    settings_ = data.draw(settings_for(profile))
    payload = profile.other_bytes + sum(
        layer_bytes(layer, settings_[layer.name]) for layer in profile.layers
    )
    cost = cost_of_settings(_space(profile), settings_)
    assert cost.size_bytes == payload + header_bytes(payload)
