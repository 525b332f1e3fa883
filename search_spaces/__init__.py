"""How knobs are derived from a model: profiling, rules, presets per model family."""

from search_spaces.config import KeepRange, Rule, SpaceConfig
from search_spaces.errors import SpaceError
from search_spaces.profile import LayerInfo, ModelProfile, WeightInfo, profile_model
from search_spaces.space import Knob, LayerSetting, SearchSpace, derive_space

__all__ = [
    "KeepRange", "Knob", "LayerInfo", "LayerSetting", "ModelProfile", "Rule", "SearchSpace",
    "SpaceConfig", "SpaceError", "WeightInfo", "derive_space", "profile_model",
]  # fmt: skip
