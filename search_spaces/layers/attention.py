"""nn.MultiheadAttention: its packed (or separate) q/k/v input projections are one layer,
and whole heads can be cut.

Its forward uses the projections functionally (F.multi_head_attention_forward), so no
forward hook of `out_proj` fires: `drives` says the out projection is used as often as
the input projections (once per query token, self-attention), and the profile gives it
those uses.

Cutting heads: head h owns rows h*d..(h+1)*d-1 of each of q, k and v (the packed
`in_proj_weight` holds them at offsets 0, E and 2E) and the same columns of out_proj.
torch's own forward derives the head width from the model width E (`E // num_heads`),
so a module with fewer heads than E/d becomes a `HeadCutAttention`: the same module and
tensors, with a forward that reads the kept heads' width from its tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.layers.base import LayerType, register


class HeadCutAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention keeping `num_heads` of its heads, each `head_dim` wide (so its
    q/k/v width is num_heads * head_dim, less than `embed_dim`, the width of its inputs and
    output). Made by class assignment on a rebuilt module, never constructed."""

    @property
    def _qkv_same_embed_dim(self) -> bool:  # type: ignore[override]
        # TransformerEncoderLayer's fused fast path assumes q/k/v as wide as the model;
        # reading False here sends it to the plain path, which calls this forward
        return False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (self._heads(F.linear(x, w, b)) for x, w, b in
                   zip((query, key, value), *self._projections(), strict=True))  # fmt: skip
        mask = self._mask(attn_mask, key_padding_mask, q, k.shape[2], is_causal=is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            weights = F.dropout(weights, p=dropout) if dropout else weights
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout), None
        n, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _projections(self) -> tuple[tuple, tuple]:
        """(q, k, v) weights and biases, each the kept heads' rows."""
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return weights, biases

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, h*d) -> (N, h, L, d)
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              q: torch.Tensor, source: int, *, is_causal: bool) -> torch.Tensor | None:  # fmt: skip
        """One additive mask (N or 1, h or 1, L, S) from torch's mask arguments (True: not
        attended). `is_causal` alone means a causal mask (torch takes it as a hint only)."""
        n, heads, length, _ = q.shape
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        mask = None
        if attn_mask is not None:
            attn_mask = _additive(attn_mask, q.dtype)
            if attn_mask.dim() == 3:  # per head: (N * num_heads, L, S)
                attn_mask = attn_mask.view(n, heads, length, source)
            mask = attn_mask
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


class MultiheadAttention(LayerType):
    types = (nn.MultiheadAttention,)
    compressible = True
    drives = ("out_proj",)
    uncut_why = "its model width (embed_dim) stays; its heads are cut by a group of their own"

    def weights(self, module: nn.Module) -> list[str]:
        if module.in_proj_weight is not None:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]

    def uses(self, module: nn.Module, output: Any) -> int:
        # every projection row is applied once per token (keys and values: per source
        # token, equal to the query tokens in self-attention)
        return output[0].numel() // module.embed_dim

    def unsupported(self, module: nn.Module) -> str | None:
        if type(module) not in (nn.MultiheadAttention, HeadCutAttention):
            return (
                f"its heads are cut in nn.MultiheadAttention itself, not in {type(module).__name__}"
            )
        if module.bias_k is not None or module.add_zero_attn:
            return "its heads are not cut with add_bias_kv or add_zero_attn"
        return None

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        if type(module) not in (nn.MultiheadAttention, HeadCutAttention):
            return
        q = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
        width = q.shape[0] // (3 if module.in_proj_weight is not None else 1)
        # the plain module where every head is kept: torch's own (fused) forward
        module.__class__ = HeadCutAttention if width != module.embed_dim else nn.MultiheadAttention


MULTIHEAD_ATTENTION = register(MultiheadAttention())
