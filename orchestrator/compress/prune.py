"""Magnitude pruning (unstructured masks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def magnitude_masks(weights: Sequence[torch.Tensor], keep_count: int) -> list[torch.Tensor]:
    """Boolean masks keeping exactly the `keep_count` largest-magnitude elements over all
    of a layer's weight tensors together (one ranking: the layer has one keep knob).

    Ties are broken by position (stable sort), so the masks are deterministic.
    """
    flat = torch.cat([w.detach().reshape(-1).abs().float() for w in weights])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    order = torch.argsort(flat, descending=True, stable=True)
    keep[order[:keep_count]] = True
    masks, offset = [], 0
    for w in weights:
        masks.append(keep[offset : offset + w.numel()].reshape(w.shape))
        offset += w.numel()
    return masks
