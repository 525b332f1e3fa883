"""nn.MultiheadAttention with heads cut: HeadCutAttention computes what torch's module
computes, and cutting a head is the same as silencing it (its out_proj columns at zero)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from search_spaces.layers.attention import HeadCutAttention
from search_spaces.policy import Policy
from tests.test_structured import _space

E, HEADS, L, S, N = 16, 4, 5, 7, 3


def _pair(**kwargs):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, **kwargs).eval()
    cut = copy.deepcopy(mha)
    cut.__class__ = HeadCutAttention  # every head kept: must compute the same
    return mha, cut


def _inputs(batch_first, kdim=E, vdim=E, unbatched=False):
    torch.manual_seed(1)

    def seq(length, width):
        if unbatched:
            return torch.randn(length, width)
        return torch.randn(N, length, width) if batch_first else torch.randn(length, N, width)

    return seq(L, E), seq(S, kdim), seq(S, vdim)


MASKS = {
    "none": lambda: {},
    "bool attn_mask": lambda: {"attn_mask": torch.rand(L, S) > 0.7},
    "float attn_mask": lambda: {"attn_mask": torch.randn(L, S)},
    "per-head attn_mask": lambda: {"attn_mask": torch.randn(N * HEADS, L, S)},
    "key_padding_mask": lambda: {"key_padding_mask": torch.arange(S).expand(N, S) >= S - 2},
    "both": lambda: {
        "attn_mask": torch.randn(L, S),
        "key_padding_mask": torch.arange(S).expand(N, S) >= S - 1,
    },  # fmt: skip
}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, "both"
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("layout", ["batch_first", "sequence_first", "separate_kv", "no_bias"])
def test_head_cut_attention_computes_what_torch_computes(layout, need_weights, mask):
    kwargs = {"batch_first": layout != "sequence_first"}
    if layout == "separate_kv":
        kwargs.update(kdim=12, vdim=10)
    if layout == "no_bias":
        kwargs["bias"] = False
    mha, cut = _pair(**kwargs)
    q, k, v = _inputs(kwargs["batch_first"], kwargs.get("kdim", E), kwargs.get("vdim", E))
    args = MASKS[mask]()
    with torch.no_grad():
        expected, expected_weights = mha(q, k, v, need_weights=need_weights, **args)
        out, weights = cut(q, k, v, need_weights=need_weights, **args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5, equal_nan=True)
    else:
        assert weights is None


def test_head_cut_attention_per_head_weights_unbatched_and_causal():
    mha, cut = _pair(batch_first=True)
    q, k, v = _inputs(True, unbatched=True)
    with torch.no_grad():
        for args in ({"average_attn_weights": False}, {}):
            expected = mha(q, k, v, **args)
            got = cut(q, k, v, **args)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        x = _inputs(True)[0]
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        expected, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        got, _ = cut(x, x, x, is_causal=True, need_weights=False)  # the hint alone: causal
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _silenced(model, attention, heads, head_dim):
    """The base model with every head but `heads` silenced: out_proj columns at zero."""
    silent = copy.deepcopy(model)
    out = silent.get_submodule(attention).out_proj.weight
    keep = torch.zeros(out.shape[1], dtype=torch.bool)
    for h in heads:
        keep[h * head_dim : (h + 1) * head_dim] = True
    with torch.no_grad():
        out[:, ~keep] = 0
    return silent


def test_cutting_torch_heads_equals_silencing_them():
    """TransformerEncoderLayer's self-attention keeps 1 of its 2 heads: the rebuilt model
    (HeadCutAttention, its packed q/k/v rows and out_proj columns sliced per head) gives
    what the base model gives with the cut head's out_proj columns at zero (the base runs
    torch's fused fast path)."""
    model, example, space, rebuild = _space("transformer")
    group = space.plan.group("encoder.self_attn")
    assert group.unit == "heads" and group.channels == 2
    values = {k.name: (32 if k.kind == "bits" else 1.0) for k in space.knobs}
    values["keep:encoder.self_attn"] = 0.5
    small = rebuild(Policy.from_values(space, values))
    attention = small.encoder.self_attn
    assert type(attention) is HeadCutAttention and attention.num_heads == 1
    assert attention.in_proj_weight.shape == (3 * 8, 16) and attention.out_proj.in_features == 8
    silent = _silenced(model, "encoder.self_attn", group.kept_channels(1), 8)
    with torch.no_grad():
        torch.testing.assert_close(small(example), silent(example), atol=1e-5, rtol=1e-5)
    # every head kept again (the worker's scratch model is reused): torch's own module
    again = rebuild(Policy.from_values(space, {**values, "keep:encoder.self_attn": 1.0}))
    assert type(again.encoder.self_attn) is nn.MultiheadAttention
    with torch.no_grad():
        assert torch.equal(again(example), model(example))
