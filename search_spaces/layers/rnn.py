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
        # nn.LSTM/GRU hold one hidden_size for every layer and direction: hidden unit i is
        # cut in each (its gate rows and recurrence column) and in the next layer's inputs
        # (both directions' halves there: position i and hidden_size + i)
        g, out = self.gates, []
        for layer in range(module.num_layers):
            for suffix in _directions(module):
                ih, hh = f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"
                out += [(ih, 0, g), (hh, 0, g), (hh, 1, 1)]
                if module.bias:
                    out += [
                        (f"bias_ih_l{layer}{suffix}", 0, g),
                        (f"bias_hh_l{layer}{suffix}", 0, g),
                    ]
                if layer:
                    out.append((ih, 1, 1))
        return out

    def cut_in(self, module: nn.Module):
        return [(f"weight_ih_l0{suffix}", 1, 1) for suffix in _directions(module)]

    def channel_groups(self, module: nn.Module, role: str = "out") -> int:
        # a bidirectional output holds each unit twice (forward half, reverse half)
        return 2 if module.bidirectional and role == "out" else 1

    def unsupported(self, module: nn.Module) -> str | None:
        if getattr(module, "proj_size", 0):  # a projection decouples output and hidden units
            return "LSTM with proj_size is not sliced"
        return None

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        set_attrs(module, hidden_size=module.weight_hh_l0.shape[1],
                  input_size=module.weight_ih_l0.shape[1])  # fmt: skip
        if module.weight_hh_l0.is_cuda:  # cuDNN keeps the weights in one flat buffer: refill it
            module._init_flat_weights()  # (elsewhere the module holds the same Parameters)


def _directions(module: nn.Module) -> tuple[str, ...]:
    return ("", "_reverse") if module.bidirectional else ("",)


class LSTM(Recurrent):
    types = (nn.LSTM,)
    gates = 4


class GRU(Recurrent):
    types = (nn.GRU,)
    gates = 3


LSTM_ = register(LSTM())
GRU_ = register(GRU())
