"""LSTM and GRU: every gate weight is compressible; a hidden unit owns one row per gate."""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import LayerType, register, set_attrs


class Recurrent(LayerType):
    compressible = True
    family = "rnn"
    gates = 1

    def weights(self, module: nn.Module) -> list[str]:
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]

    def uses(self, module: nn.Module, output: Any) -> int:
        # One step multiplies every gate weight once per sequence element: output is
        # (batch, time, directions*out) or its packed/unbatched forms; steps = elements / width.
        seq = output[0]
        seq = seq.data if hasattr(seq, "batch_sizes") else seq
        width = (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
        return seq.numel() // width

    def cut_out(self, module: nn.Module):
        g = self.gates
        out = [("weight_ih_l0", 0, g), ("weight_hh_l0", 0, g), ("weight_hh_l0", 1, 1)]
        if module.bias:
            out += [("bias_ih_l0", 0, g), ("bias_hh_l0", 0, g)]
        return out

    def cut_in(self, module: nn.Module):
        return [("weight_ih_l0", 1, 1)]

    def unsupported(self, module: nn.Module) -> str | None:
        if module.num_layers > 1 or module.bidirectional or getattr(module, "proj_size", 0):
            return "only single-layer, one-direction LSTM/GRU without projection are sliced"
        return None

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        set_attrs(module, hidden_size=module.weight_hh_l0.shape[1],
                  input_size=module.weight_ih_l0.shape[1])  # fmt: skip
        if module.weight_hh_l0.is_cuda:  # cuDNN keeps the weights in one flat buffer: refill it
            module._init_flat_weights()  # (elsewhere the module holds the same Parameters)


class LSTM(Recurrent):
    types = (nn.LSTM,)
    gates = 4


class GRU(Recurrent):
    types = (nn.GRU,)
    gates = 3


LSTM_ = register(LSTM())
GRU_ = register(GRU())
