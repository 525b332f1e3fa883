"""nn.Embedding: a table looked up, not multiplied (no MACs); rows are the vocabulary,
so it is quantized per token, and cutting the embedding width slices its columns."""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import LayerType, register, set_attrs


class Embedding(LayerType):
    types = (nn.Embedding,)
    compressible = True
    args = ("num_embeddings", "embedding_dim", "padding_idx")

    def uses(self, module: nn.Module, output: Any) -> int:
        return 0  # a lookup multiplies nothing

    def cut_out(self, module: nn.Module):
        return [("weight", 1, 1)]

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        set_attrs(module, embedding_dim=module.weight.shape[1])


EMBEDDING = register(Embedding())
