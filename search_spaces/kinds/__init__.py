"""Knob kinds (issue 13): one module per kind; the rest of the code iterates over KINDS.
See base.py for what a kind provides and how to add one."""

# import order is registration order, which is knob order
# isort: off
from search_spaces.kinds.base import KINDS, KnobKind, Targets, kind_of, reference_values, register
from search_spaces.kinds.bits import BITS, layer_bits
from search_spaces.kinds.act_bits import ACT_BITS, layer_act_bits
from search_spaces.kinds.keep import KEEP, channel_counts, layer_keeps, round_count
# isort: on

__all__ = [
    "ACT_BITS", "BITS", "KEEP", "KINDS", "KnobKind", "Targets", "channel_counts", "kind_of",
    "layer_act_bits", "layer_bits", "layer_keeps", "reference_values", "register", "round_count",
]  # fmt: skip
