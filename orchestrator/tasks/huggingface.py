"""Hugging Face `transformers` models as Tasks: a helper for your own model and texts, and
tiny random built-in models (nothing downloaded).

    task: orchestrator.tasks.huggingface:bert_tiny    # BertForMaskedLM, 2 layers, width 64
    task: orchestrator.tasks.huggingface:gpt2_tiny    # GPT2LMHeadModel (Conv1D projections)
    task: orchestrator.tasks.huggingface:llama_tiny   # LlamaForCausalLM (grouped-query attention)

Your own model goes through `huggingface_task` in a module of yours:

    def make_task():
        return huggingface_task("path/or/hub-name", texts, tokenizer="path/or/hub-name")

named as `task: my_tasks:make_task`. The task spec, not the model, travels: the driver and
every worker call make_task() and build the model themselves, once, so the model is a
`from_pretrained` name or path, or a zero-argument function returning the model.

The default metric is fidelity with the float model, which needs no labels: for a model
with a head (causal LM, masked LM, classifier), the share of the float model's top-1
predictions (per token, padding left out; or per sequence) the compressed model keeps;
for a bare encoder (no logits), the cosine similarity of every token's last hidden state
with the float model's (a pooled embedding could hide tokens that changed), clipped to
[0, 1]. Both are 1.0 for the uncompressed model (the cosine up to rounding) and averages
of scores in [0, 1], as multi-fidelity evaluation's bound assumes (orchestrator/fidelity.py).

What the helper does to the model it gets (`prepare_model`): eval mode; no key/value
cache in the outputs (Torch-Pruning's tracing cannot follow a cache object, and one
forward pass needs none); a parameter tied between modules (GPT-2's lm_head and wte,
BERT's decoder and word embeddings) gets a copy per module, because prunesearch rebuilds,
quantizes and prices every layer's tensors on its own: tied, the second owner's key is
no parameter of the rebuilt model, and every quantized policy failed (KeyError:
'lm_head.weight'). The float model's price is unchanged (its state dict holds both keys,
and both were counted); each copy gets its own bits knob.

GPT-2's Conv1D projections get bits knobs (search_spaces/layers/huggingface.py) and
magnitude pruning; structured pruning cannot trace them (Torch-Pruning does not know
Conv1D), so `pruning: auto` falls back to unstructured and says why. With
`conv1d_as_linear=True` they become the nn.Linear they compute, whose channels it cuts.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.batches import Batch, call_model, logits_of
from orchestrator.task import Task
from orchestrator.thirdparty import prepare_torchvision

IGNORE = -100  # the target at padded positions (cross-entropy's ignore_index convention)
Data = Sequence[str] | Mapping[str, Any] | Sequence[Mapping[str, Any]]
Metric = Callable[[nn.Module, Iterable[Batch]], float]


def _transformers():
    prepare_torchvision()  # transformers imports torchvision where it is installed
    import transformers

    return transformers


# -- the helper -------------------------------------------------------------------------


def huggingface_task(model: str | Callable[[], nn.Module], data: Data, *, tokenizer: Any = None,
                     name: str | None = None, metric: Metric | None = None,
                     labels: Any = None, max_length: int = 128, batch_size: int = 16,
                     conv1d_as_linear: bool = False) -> Task:  # fmt: skip
    """The Task scoring `model` on `data` (see the module docstring).

    model: a `from_pretrained` name or path (loaded with its checkpoint's own class, e.g.
        GPT2LMHeadModel), or a zero-argument function returning the model.
    data: texts (with `tokenizer`: a tokenizer, or its `from_pretrained` name or path), or
        tokenized inputs: one mapping of [samples, tokens] tensors (a tokenizer's output),
        split into batches of `batch_size`, or a sequence of such mappings, one per batch.
        Texts are padded to the longest and cut at `max_length` tokens.
    metric: `metric(model, batches) -> float`, higher is better, over (inputs, targets)
        batches; targets are `labels` (one per sample) where given, else the float model's
        predictions. Default: `fidelity`.
    """
    if isinstance(model, nn.Module):
        raise TypeError("huggingface_task: pass the model as a from_pretrained name or path, or "
                        "a zero-argument function returning it; each worker builds its own")  # fmt: skip
    _check_data(data, tokenizer)
    load = functools.partial(_from_pretrained, model) if isinstance(model, str) else model

    def build() -> nn.Module:
        return prepare_model(load(), conv1d_as_linear=conv1d_as_linear)

    inputs = functools.cache(lambda: _input_batches(data, tokenizer, max_length, batch_size))

    @functools.cache
    def targets() -> list[Any]:
        if labels is not None:
            return _split_like(torch.as_tensor(labels), inputs())
        return float_targets(build(), inputs())

    def validation() -> list[Batch]:
        return list(zip(inputs(), targets(), strict=True))

    def calibration() -> list[Batch]:  # transformers hold no BatchNorm: the same texts do
        return [(batch, None) for batch in inputs()]

    def example_inputs() -> dict[str, torch.Tensor]:
        return {k: v[:1] for k, v in inputs()[0].items()}

    shown = name or f"hf-{model if isinstance(model, str) else getattr(model, '__name__', 'model')}"
    return Task(name=shown, model=build, example_inputs=example_inputs, calibration=calibration,
                validation=validation, metric=metric or fidelity)  # fmt: skip


def _from_pretrained(path: str) -> nn.Module:
    """The checkpoint's own class (GPT2LMHeadModel, BertForSequenceClassification, ...), so
    its head comes with it; AutoModel where the config names none."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    classes = [getattr(transformers, a, None) for a in config.architectures or ()]
    cls = next((c for c in classes if c is not None), transformers.AutoModel)
    return cls.from_pretrained(path)


# -- the model ----------------------------------------------------------------------------


def prepare_model(model: nn.Module, *, conv1d_as_linear: bool = False) -> nn.Module:
    """The model as prunesearch scores it: eval mode, no cache, tied parameters untied,
    Conv1D optionally as nn.Linear (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    untie_parameters(model)
    if conv1d_as_linear:
        conv1d_to_linear(model)
    return model.eval()


def untie_parameters(model: nn.Module) -> list[str]:
    """Give every parameter a module shares with an earlier one (tied embeddings, BERT's
    decoder bias) its own copy; the first owner keeps the original. Returns the names of
    the copies."""
    seen: set[int] = set()
    untied = []
    for name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in seen:
                module._parameters[pname] = nn.Parameter(param.detach().clone(),
                                                         requires_grad=param.requires_grad)  # fmt: skip
                untied.append(f"{name}.{pname}" if name else pname)
            seen.add(id(param))
    return untied


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers Conv1D (weight [in, out]) by the nn.Linear it computes
    (weight [out, in]). Returns how many were replaced."""
    conv1d = _transformers().pytorch_utils.Conv1D
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, conv1d):
                continue
            linear = nn.Linear(child.nx, child.nf, device=child.weight.device,
                               dtype=child.weight.dtype)  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(module, child_name, linear)
            replaced += 1
    return replaced


# -- data -----------------------------------------------------------------------------------


def _check_data(data: Data, tokenizer: Any) -> None:
    """Checked when the task is made (cheap); tokenized when first used."""
    if isinstance(data, Mapping):
        return
    if isinstance(data, str) or not isinstance(data, Sequence) or not data:
        raise TypeError("huggingface_task: data must be texts, a tokenizer's output, or a "
                        "sequence of token batches (mappings of tensors)")  # fmt: skip
    if all(isinstance(d, Mapping) for d in data):
        return
    if not all(isinstance(d, str) for d in data):
        raise TypeError("huggingface_task: data mixes texts and other items")
    if tokenizer is None:
        raise TypeError("huggingface_task: texts need a tokenizer (tokenizer=...)")


def _input_batches(data: Data, tokenizer: Any, max_length: int,
                   batch_size: int) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    if isinstance(data, Mapping):
        return _split({k: torch.as_tensor(v) for k, v in data.items()}, batch_size)
    if isinstance(data[0], Mapping):
        return [{k: torch.as_tensor(v) for k, v in d.items()} for d in data]
    tok = _transformers().AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) \
        else tokenizer  # fmt: skip
    if tok.pad_token is None:  # GPT-2's has none: pad with its end token (masked anyway)
        tok.pad_token = tok.eos_token
    encoded = tok(list(data), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")  # fmt: skip
    return _split(dict(encoded), batch_size)


def _split(tensors: Mapping[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    count = len(next(iter(tensors.values())))
    return [{k: v[i : i + batch_size] for k, v in tensors.items()}
            for i in range(0, count, batch_size)]  # fmt: skip


def _split_like(labels: torch.Tensor, batches: Sequence[Mapping[str, torch.Tensor]]) -> list:
    sizes = [len(next(iter(b.values()))) for b in batches]
    if len(labels) != sum(sizes):
        raise ValueError(f"huggingface_task: {len(labels)} labels for {sum(sizes)} samples")
    return list(labels.split(sizes))


# -- the metric -------------------------------------------------------------------------


def _hidden_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "last_hidden_state" not in output:
            raise ValueError(f"the model's output has neither logits nor last_hidden_state "
                             f"(it has {', '.join(output)}); give huggingface_task a metric=")  # fmt: skip
        return output["last_hidden_state"]
    return output[0]


def _has_logits(output: Any) -> bool:
    return not isinstance(output, Mapping) or "logits" in output


def _mask(inputs: Any, shape: torch.Size) -> torch.Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask if mask is not None and mask.shape == shape else None


@torch.no_grad()
def float_targets(model: nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The float model's outputs `fidelity` compares with, per batch of inputs: top-1
    predictions (IGNORE at padding), or last hidden states for a model without logits."""
    model = model.eval()
    targets = []
    for inputs in batches:
        output = call_model(model, inputs)
        if not _has_logits(output):
            targets.append(_hidden_of(output).detach().clone())
            continue
        predicted = logits_of(output).argmax(dim=-1)
        mask = _mask(inputs, predicted.shape)
        targets.append(predicted if mask is None else predicted.masked_fill(mask == 0, IGNORE))
    return targets


@torch.no_grad()
def fidelity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Agreement with the float model (see the module docstring): integer targets are
    its top-1 predictions, float targets its last hidden states."""
    score = total = 0.0
    for inputs, targets in batches:
        output = call_model(model, inputs)
        if targets.is_floating_point():
            cosine = F.cosine_similarity(_hidden_of(output).float(), targets.float(), dim=-1)
            weight = _mask(inputs, cosine.shape)
            weight = torch.ones_like(cosine) if weight is None else weight.to(cosine.dtype)
            score += float((cosine.clamp(0, 1) * weight).sum())
            total += float(weight.sum())
            continue
        valid = targets != IGNORE
        score += float(((logits_of(output).argmax(dim=-1) == targets) & valid).sum())
        total += float(valid.sum())
    return score / max(total, 1.0)


# -- built-in tiny models (random weights, seeded; synthetic tokens) -----------------------

VOCAB, LENGTH, SAMPLES, BATCH = 256, 32, 64, 16
PAD = 0


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        yield


def token_batches(seed: int = 0, *, samples: int = SAMPLES, length: int = LENGTH,
                  vocab: int = VOCAB) -> dict[str, torch.Tensor]:  # fmt: skip
    """Random token ids (PAD excluded) of random lengths, right-padded with PAD: what a
    tokenizer returns for `samples` texts, with padding to exercise the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (samples, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (samples,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}


_SIZES = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}
# 5x the 0.02 of pretrained configs: at 0.02 a random model's blocks add little to its
# residual stream, its predictions follow the input embedding and hardly change even at 2
# bits; at 0.1 the blocks matter and fidelity falls with the bits (8: ~0.97, 4: ~0.6-0.7)
_INIT = 0.1


def _bert() -> nn.Module:
    t = _transformers()
    config = t.BertConfig(vocab_size=VOCAB, hidden_size=_SIZES["hidden"],
                          num_hidden_layers=_SIZES["layers"], num_attention_heads=_SIZES["heads"],
                          intermediate_size=_SIZES["intermediate"], max_position_embeddings=LENGTH,
                          pad_token_id=PAD, initializer_range=_INIT)  # fmt: skip
    with _seeded(0):
        return t.BertForMaskedLM(config)


def _gpt2() -> nn.Module:
    t = _transformers()
    config = t.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=_SIZES["hidden"],
                          n_layer=_SIZES["layers"], n_head=_SIZES["heads"],
                          n_inner=_SIZES["intermediate"], bos_token_id=VOCAB - 1,
                          eos_token_id=VOCAB - 1, initializer_range=_INIT)  # fmt: skip
    with _seeded(0):
        return t.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    t = _transformers()
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=_SIZES["hidden"],
                           num_hidden_layers=_SIZES["layers"], num_attention_heads=_SIZES["heads"],
                           num_key_value_heads=_SIZES["heads"] // 2,
                           intermediate_size=_SIZES["intermediate"], max_position_embeddings=LENGTH,
                           pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                           initializer_range=_INIT)  # fmt: skip
    with _seeded(0):
        return t.LlamaForCausalLM(config)


def bert_tiny() -> Task:
    """BertForMaskedLM, random and seeded: per-token fidelity of its masked-LM predictions."""
    return huggingface_task(_bert, token_batches(1), name="hf-bert-tiny", batch_size=BATCH)


def gpt2_tiny() -> Task:
    """GPT2LMHeadModel (Conv1D projections, tied lm_head untied), random and seeded."""
    return huggingface_task(_gpt2, token_batches(2), name="hf-gpt2-tiny", batch_size=BATCH)


def llama_tiny() -> Task:
    """LlamaForCausalLM with grouped-query attention and RMSNorm, random and seeded."""
    return huggingface_task(_llama, token_batches(3), name="hf-llama-tiny", batch_size=BATCH)
