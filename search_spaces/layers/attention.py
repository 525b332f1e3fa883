"""nn.MultiheadAttention: its packed (or separate) q/k/v input projections are one layer.

Its forward uses the projections functionally (F.multi_head_attention_forward), so no
forward hook of `out_proj` fires: `drives` says the out projection is used as often as
the input projections (once per query token, self-attention), and the profile gives it
those uses. Heads are not cut: the module derives the head width from the model width,
so fewer heads would change it (what cutting them would touch is listed as unsliceable).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import LayerType, register


class MultiheadAttention(LayerType):
    types = (nn.MultiheadAttention,)
    compressible = True
    drives = ("out_proj",)

    def weights(self, module: nn.Module) -> list[str]:
        if module._qkv_same_embed_dim:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]

    def uses(self, module: nn.Module, output: Any) -> int:
        # every projection row is applied once per token (keys and values: per source
        # token, equal to the query tokens in self-attention)
        return output[0].numel() // module.embed_dim


MULTIHEAD_ATTENTION = register(MultiheadAttention())
