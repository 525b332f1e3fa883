"""How a compressed model's tensors are stored: each layer in the encoding the cost model
counted (cost.py: dense/sparse x float/packed), so the stored bytes are `size_bytes`.

| encoding      | stored tensors (named `<layer>:<part>`)                              |
|---------------|----------------------------------------------------------------------|
| dense-float   | each weight under its own state-dict key, at its dtype               |
| sparse-float  | `values` (the kept weights, flat, at their dtype), `bitmap`          |
| dense-packed  | `codes` (uint8 bit stream, pack.py), `scales` (float32, one per row) |
| sparse-packed | `codes` (the kept codes only), `scales`, `bitmap`                    |

A layer's weight tensors (an LSTM has two) share one stream, one scale vector and one
bitmap, concatenated flat in the profile's order. Codes are those of quantize.py, whose
dequantization is the scored (fake-quantized) weights bit for bit. Every other
state-dict tensor is stored under its key at its dtype.

The model file (`model_file`) holds all of these tensors' bytes back to back in one
safetensors entry (uint8), widest dtype first so that each tensor lies aligned to its
element size; the manifest's `stored` index says where each one lies. One entry keeps the
header at cost.file_header's ~120 bytes, which the cost model counts exactly: an entry
per tensor cost ~80 bytes each (issue 14). Format 1 files (an entry per tensor) still load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from orchestrator.compress.pack import pack_bitmap, pack_codes, unpack_bitmap, unpack_codes
from orchestrator.compress.prune import magnitude_masks
from orchestrator.compress.quantize import dequantize, quantize
from search_spaces import SearchSpace
from search_spaces.config import FLOAT_BITS
from search_spaces.cost import FILE_ENTRY, file_header, policy_encodings
from search_spaces.kinds import BITS  # a manifest layer's `bits`: its bits kind's value

# the stored parts of each encoding (dense-float: the weights' own state-dict keys)
PARTS: dict[str, tuple[str, ...]] = {
    "dense-float": (), "sparse-float": ("values", "bitmap"),
    "dense-packed": ("codes", "scales"), "sparse-packed": ("codes", "scales", "bitmap"),
}  # fmt: skip


class ExportError(RuntimeError):
    """An export failed its own check (the CLI prints one line, exit 1); nothing written."""


# -- encoding ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Layer:
    """One compressible layer of the scored model, ready to encode."""

    name: str
    bits: int
    keys: tuple[str, ...]  # its weight tensors' state-dict keys
    weights: tuple[torch.Tensor, ...]  # as scored (fake-quantized), on CPU
    codes: tuple[torch.Tensor, ...]  # integer codes (bits < 32)
    scales: tuple[torch.Tensor, ...]  # float32, one per output row
    mask: torch.Tensor | None  # flat, over all weights: elements kept (unstructured)


def _flat(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _dense_float(layer: _Layer) -> dict[str, torch.Tensor]:
    return dict(zip(layer.keys, layer.weights, strict=True))


def _sparse_float(layer: _Layer) -> dict[str, torch.Tensor]:
    return {"values": _flat(layer.weights)[layer.mask], "bitmap": pack_bitmap(layer.mask)}


def _dense_packed(layer: _Layer) -> dict[str, torch.Tensor]:
    return {"codes": pack_codes(_flat(layer.codes), layer.bits), "scales": _flat(layer.scales)}


def _sparse_packed(layer: _Layer) -> dict[str, torch.Tensor]:
    return {"codes": pack_codes(_flat(layer.codes)[layer.mask], layer.bits),
            "scales": _flat(layer.scales), "bitmap": pack_bitmap(layer.mask)}  # fmt: skip


ENCODERS: dict[str, Callable[[_Layer], dict[str, torch.Tensor]]] = {
    "dense-float": _dense_float, "sparse-float": _sparse_float,
    "dense-packed": _dense_packed, "sparse-packed": _sparse_packed,
}  # fmt: skip


def _file_key(entry: Mapping[str, Any], part: str) -> str:
    return part if entry["encoding"] == "dense-float" else f"{entry['name']}:{part}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{name}'")
    return dtype


def _layer(name: str, bits: int, keys: tuple[str, ...], final: Mapping[str, torch.Tensor],
           before: Mapping[str, torch.Tensor], mask: torch.Tensor | None) -> _Layer:  # fmt: skip
    """Codes from the weights the quantizer got; their dequantization must be the scored
    weights bit for bit (quantize.py: dequantize(quantize(w)) == fake_quantize(w))."""
    weights = tuple(final[k] for k in keys)
    codes: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    if bits < FLOAT_BITS:
        for key, weight in zip(keys, weights, strict=True):
            code, scale = quantize(before[key], bits)
            if not torch.equal(dequantize(code, scale, weight.dtype), weight):
                raise ExportError(f"internal: the integer codes of {key} do not reproduce the "
                                  "scored weights")  # fmt: skip
            codes.append(code)
            scales.append(scale)
    if mask is not None and bool(_flat(weights)[~mask].any()):
        raise ExportError(f"internal: layer {name} has weights outside its pruning mask")
    return _Layer(name=name, bits=bits, keys=keys, weights=weights, codes=tuple(codes),
                  scales=tuple(scales), mask=mask)  # fmt: skip


def layer_masks(
    space: SearchSpace, policy: Mapping[str, int | float], base: nn.Module
) -> dict[str, torch.Tensor]:
    """Unstructured: the magnitude mask of every pruned layer, flat over its weights, with
    exactly the kept count the cost model priced (the Rebuilder's masks)."""
    if space.plan is not None:
        return {}
    settings = space.layer_settings(policy)
    state = base.state_dict()
    masks = {}
    for layer in space.profile.layers:
        kept = settings[layer.name].keep_count
        if kept < layer.numel:
            weights = [state[w.key].detach().cpu() for w in layer.weights]
            masks[layer.name] = _flat(tuple(magnitude_masks(weights, kept)))
    return masks


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    # fresh, contiguous storage: safetensors refuses tensors that share memory
    return tensor.detach().to("cpu", copy=True).contiguous()


@dataclass(frozen=True, kw_only=True)
class Encoded:
    tensors: dict[str, torch.Tensor]  # what model.safetensors holds
    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]  # the scored model's state dict (CPU), to check against


def encode(model: nn.Module, before: Mapping[str, torch.Tensor], space: SearchSpace,
           policy: Mapping[str, int | float], masks: Mapping[str, torch.Tensor]) -> Encoded:  # fmt: skip
    """The scored `model` (fake-quantized; `before`: the weights its quantizer got) as
    tensors in the cost model's per-layer encodings, and the layer table of the manifest."""
    state = {k: _cpu(v) for k, v in model.state_dict().items()}
    bits = space.layer_bits(policy)
    chosen = policy_encodings(space, policy)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for info in space.profile.layers:
        encoding, size = chosen[info.name]
        keys = tuple(w.key for w in info.weights)
        layer = _layer(info.name, bits[info.name], keys, state,
                       {k: _cpu(before[k]) for k in keys if k in before}, masks.get(info.name))  # fmt: skip
        entry = {"name": info.name, "kind": info.kind, BITS.name: bits[info.name],
                 "encoding": encoding, "bytes": size,
                 "kept": int(layer.mask.sum()) if layer.mask is not None
                 else sum(w.numel() for w in layer.weights),
                 "weights": [{"key": k, "shape": list(state[k].shape),
                              "dtype": dtype_name(state[k].dtype)} for k in keys]}  # fmt: skip
        parts = ENCODERS[encoding](layer)
        stored = sum(t.numel() * t.element_size() for t in parts.values())
        if stored != size:
            raise ExportError(f"internal: layer {info.name} ({encoding}) takes {stored} bytes, "
                              f"the cost model counted {size}")  # fmt: skip
        tensors.update({_file_key(entry, p): _cpu(t) for p, t in parts.items()})
        layers.append(entry)
    weight_keys = {w.key for info in space.profile.layers for w in info.weights}
    tensors.update({k: v for k, v in state.items() if k not in weight_keys})
    manifest = {
        "layers": layers,
        "tensors": [{"key": k, "shape": list(v.shape), "dtype": dtype_name(v.dtype)}
                    for k, v in state.items()],
    }  # fmt: skip
    return Encoded(tensors=tensors, manifest=manifest, state=state)


# -- the model file ------------------------------------------------------------------------


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def model_file(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[dict[str, Any]]]:
    """The model file (cost.file_header, then every tensor's bytes: `file_bytes(payload)`
    bytes in all) and its `stored` index for the manifest: each tensor's `key`, `dtype`,
    `shape` and `data_offsets` (begin, end) within the file's one entry, in file order.
    Widest dtype first (a stable sort), so each tensor's offset is a multiple of its
    element size, as safetensors orders its own entries."""
    stored: list[dict[str, Any]] = []
    chunks: list[torch.Tensor] = []
    offset = 0
    for key, tensor in sorted(tensors.items(), key=lambda item: -item[1].element_size()):
        raw = _raw(tensor)
        stored.append({"key": key, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + raw.numel()]})  # fmt: skip
        chunks.append(raw)
        offset += raw.numel()
    payload = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8)
    return file_header(offset) + payload.numpy().tobytes(), stored


def unpack_file(entries: Mapping[str, torch.Tensor],
                stored: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The stored tensors of a model file (`entries`: what safetensors loads from it) by
    its manifest's `stored` index, which must tile the one entry exactly."""
    blob = entries.get(FILE_ENTRY)
    if len(entries) != 1 or blob is None or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"the model file must hold one 1-D uint8 entry '{FILE_ENTRY}', it "
                         f"holds {sorted(entries)}")  # fmt: skip
    tensors: dict[str, torch.Tensor] = {}
    end = 0
    for part in stored:
        dtype = dtype_of(part["dtype"])
        begin, stop = part["data_offsets"]
        if begin != end or stop - begin != math.prod(part["shape"]) * dtype.itemsize:
            raise ValueError(f"stored tensor {part['key']} lies at {begin}..{stop}, not right "
                             f"after the previous one ({end}) at its shape's size")  # fmt: skip
        # a copy: its own aligned storage, and the file's bytes can be freed
        tensors[part["key"]] = blob[begin:stop].clone().view(dtype).reshape(part["shape"])
        end = stop
    if end != blob.numel():
        raise ValueError(f"the stored tensors take {end} bytes, the model file holds "
                         f"{blob.numel()}")  # fmt: skip
    return tensors


# -- decoding -----------------------------------------------------------------------------


def _split(flat: torch.Tensor, entry: Mapping[str, Any]) -> list[torch.Tensor]:
    sizes = [math.prod(w["shape"]) for w in entry["weights"]]
    return [part.reshape(w["shape"]) for part, w in
            zip(torch.split(flat, sizes), entry["weights"], strict=True)]  # fmt: skip


def _numel(entry: Mapping[str, Any]) -> int:
    return sum(math.prod(w["shape"]) for w in entry["weights"])


def _dequantized(codes: torch.Tensor, scales: torch.Tensor,
                 entry: Mapping[str, Any]) -> list[torch.Tensor]:  # fmt: skip
    rows = [w["shape"][0] for w in entry["weights"]]
    return [dequantize(c, s, dtype_of(w["dtype"])) for c, s, w in
            zip(_split(codes, entry), torch.split(scales, rows), entry["weights"], strict=True)]  # fmt: skip


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    flat = values.new_zeros(mask.numel())
    flat[mask] = values
    return flat


def _decode_dense_float(entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> list:
    return [parts[w["key"]] for w in entry["weights"]]


def _decode_sparse_float(entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> list:
    mask = unpack_bitmap(parts["bitmap"], _numel(entry))
    return _split(_scatter(mask, parts["values"]), entry)


def _decode_dense_packed(entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> list:
    codes = unpack_codes(parts["codes"], entry[BITS.name], _numel(entry))
    return _dequantized(codes, parts["scales"], entry)


def _decode_sparse_packed(entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> list:
    mask = unpack_bitmap(parts["bitmap"], _numel(entry))
    codes = unpack_codes(parts["codes"], entry[BITS.name], int(mask.sum()))
    return _dequantized(_scatter(mask, codes), parts["scales"], entry)


DECODERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, torch.Tensor]], list]] = {
    "dense-float": _decode_dense_float, "sparse-float": _decode_sparse_float,
    "dense-packed": _decode_dense_packed, "sparse-packed": _decode_sparse_packed,
}  # fmt: skip


def _parts(entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    names = PARTS[entry["encoding"]] or tuple(w["key"] for w in entry["weights"])
    return {p: tensors[_file_key(entry, p)] for p in names}


def decode_state(manifest: Mapping[str, Any],
                 tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The model's state dict (weights dequantized) from the stored tensors."""
    state = dict(tensors)
    for entry in manifest["layers"]:
        decoded = DECODERS[entry["encoding"]](entry, _parts(entry, tensors))
        state.update({w["key"]: t for w, t in zip(entry["weights"], decoded, strict=True)})
    result = {}
    for t in manifest["tensors"]:
        tensor = state[t["key"]]
        if list(tensor.shape) != t["shape"] or dtype_name(tensor.dtype) != t["dtype"]:
            raise ValueError(f"tensor {t['key']} is {tuple(tensor.shape)} {tensor.dtype}, the "
                             f"manifest says {tuple(t['shape'])} {t['dtype']}")  # fmt: skip
        result[t["key"]] = tensor
    return result


class PackedWeight(nn.Module):
    """Parametrization of one weight tensor of a packed layer: decoded from the layer's
    stored parts (bit stream, scales, bitmap) on every access."""

    def __init__(self, entry: Mapping[str, Any], index: int,
                 parts: dict[str, torch.Tensor]) -> None:  # fmt: skip
        super().__init__()
        self.entry, self.index = dict(entry), index
        self.names = tuple(parts)
        self._parts = tuple(parts.values())

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        decoded = DECODERS[self.entry["encoding"]](
            self.entry, dict(zip(self.names, parts, strict=True))
        )
        return decoded[self.index]

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._parts  # registration stores the packed parts, not the float weight


def keep_packed(model: nn.Module, manifest: Mapping[str, Any],
                tensors: Mapping[str, torch.Tensor]) -> None:  # fmt: skip
    """Replace every packed layer's weights by parametrizations over its packed parts."""
    for entry in manifest["layers"]:
        if not entry["encoding"].endswith("-packed"):
            continue
        parts = _parts(entry, tensors)
        for index, weight in enumerate(entry["weights"]):
            owner, _, attr = weight["key"].rpartition(".")
            module = model.get_submodule(owner)
            value = getattr(module, attr).detach()
            del module._parameters[attr]
            module.register_buffer(attr, value)  # buffers: uint8 parts cannot be Parameters
            parametrize.register_parametrization(module, attr, PackedWeight(entry, index, parts),
                                                 unsafe=True)  # fmt: skip
