"""A byte-bounded LRU of derived tensors (sliced, quantized) for the rebuild.

A layer's sliced and fake-quantized weight depends only on its own knobs (its bits and
the channel counts of the groups that cut it), not on the whole policy, so a search keeps
asking for the same few variants of each tensor: a worker computes each variant once and
reuses it for every later candidate (issue 3: the rebuild must stay a small fraction of
scoring). Cached tensors are shared by the models a rebuild returns and must never be
written in place; the rebuild gives fresh copies wherever something writes (BatchNorm
buffers, fine-tuning).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

DEFAULT_BYTES = 256 * 2**20  # per worker; a few hundred variants of a mid-sized CNN


class TensorCache:
    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get(self, key: Hashable) -> torch.Tensor | None:
        tensor = self._items.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return tensor

    def put(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return tensor  # never evict everything for one tensor
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = tensor
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        return tensor

    def clear(self) -> None:
        self._items.clear()
        self.bytes = self.hits = self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
