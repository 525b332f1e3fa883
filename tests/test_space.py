"""SearchSpace derivation: knobs per layer, presets, rules by name and glob, skip, tie."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from orchestrator.task import resolve_task
from search_spaces import SpaceConfig, SpaceError, derive_space, profile_model
from search_spaces.config import DEFAULT_BITS, KeepRange

CNN_LAYERS = ["features.0", "features.3", "features.7", "classifier.1", "classifier.3"]
DEFAULT_KEEP = KeepRange().choices()


@functools.cache
def _profile(task: str):
    t = resolve_task(task)
    return profile_model(t.model(), t.example_inputs())


def _derive(task: str, space: dict | None = None, **kw):
    return derive_space(_profile(task), SpaceConfig.model_validate(space or {}), **kw)


def test_keep_range_choices():
    assert DEFAULT_KEEP[0] == 0.1 and DEFAULT_KEEP[-1] == 1.0 and len(DEFAULT_KEEP) == 19
    assert KeepRange(min=0.3, max=0.9, step=0.25).choices() == (0.3, 0.55, 0.8, 0.9)


def test_cnn_profile_and_knobs():
    profile = _profile("digits-cnn")
    assert profile.family == "cnn" and profile.has_batchnorm
    assert [layer.name for layer in profile.layers] == CNN_LAYERS
    assert [layer.kind for layer in profile.layers] == ["Conv2d"] * 3 + ["Linear"] * 2
    assert profile.layer("features.3").shape == (32, 16, 3, 3)
    space = _derive("digits-cnn")
    names = [f"{kind}:{layer}" for layer in CNN_LAYERS for kind in ("bits", "keep")]
    assert [k.name for k in space.knobs] == names
    for knob in space.knobs:
        assert knob.layers == (knob.name.split(":", 1)[1],)
        assert knob.units == profile.layer(knob.layers[0]).numel
    assert space.skipped == {}
    assert space.pruning == "unstructured"


def test_cnn_preset_protects_the_first_and_last_layers_channels_not_their_bits():
    """Their bits are not narrowed (issue 12): the uniform policies stay in the space."""
    auto = _derive("digits-cnn")
    for name in ("features.0", "classifier.3"):
        assert auto.by_name[f"bits:{name}"].choices == DEFAULT_BITS
        assert min(auto.by_name[f"keep:{name}"].choices) == 0.5
    for name in ("features.3", "features.7", "classifier.1"):
        assert auto.by_name[f"bits:{name}"].choices == DEFAULT_BITS
        assert auto.by_name[f"keep:{name}"].choices == DEFAULT_KEEP
    explicit = _derive("digits-cnn", {"preset": "cnn"})
    assert explicit.knobs == auto.knobs


def test_preset_none_leaves_the_defaults_everywhere():
    space = _derive("digits-cnn", {"preset": "none"})
    for knob in space.knobs:
        assert knob.choices == (DEFAULT_BITS if knob.kind == "bits" else DEFAULT_KEEP)


def test_lstm_weights_share_one_knob():
    profile = _profile("digits-lstm")
    assert profile.family == "rnn" and not profile.has_batchnorm
    lstm = profile.layer("lstm")
    assert lstm.kind == "LSTM"
    assert [w.key for w in lstm.weights] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    assert [w.shape for w in lstm.weights] == [(256, 8), (256, 64)]
    space = _derive("digits-lstm")
    assert [k.name for k in space.knobs] == ["bits:lstm", "keep:lstm", "bits:head", "keep:head"]
    assert space.by_name["keep:lstm"].units == 256 * 8 + 256 * 64
    assert space.by_name["bits:lstm"].choices == DEFAULT_BITS  # the rnn preset narrows no bits
    assert space.by_name["bits:head"].choices == DEFAULT_BITS
    assert min(space.by_name["keep:head"].choices) == 0.5


def test_rule_by_exact_name():
    space = _derive("digits-cnn", {"rules": [{"layers": "classifier.1", "bits": [8, 4],
                                              "keep": [1.0, 0.5]}]})  # fmt: skip
    assert space.by_name["bits:classifier.1"].choices == (4, 8)  # sorted
    assert space.by_name["keep:classifier.1"].choices == (0.5, 1.0)
    assert space.by_name["bits:features.3"].choices == DEFAULT_BITS  # others untouched


def test_rule_by_glob_and_later_rules_win():
    space = _derive("digits-cnn", {"preset": "none", "rules": [
        {"layers": "features.*", "bits": [2, 4]},
        {"layers": "features.7", "bits": [8]},
        {"layers": ["classifier.?"], "keep": {"min": 0.5, "max": 1.0, "step": 0.25}},
    ]})  # fmt: skip
    assert space.by_name["bits:features.0"].choices == (2, 4)
    assert space.by_name["bits:features.3"].choices == (2, 4)
    assert space.by_name["bits:features.7"].choices == (8,)
    assert not space.by_name["bits:features.7"].searchable
    assert space.by_name["keep:features.7"] in space.searchable
    assert space.by_name["keep:classifier.1"].choices == (0.5, 0.75, 1.0)
    assert space.by_name["keep:classifier.3"].choices == (0.5, 0.75, 1.0)


def test_skip_leaves_the_layer_out_and_lists_it():
    space = _derive("digits-cnn", {"rules": [{"layers": ["features.0", "classifier.3"],
                                              "skip": True}]})  # fmt: skip
    assert set(space.skipped) == {"features.0", "classifier.3"}
    names = {k.name for k in space.knobs}
    assert not names & {"bits:features.0", "keep:features.0", "bits:classifier.3",
                        "keep:classifier.3"}  # fmt: skip
    assert "bits:features.3" in names
    settings_ = space.layer_settings({k.name: min(k.choices) for k in space.knobs})
    assert settings_["features.0"].bits == 32
    assert settings_["features.0"].keep_count == _profile("digits-cnn").layer("features.0").numel
    assert settings_["features.3"].bits == 2


def test_tie_shares_one_knob():
    space = _derive("digits-cnn", {"rules": [{"layers": ["features.3", "features.7"],
                                              "tie": "mid"}]})  # fmt: skip
    names = [k.name for k in space.knobs]
    assert "bits:mid" in names and "keep:mid" in names
    assert not {"bits:features.3", "bits:features.7", "keep:features.7"} & set(names)
    assert space.by_name["bits:mid"].layers == ("features.3", "features.7")
    assert space.by_name["keep:mid"].units == 9216  # the largest member
    values = {k.name: max(k.choices) for k in space.knobs} | {"bits:mid": 3, "keep:mid": 0.25}
    settings_ = space.layer_settings(values)
    assert settings_["features.3"].bits == settings_["features.7"].bits == 3
    assert (settings_["features.3"].keep_count, settings_["features.7"].keep_count) == (1152, 2304)


def test_tie_of_layers_with_different_choices_is_refused():
    with pytest.raises(SpaceError, match="tie 'edge'"):
        _derive("digits-cnn", {"rules": [{"layers": ["features.0", "features.3"], "tie": "edge"}]})


def test_pruning_none_has_no_keep_knobs():
    space = _derive("digits-lstm", pruning="none")
    assert [k.kind for k in space.knobs] == ["bits", "bits"]
    settings_ = space.layer_settings({"bits:lstm": 4, "bits:head": 8})
    assert settings_["lstm"].keep_count == 18432


def test_rule_matching_no_layer_names_the_layers():
    with pytest.raises(SpaceError) as exc:
        _derive("digits-cnn", {"rules": [{"layers": "conv*", "bits": [4]}]})
    msg = str(exc.value)
    assert "space.rules[0]" in msg and "conv*" in msg and "matches no layer" in msg
    assert all(name in msg for name in CNN_LAYERS)


def test_a_misspelled_name_beside_a_good_one_is_refused_with_a_suggestion():
    with pytest.raises(SpaceError, match=r"space.rules\[1\].layers: 'featurs.3' matches no layer "
                       r"\(did you mean 'features.3'\?\)"):  # fmt: skip
        _derive("digits-cnn", {"rules": [{"layers": "features.*", "bits": [4, 8]},
                                         {"layers": ["features.0", "featurs.3"], "bits": [8]}]})  # fmt: skip


def test_rnn_selector_on_a_cnn_matches_nothing():
    with pytest.raises(SpaceError, match=r"\$rnn"):
        _derive("digits-cnn", {"rules": [{"layers": "$rnn", "bits": [4, 8]}]})


@pytest.mark.parametrize(
    "space",
    [
        {"rules": [{"layers": "*", "skip": True}]},
        {"preset": "none", "bits": [8], "keep": [1.0]},  # one choice everywhere
        {"rules": [{"layers": "*", "bits": [32], "keep": [1.0]}]},
    ],
)
def test_empty_space_is_refused(space):
    with pytest.raises(SpaceError, match="search space is empty"):
        _derive("digits-cnn", space)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(SpaceError) as exc:
        _derive("digits-cnn", {"preset": "transformer"})
    assert "transformer" in str(exc.value)
    assert all(p in str(exc.value) for p in ("cnn", "mlp", "rnn"))


def test_mlp_family_and_preset():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))  # fmt: skip
    profile = profile_model(model, torch.zeros(1, 8))
    assert profile.family == "mlp"
    space = derive_space(profile)
    assert space.by_name["bits:0"].choices == DEFAULT_BITS
    assert space.by_name["bits:2"].choices == DEFAULT_BITS
    assert space.by_name["keep:4"].choices[0] == 0.5


def test_unused_layer_gets_no_knob():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    profile = profile_model(WithSpare(), torch.zeros(1, 4))
    assert [layer.name for layer in profile.layers] == ["used"]
    # the spare layer's weight is still in the file: it counts in other_bytes
    assert profile.float_bytes == sum(
        t.numel() * t.element_size() for t in WithSpare().state_dict().values()
    )


def test_space_to_dict_is_json_and_profile_round_trips():
    space = _derive("digits-lstm")
    data = json.loads(json.dumps(space.to_dict()))
    assert [k["name"] for k in data["knobs"]] == [k.name for k in space.knobs]
    assert type(space.profile).from_dict(data["profile"]) == space.profile


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"bits": [1]}, "not a bit width"),
        ({"bits": [17]}, "not a bit width"),
        ({"bits": []}, "at least one choice"),
        ({"keep": [0.0]}, "outside (0, 1]"),
        ({"keep": {"min": 0.5, "max": 0.4}}, "0 < min <= max <= 1"),
        ({"keep": {"step": 0}}, "step must be positive"),
        ({"rules": [{"layers": "x", "bits": [3, 40]}]}, "not a bit width"),
        ({"rules": [{"layers": "x", "skp": True}]}, "skp"),
    ],
)
def test_bad_space_config_is_a_validation_error(space, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpaceConfig.model_validate(space)
