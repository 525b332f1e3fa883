"""Hugging Face `transformers` layer types, matched by class name (nothing imports
transformers here): GPT-2's Conv1D, and the RMSNorms of Llama-style models.

Conv1D is a Linear whose weight is stored transposed, [in, out] (Radford et al.'s
"1D convolution", GPT-2's c_attn, c_proj, c_fc): its output features are dim 1 of
the weight and dim 0 of the bias, its input features dim 0 of the weight. It is
quantized per row of its weight as every type is (here: per input feature).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.layers.base import (
    LayerType,
    register,
    rows,
    set_attrs,
    uses_per_output_channel,
)


class Conv1D(LayerType):
    compressible = True

    def uses(self, module: nn.Module, output: Any) -> int:
        return uses_per_output_channel(output, module.nf)

    def cut_out(self, module: nn.Module):
        return [("weight", 1, 1), ("bias", 0, 1)]

    def cut_in(self, module: nn.Module):
        return [("weight", 0, 1)]

    def fix(self, module: nn.Module, old: dict[str, Any]) -> None:
        inp, out = module.weight.shape
        set_attrs(module, nx=inp, nf=out)


CONV1D = register(Conv1D(), "transformers.pytorch_utils.Conv1D")


class RMSNorm(LayerType):
    """transformers' RMSNorms (one scale per channel, no bias): kept in float as LayerNorm
    is, cut with the channels they hold. (Torch-Pruning does not know them: their weights
    join a group as parameters of their own.)"""

    cut_out = staticmethod(rows("weight"))


# one class per model family (transformers copies the code rather than sharing a class)
_RMS_NORMS = tuple(
    f"transformers.models.{family}.modeling_{family}.{cls}"
    for family, cls in (("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"),
                        ("mixtral", "MixtralRMSNorm"), ("qwen2", "Qwen2RMSNorm"),
                        ("qwen3", "Qwen3RMSNorm"), ("gemma", "GemmaRMSNorm"),
                        ("gemma2", "Gemma2RMSNorm"), ("phi3", "Phi3RMSNorm"),
                        ("olmo2", "Olmo2RMSNorm"), ("t5", "T5LayerNorm"))
)  # fmt: skip
RMS_NORM = register(RMSNorm(), *_RMS_NORMS)
