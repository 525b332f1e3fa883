"""The variants of a model's tensors that one worker's candidates ask for: each base
tensor sliced along the pruning plan, then fake-quantized.

A variant depends only on its own knobs: its state (the channel count of each group that
cuts the tensor) and its layer's bits. Each variant is computed once and then reused from
the worker's byte-bounded cache (memo.py), and computing one is split along what each step
depends on, so that the many variants a search visits cost few torch ops (issue 3: the
rebuild must stay a small fraction of scoring; for small models it is op dispatch, not
arithmetic):

- the rows (dim 0, output channels) are cut last, from the variant that keeps every row,
  so a new row count costs one index_select;
- fake-quantization is per row, so it commutes with cutting rows: rows are quantized once
  per state of the other dimensions, and the rows a state keeps are selected after;
- a small tensor is quantized at every bits choice of its layer at once (one stack, the
  ops of one: `fake_quantize_many`), so a later candidate at other bits finds it too.

Variants are shared by every model the rebuild returns: they must never be written in
place (the rebuild copies them wherever something writes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from orchestrator.compress.memo import TensorCache
from orchestrator.compress.quantize import fake_quantize_many
from search_spaces.config import FLOAT_BITS
from search_spaces.structure import DimSlice, GroupPlan, PruningPlan

# a stack of every bits variant up to this size: beyond it arithmetic, not dispatch, is
# the cost, and the variants a candidate does not use would crowd the cache
STACK_BYTES = 2**20
ALIGN_BYTES = 64  # what the CPU allocator aligns a new tensor to (a cache line, AVX-512)

Owner = tuple[GroupPlan, DimSlice]


class Variants:
    def __init__(self, tensors: Mapping[str, torch.Tensor], plan: PruningPlan, *,
                 cache: TensorCache | None = None,
                 bits_choices: Mapping[str, Sequence[int]] | None = None) -> None:  # fmt: skip
        """`tensors`: the base model's, by state-dict key; `bits_choices`: per weight key,
        the bits its layer may take (stacked together); without `cache` nothing is kept."""
        self.tensors = {k: v.detach() for k, v in tensors.items()}
        self.cache = cache if cache is not None else TensorCache(max_bytes=0)
        self.owners: dict[str, list[Owner]] = {}
        for g in plan.groups:
            for s in g.slices:
                self.owners.setdefault(s.key, []).append((g, s))
        # per key: its groups' names and their channel counts (the uncut state)
        self.groups = {k: tuple(g.name for g, _ in o) for k, o in self.owners.items()}
        self.uncut = {k: tuple(g.channels for g, _ in o) for k, o in self.owners.items()}
        # per key: the dims its groups cut, in order, with their positions in its state
        self._dims = {
            k: {d: [i for i, (_, s) in enumerate(o) if s.dim == d]
                for d in sorted({s.dim for _, s in o})}
            for k, o in self.owners.items()
        }  # fmt: skip
        self._stacks = {k: self._stack_of(k, b) for k, b in (bits_choices or {}).items()}
        self._index: dict[tuple[str, int, tuple[int, ...]], torch.Tensor | None] = {}
        self._tables: dict[tuple[str, str, int], tuple[torch.Tensor, bool]] = {}
        self._kept_channels: dict[tuple[str, int], torch.Tensor] = {}

    def _stack_of(self, key: str, choices: Sequence[int]) -> dict[int, tuple[tuple[int, ...], int]]:
        """bits -> (the bits stacked together, position of these bits in the stack)."""
        quantized = tuple(sorted({b for b in choices if b < FLOAT_BITS}))
        tensor = self.tensors[key]
        if len(quantized) * tensor.numel() * tensor.element_size() > STACK_BYTES:
            return {}  # each bits alone
        return {b: (quantized, i) for i, b in enumerate(quantized)}

    def get(self, key: str, state: tuple[int, ...], bits: int = FLOAT_BITS) -> torch.Tensor:
        """`key`'s tensor keeping `state` channels of its groups (in `self.groups[key]`
        order; () for a key no group cuts), fake-quantized at `bits` unless float."""
        if bits >= FLOAT_BITS:
            return self._lookup(key, state, None)
        stacked, i = self._stacks.get(key, {}).get(bits) or ((bits,), 0)
        tensor = self._lookup(key, state, stacked)[i]
        # a stack's later slots start mid-allocation: BLAS kernels take another path on
        # a misaligned weight and round differently (last bits of the outputs), so the
        # same policy would score differently by the bits its neighbours in the stack had
        return tensor if tensor.data_ptr() % ALIGN_BYTES == 0 else tensor.clone()

    def _lookup(
        self, key: str, state: tuple[int, ...], stacked: tuple[int, ...] | None
    ) -> torch.Tensor:
        """The float variant (`stacked` None) or the stack of quantized ones, cached."""
        if stacked is None and state == self.uncut.get(key, ()):
            return self.tensors[key]
        name = (key, state, stacked)
        found = self.cache.get(name)
        return found if found is not None else self.cache.put(name, self._make(*name))

    def _make(
        self, key: str, state: tuple[int, ...], stacked: tuple[int, ...] | None
    ) -> torch.Tensor:
        all_rows = self._all_rows(key, state)
        if all_rows != state:  # rows go last, from the variant keeping them all:
            # quantization is per row, so selecting rows after it gives the same values
            whole, index = self._lookup(key, all_rows, stacked), self._kept(key, 0, state)
            dim = 0 if stacked is None else 1  # a stack's rows are its dim 1
            return whole if index is None else whole.index_select(dim, index)
        if stacked is not None:
            return fake_quantize_many(self._lookup(key, state, None), stacked)
        tensor = self.tensors[key]
        for dim in self._dims[key]:
            if dim > 0:
                index = self._kept(key, dim, state)
                tensor = tensor if index is None else tensor.index_select(dim, index)
        return tensor  # a new tensor (index_select), never a view of the base

    def _all_rows(self, key: str, state: tuple[int, ...]) -> tuple[int, ...]:
        """`state` with every group that cuts rows (dim 0) keeping all its channels."""
        owners = self.owners.get(key, ())
        return tuple(g.channels if s.dim == 0 else c
                     for (g, s), c in zip(owners, state, strict=True))  # fmt: skip

    def _kept(self, key: str, dim: int, state: tuple[int, ...]) -> torch.Tensor | None:
        """Indices of `dim` that `state` keeps (None: all), cached per the counts of the
        groups cutting that dim. Indices no group owns (another branch of a concatenation)
        always stay."""
        positions = self._dims[key][dim]
        name = (key, dim, tuple(state[i] for i in positions))
        if name not in self._index:
            owners = [(*self.owners[key][i], state[i]) for i in positions]
            self._index[name] = self._kept_index(key, dim, owners)
        return self._index[name]

    def _kept_index(self, key: str, dim: int,
                    owners: list[tuple[GroupPlan, DimSlice, int]]) -> torch.Tensor | None:  # fmt: skip
        size = self.tensors[key].shape[dim]
        group, sl, count = owners[0]
        if len(owners) == 1 and group.channels * sl.multiplicity == size:
            # one group owns the whole dimension: its channels in importance order
            if count >= group.channels:
                return None
            table, monotone = self._table(group, sl)
            index = table.index_select(0, self._channels(group, count)).reshape(-1)
            return index if monotone else index.sort().values  # e.g. LSTM gates: h, H+h, ...
        cut: set[int] = set()
        for group, sl, count in owners:
            for channel in group.order[count:]:  # the least important channels go
                cut.update(sl.index[channel])
        if not cut:
            return None
        keep = [i for i in range(size) if i not in cut]
        return torch.tensor(keep, device=self.tensors[key].device)

    def _table(self, group: GroupPlan, sl: DimSlice) -> tuple[torch.Tensor, bool]:
        """(channels, multiplicity) indices of the slice by channel, and whether reading
        its rows in channel order gives sorted indices (then no sort per candidate)."""
        key = (group.name, sl.key, sl.dim)
        if key not in self._tables:
            flat = [i for row in sl.index for i in row]
            table = torch.tensor(sl.index, device=self.tensors[sl.key].device)
            self._tables[key] = (table, flat == sorted(flat))
        return self._tables[key]

    def _channels(self, group: GroupPlan, count: int) -> torch.Tensor:
        """The `count` most important channels of a group, in channel order."""
        key = (group.name, count)
        if key not in self._kept_channels:
            device = next(iter(self.tensors.values())).device
            self._kept_channels[key] = torch.tensor(group.kept_channels(count), device=device)
        return self._kept_channels[key]
